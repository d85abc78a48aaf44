"""Group commit through a real relay process: shared transactions, answers only after commit, and a bounded
queue that answers 503 instead of growing."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from tests.support import encode, relay_environment, running_relay, signed_headers


def distinct_events(count: int, tag: str) -> list[dict[str, Any]]:
    return [
        {
            "specversion": "1.0",
            "type": "user.created",
            "id": f"evt_{tag}{number:08d}",
            "time": "2025-03-01T10:00:00.000Z",
            "data": {"object": {"user_id": f"auth0|{tag}{number}", "email": f"u{number}@example.com"}},
        }
        for number in range(count)
    ]


def post_concurrently(url: str, events: list[dict[str, Any]], workers: int) -> list[httpx.Response]:
    def post(event: dict[str, Any]) -> httpx.Response:
        body = encode(event)
        with httpx.Client(base_url=url, timeout=15) as client:
            return client.post("/events/action", content=body, headers=signed_headers(body, event["id"]))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(post, events))


def batch_sizes(metrics_text: str) -> tuple[float, float]:
    """(transactions, events) from the relay_batch_events histogram."""
    count = float(re.search(r"^relay_batch_events_count (\S+)$", metrics_text, re.M)[1])  # type: ignore[index]
    total = float(re.search(r"^relay_batch_events_sum (\S+)$", metrics_text, re.M)[1])  # type: ignore[index]
    return count, total


def test_concurrent_requests_share_transactions_and_all_land(database: Any) -> None:
    env = relay_environment(database.conninfo, database.schema, RELAY_BATCH_MAX_WAIT_MS="20")
    events = distinct_events(60, "share")
    with running_relay(env) as relay:
        answers = post_concurrently(relay.url, events, workers=20)
        metrics = httpx.get(f"{relay.url}/metrics").text

    assert [answer.status_code for answer in answers] == [200] * len(events)
    transactions, committed = batch_sizes(metrics)
    assert committed == len(events)
    assert transactions < len(events)  # some requests shared a transaction
    assert database.query("SELECT count(*) FROM processed_events") == [(len(events),)]


def test_one_event_per_transaction_when_batches_are_capped_at_one(database: Any) -> None:
    env = relay_environment(database.conninfo, database.schema, RELAY_BATCH_MAX_EVENTS="1")
    events = distinct_events(20, "single")
    with running_relay(env) as relay:
        answers = post_concurrently(relay.url, events, workers=10)
        metrics = httpx.get(f"{relay.url}/metrics").text

    assert all(answer.status_code == 200 for answer in answers)
    assert batch_sizes(metrics) == (len(events), len(events))


def test_a_full_queue_answers_503_and_loses_nothing_it_acknowledged(database: Any) -> None:
    # One flusher committing one event at a time, and room for two waiting events: a burst must overflow.
    env = relay_environment(
        database.conninfo,
        database.schema,
        RELAY_QUEUE_MAX_EVENTS="2",
        RELAY_BATCH_FLUSHERS="1",
        RELAY_BATCH_MAX_EVENTS="1",
    )
    events = distinct_events(30, "full")
    with running_relay(env) as relay:
        answers = post_concurrently(relay.url, events, workers=30)

    refused = [answer for answer in answers if answer.status_code == 503]
    accepted = [answer for answer in answers if answer.status_code == 200]
    assert refused, "a burst beyond the queue bound must be refused"
    assert len(refused) + len(accepted) == len(events)
    for answer in refused:
        assert answer.headers["retry-after"].isdigit()
        assert "saturated" in answer.json()["error"]
    acknowledged = {json.loads(answer.content)["events"][0]["id"] for answer in accepted}
    stored = {row[0] for row in database.query("SELECT event_id FROM processed_events")}
    assert stored == acknowledged
