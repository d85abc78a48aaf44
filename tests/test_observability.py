"""Metrics and logs, read from a real relay process: what an operator's dashboards and alerts rely on."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx

from tests.support import (
    SIGNING_SECRET,
    WEBHOOK_TOKEN,
    encode,
    fixture,
    relay_environment,
    running_relay,
    signed_headers,
)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if not match or match[1] != name:
            continue
        found = ",".join(sorted(part for part in (match[2] or "").split(",") if part))
        if found == wanted:
            return float(match[3])
    return 0.0


def post_scenario(client: httpx.Client) -> dict[str, Any]:
    created = fixture("user.created")
    body = encode(created)
    assert (
        client.post("/events/action", content=body, headers=signed_headers(body, created["id"])).status_code
        == 200
    )
    bearer = {"authorization": f"Bearer {WEBHOOK_TOKEN}"}
    assert client.post("/events/webhook", content=body, headers=bearer).status_code == 200  # a duplicate
    assert client.post("/events/webhook", content=b"{not json", headers=bearer).status_code == 200
    refused = client.post("/events/webhook", content=body, headers={"authorization": "Bearer wrong"})
    assert refused.status_code == 401
    return created


def test_metrics_count_outcomes_refusals_batches_and_pool(database: Any) -> None:
    with (
        running_relay(relay_environment(database.conninfo, database.schema)) as relay,
        relay.client() as client,
    ):
        post_scenario(client)
        text = client.get("/metrics").text

    assert metric(text, "relay_events_total", type="user.created", outcome="applied") == 1
    assert metric(text, "relay_events_total", type="user.created", outcome="duplicate") == 1
    assert metric(text, "relay_events_total", type="other", outcome="dead_lettered") == 1
    assert metric(text, "relay_auth_failures_total", route="webhook", reason="unknown_credentials") == 1
    assert metric(text, "relay_batch_events_count") == 2  # two transactions: the event, then its duplicate
    assert metric(text, "relay_commit_seconds_count") == 2
    assert metric(text, "relay_ack_seconds_count", route="action") == 1
    assert metric(text, "relay_event_lag_seconds_count") == 2
    assert metric(text, "relay_db_pool_size") >= 1
    assert metric(text, "relay_queue_events") == 0
    # Litestar's own HTTP metrics, by status code: the 401 is there for alerting on refusals.
    assert "relay_http_requests_total" in text
    assert re.search(r'relay_http_requests_total\{[^}]*status_code="401"[^}]*\} 1\.0', text)


def test_logs_are_json_lines_without_profile_fields_or_secrets(database: Any) -> None:
    env = relay_environment(database.conninfo, database.schema, RELAY_LOG_LEVEL="INFO")
    with running_relay(env) as relay, relay.client() as client:
        created = post_scenario(client)
    assert relay.process.stdout is not None
    output = relay.process.stdout.read().decode()

    records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    received = [record for record in records if record.get("message") == "events received"]
    assert len(received) == 3
    first = received[0]
    assert first["route"] == "action" and first["status"] == 200 and first["latency_ms"] >= 0
    assert first["events"] == [
        {
            "id": created["id"],
            "type": "user.created",
            "user_id": created["data"]["object"]["user_id"],
            "outcome": "applied",
        }
    ]
    refused = [record for record in records if record.get("message") == "request refused"]
    assert refused == [{**refused[0], "route": "webhook", "status": 401, "reason": "unknown_credentials"}]
    for forbidden in (created["data"]["object"]["email"], SIGNING_SECRET, WEBHOOK_TOKEN, "webhook-signature"):
        assert forbidden not in output
