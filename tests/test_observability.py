"""Metrics and logs, read from a real relay process: what an operator's dashboards and alerts rely on."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import httpx
import pytest

from tests.support.database import Database
from tests.support.events import encode, fixture
from tests.support.http import (
    SIGNING_SECRET,
    WEBHOOK_TOKEN,
    metric,
    relay_environment,
    running_relay,
    signed_headers,
)

pytestmark = pytest.mark.integration

BEARER = {"authorization": f"Bearer {WEBHOOK_TOKEN}"}


def post_scenario(client: httpx.Client) -> tuple[dict[str, Any], list[float]]:
    """An applied event, its duplicate, an undecodable body, and a refused credential, one after the other;
    the event, and how long each of the three accepted requests took as the client saw it."""
    created = fixture("user.created")
    body = encode(created)
    requests = [
        ("/events/action", body, signed_headers(body, created["id"])),
        ("/events/webhook", body, BEARER),  # a duplicate
        ("/events/webhook", b"{not json", BEARER),  # a dead letter
    ]
    waited = []
    for path, content, headers in requests:
        started = time.perf_counter()
        assert client.post(path, content=content, headers=headers).status_code == 200
        waited.append(time.perf_counter() - started)
    refused = client.post("/events/webhook", content=body, headers={"authorization": "Bearer wrong"})
    assert refused.status_code == 401
    return created, waited


def log_records(output: str, message: str) -> list[dict[str, Any]]:
    """The JSON log records with `message`, without their `time`."""
    records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    return [
        {key: value for key, value in record.items() if key != "time"}
        for record in records
        if record.get("message") == message
    ]


def test_metrics_count_answers_outcomes_refusals_batches_and_pool(database: Database) -> None:
    with (
        running_relay(relay_environment(database.conninfo, database.schema)) as relay,
        relay.client() as client,
    ):
        post_scenario(client)
        # The pool and queue gauges are sampled every second: wait for a sample taken with the pool open.
        deadline = time.monotonic() + 10
        while metric(text := client.get("/metrics").text, "relay_db_pool_size") < 1:
            assert time.monotonic() < deadline, "relay_db_pool_size never showed the open pool"
            time.sleep(0.1)
        client.get("/healthz")  # not an event route: never counted in relay_http_requests_total

    assert metric(text, "relay_events_total", type="user.created", outcome="applied") == 1
    assert metric(text, "relay_events_total", type="user.created", outcome="duplicate") == 1
    assert metric(text, "relay_events_total", type="other", outcome="dead_lettered") == 1
    assert metric(text, "relay_auth_failures_total", route="webhook", reason="unknown_credentials") == 1
    # Three requests one after the other: three transactions of one event each.
    assert (metric(text, "relay_batch_events_count"), metric(text, "relay_batch_events_sum")) == (3, 3)
    assert metric(text, "relay_commit_seconds_count") == 3
    assert metric(text, "relay_ack_seconds_count", route="action") == 1
    assert metric(text, "relay_ack_seconds_count", route="webhook") == 2
    # Once per committed batch that held a user event: the undecodable body's batch had none.
    assert metric(text, "relay_event_lag_seconds_count") == 2
    assert metric(text, "relay_queue_events") == 0
    # The relay counts the answers on its two event routes, and only those.
    answers = {
        (labels["path"], labels["status_code"]): value
        for labels, value in samples(text, "relay_http_requests_total")
    }
    assert answers == {
        ("/events/action", "200"): 1,
        ("/events/webhook", "200"): 2,
        ("/events/webhook", "401"): 1,
    }


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of `name`, with its labels."""
    found = []
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match[1]))
            found.append((labels, float(match[2])))
    return found


def test_info_logs_one_line_per_committed_batch_and_per_refusal_and_no_personal_data(
    database: Database,
) -> None:
    env = relay_environment(database.conninfo, database.schema, RELAY_LOG_LEVEL="INFO")
    with running_relay(env) as relay, relay.client() as client:
        created, _ = post_scenario(client)
    output = relay.output()

    assert log_records(output, "batch committed") == [
        {"level": "info", "logger": "relay.pipeline", "message": "batch committed", "events": events}
        for events in (
            [[created["id"], "applied"]],
            [[created["id"], "duplicate"]],
            [[None, "dead_lettered"]],
        )
    ]
    assert log_records(output, "request refused") == [
        {
            "level": "warning",
            "logger": "relay",
            "message": "request refused",
            "route": "webhook",
            "status": 401,
            "reason": "unknown_credentials",
        }
    ]
    assert log_records(output, "events received") == []  # the per-request line is DEBUG only
    for forbidden in (created["data"]["object"]["email"], SIGNING_SECRET, WEBHOOK_TOKEN, "webhook-signature"):
        assert forbidden not in output


def test_debug_logs_a_line_per_request_with_its_latency(database: Database) -> None:
    env = relay_environment(database.conninfo, database.schema, RELAY_LOG_LEVEL="DEBUG")
    with running_relay(env) as relay, relay.client() as client:
        created, waited = post_scenario(client)
    output = relay.output()

    received = log_records(output, "events received")
    latencies = [record.pop("latency_ms") for record in received]
    assert received == [
        {"level": "debug", "logger": "relay", "message": "events received", **fields}
        for fields in (
            {"route": "action", "status": 200, "events": [[created["id"], "applied"]]},
            {"route": "webhook", "status": 200, "events": [[created["id"], "duplicate"]]},
            {"route": "webhook", "status": 200, "events": [[None, "dead_lettered"]]},
        )
    ]
    # Milliseconds, measured inside the request: never more than the client waited for the answer.
    for latency, seconds in zip(latencies, waited, strict=True):
        assert isinstance(latency, float)
        assert 0 < latency <= seconds * 1000
    assert created["data"]["object"]["email"] not in output
