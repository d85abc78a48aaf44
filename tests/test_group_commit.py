"""Group commit through a real relay process: shared transactions, answers only after commit, and a bounded
queue that answers 503 instead of growing, yet never refuses for ever a body larger than the bound."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.support.database import Database, outcomes_recorded
from tests.support.events import encode, new_users
from tests.support.http import deliver, metric, outcomes, relay_environment, running_relay, signed_headers

pytestmark = pytest.mark.integration


def post_concurrently(url: str, events: list[dict[str, Any]], workers: int) -> list[httpx.Response]:
    def post(event: dict[str, Any]) -> httpx.Response:
        body = encode(event)
        with httpx.Client(base_url=url, timeout=15) as client:
            return client.post("/events/action", content=body, headers=signed_headers(body, event["id"]))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(post, events))


def batches(metrics_text: str) -> tuple[float, float]:
    """(transactions, events) from the relay_batch_events histogram."""
    return metric(metrics_text, "relay_batch_events_count"), metric(metrics_text, "relay_batch_events_sum")


def test_concurrent_requests_share_transactions_and_all_land(database: Database) -> None:
    env = relay_environment(database.conninfo, database.schema, RELAY_BATCH_MAX_WAIT_MS="20")
    events = list(new_users("share", 60))
    with running_relay(env) as relay:
        answers = post_concurrently(relay.url, events, workers=20)
        metrics = httpx.get(f"{relay.url}/metrics").text

    assert [answer.status_code for answer in answers] == [200] * len(events)
    transactions, committed = batches(metrics)
    assert committed == len(events)
    assert transactions < len(events)  # some requests shared a transaction
    assert outcomes_recorded(database) == {event["id"]: "applied" for event in events}


def test_one_event_per_transaction_when_batches_are_capped_at_one(database: Database) -> None:
    env = relay_environment(database.conninfo, database.schema, RELAY_BATCH_MAX_EVENTS="1")
    events = list(new_users("single", 20))
    with running_relay(env) as relay:
        answers = post_concurrently(relay.url, events, workers=10)
        metrics = httpx.get(f"{relay.url}/metrics").text

    assert [answer.status_code for answer in answers] == [200] * len(events)
    assert batches(metrics) == (len(events), len(events))


def test_a_full_queue_answers_503_and_loses_nothing_it_acknowledged(database: Database) -> None:
    # One flusher committing one event at a time, and room for two waiting events: a burst must overflow.
    env = relay_environment(
        database.conninfo,
        database.schema,
        RELAY_QUEUE_MAX_EVENTS="2",
        RELAY_BATCH_FLUSHERS="1",
        RELAY_BATCH_MAX_EVENTS="1",
    )
    events = list(new_users("full", 30))
    with running_relay(env) as relay:
        answers = post_concurrently(relay.url, events, workers=30)
        metrics = httpx.get(f"{relay.url}/metrics").text

    refused = [answer for answer in answers if answer.status_code == 503]
    accepted = [answer for answer in answers if answer.status_code == 200]
    assert refused, "a burst beyond the queue bound must be refused"
    assert len(refused) + len(accepted) == len(events)
    for answer in refused:
        assert answer.headers["retry-after"].isdigit()
        assert answer.json() == {"error": "relay saturated; retry later"}
    assert metric(metrics, "relay_unavailable_total", cause="saturated") == len(refused)
    acknowledged = {json.loads(answer.content)["events"][0]["id"] for answer in accepted}
    assert outcomes_recorded(database) == dict.fromkeys(acknowledged, "applied")


def test_a_webhook_array_larger_than_the_queue_bound_is_taken_by_an_idle_relay(database: Database) -> None:
    """The bound keeps a backlog from growing; a body larger than the bound, arriving when nothing waits, is
    no backlog, and refusing it would refuse it on every retry."""
    env = relay_environment(database.conninfo, database.schema, RELAY_QUEUE_MAX_EVENTS="5")
    events = list(new_users("big", 40))
    with running_relay(env) as relay, relay.client() as client:
        response = deliver(client, "webhook", encode(events))
        metrics = client.get("/metrics").text

    assert outcomes(response) == ["applied"] * len(events)
    assert outcomes_recorded(database) == {event["id"]: "applied" for event in events}
    assert metric(metrics, "relay_unavailable_total", cause="saturated") == 0
    assert batches(metrics) == (1, len(events))
