"""Amazon EventBridge through SQS: events put on a bus reach the queue through a rule, and `relay serve`
(a real process, `RELAY_SQS_QUEUE_URL` set) takes them through the one pipeline into a real PostgreSQL. moto
in server mode plays SQS and EventBridge (what it cannot emulate is said in tests/support/aws.py)."""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from relay.embedded import start_embedded
from relay.migrations import migrate
from tests.support.aws import (
    LOG_STREAM_SOURCE,
    Aws,
    HoldingProxy,
    Queue,
    eventbridge_event,
    make_queue,
    route_to_queue,
    wait_for,
)
from tests.support.database import (
    Database,
    assert_stored_as_sent,
    dead_letters,
    ledger,
    ledger_row,
    outcomes_recorded,
    row_counts,
)
from tests.support.events import cloudevent, encode, fixture, new_users
from tests.support.http import deliver, metric, relay_environment, running_relay
from tests.support.reference import assert_copy_matches, conflicting_history, to_cloudevents

pytestmark = pytest.mark.integration

VISIBILITY_SECONDS = 2


def consuming_relay_environment(
    database: Database, aws: Aws, queue: Queue, **overrides: str
) -> dict[str, str]:
    return relay_environment(
        database.conninfo,
        database.schema,
        **{
            **aws.environment(),
            "RELAY_SQS_QUEUE_URL": queue.url,
            "RELAY_SQS_VISIBILITY_SECONDS": str(VISIBILITY_SECONDS),
            **overrides,
        },
    )


def queue_is_empty(queue: Queue) -> bool:
    return queue.counts() == (0, 0)


def test_events_put_on_the_bus_are_applied_and_their_messages_deleted(database: Database, aws: Aws) -> None:
    queue = make_queue(aws, visibility_seconds=VISIBILITY_SECONDS, max_receives=3)
    bus = route_to_queue(aws, queue)
    created, updated = fixture("user.created"), fixture("user.updated")
    with running_relay(consuming_relay_environment(database, aws, queue)) as relay:
        bus.put([created, fixture("test-event")])
        wait_for(lambda: len(ledger(database)) == 2, 20, "both events in the ledger")
        bus.put([updated])
        wait_for(lambda: len(ledger(database)) == 3, 20, "the update in the ledger")
        wait_for(lambda: queue_is_empty(queue), 20, "the queue to empty")
        with relay.client() as client:
            metrics = client.get("/metrics").text
    assert_stored_as_sent(database, updated)
    assert outcomes_recorded(database) == {
        created["id"]: "applied",
        updated["id"]: "applied",
        fixture("test-event")["id"]: "test",
    }
    assert metric(metrics, "relay_sqs_messages_received_total") == 3
    assert metric(metrics, "relay_sqs_messages_deleted_total") == 3
    assert queue.dead_lettered() == []


def shuffled_with_duplicates(events: list[dict[str, Any]], chooser: random.Random) -> list[dict[str, Any]]:
    """Every event once, a third of them two or three times, all shuffled: at-least-once, in no order."""
    delivered = [
        event for event in events for _ in range(1 if chooser.random() < 0.66 else chooser.randint(2, 3))
    ]
    chooser.shuffle(delivered)
    return delivered


def test_shuffled_duplicated_histories_converge_like_the_webhook_route_then_sigterm_exits_0(
    database: Database, aws: Aws
) -> None:
    """The same history, shuffled and duplicated, once through the bus and the queue and once through
    /events/webhook: both copies equal the reference model's (the oracle of every convergence test). The
    two copies are not compared with each other: each history's event ids are drawn anew, and ids break
    ties between equal times, so two users can rightly end differently. SIGTERM during the long poll then
    ends the relay at once, with status 0."""
    chooser = random.Random(secrets.randbits(32))
    history = conflicting_history(chooser, users=4, events=120)
    via_queue, via_webhook = secrets.token_hex(4), secrets.token_hex(4)
    queued_events, posted_events = to_cloudevents(history, via_queue), to_cloudevents(history, via_webhook)
    queue = make_queue(aws, visibility_seconds=VISIBILITY_SECONDS, max_receives=3)
    bus = route_to_queue(aws, queue)

    with running_relay(consuming_relay_environment(database, aws, queue)) as relay:
        bus.put(shuffled_with_duplicates(queued_events, chooser))
        with relay.client() as client:
            for event in shuffled_with_duplicates(posted_events, chooser):
                assert deliver(client, "webhook", encode(event)).status_code == 200
        wait_for(lambda: len(ledger(database)) == 2 * len(history), 60, "every event in the ledger")
        wait_for(lambda: queue_is_empty(queue), 30, "the queue to empty")

        time.sleep(0.5)  # the pollers are back in their long poll
        stopped = time.monotonic()
        relay.process.send_signal(signal.SIGTERM)
        relay.process.wait(timeout=15)
        assert relay.process.returncode == 0, relay.output()[-2000:]
        assert time.monotonic() - stopped < 5, "the relay waited out its long poll"

    assert_copy_matches(database, queued_events, via_queue)
    assert_copy_matches(database, posted_events, via_webhook)
    assert queue.dead_lettered() == []


def test_a_relay_killed_between_commit_and_delete_leaves_the_message_which_comes_back_a_duplicate(
    database: Database, aws: Aws
) -> None:
    queue = make_queue(aws, visibility_seconds=VISIBILITY_SECONDS, max_receives=5)
    bus = route_to_queue(aws, queue)
    event = fixture("user.created")
    with HoldingProxy(aws.endpoint) as proxy:
        proxy.holding.set()
        env = consuming_relay_environment(database, aws, queue, **aws.environment(proxy.endpoint))
        with running_relay(env) as first:
            bus.put([event])
            wait_for(proxy.held.is_set, 20, "the relay to delete the message")
            assert outcomes_recorded(database) == {event["id"]: "applied"}  # committed before the delete
            first.process.kill()
            first.process.wait(timeout=10)
        assert queue.counts() in ((0, 1), (1, 0)), "the message stays in the queue"

    with running_relay(consuming_relay_environment(database, aws, queue)) as second:
        wait_for(lambda: queue_is_empty(queue), 30, "the redelivered message to be deleted")
        with second.client() as client:
            metrics = client.get("/metrics").text
    assert metric(metrics, "relay_events_total", type="user.created", outcome="duplicate") == 1
    assert metric(metrics, "relay_sqs_messages_deleted_total") == 1
    assert ledger(database) == [ledger_row(event, "applied")]
    assert_stored_as_sent(database, event)
    assert queue.dead_lettered() == []


def test_messages_not_ours_are_never_applied_and_end_up_in_the_dead_letter_queue(
    database: Database, aws: Aws
) -> None:
    """Not deleted, so the queue's redrive policy moves them after maxReceiveCount receives."""
    queue = make_queue(aws, visibility_seconds=VISIBILITY_SECONDS, max_receives=2)
    bus = route_to_queue(aws, queue)
    good = fixture("user.created")
    refused = {
        "log_stream_event": json.dumps(
            eventbridge_event(
                {"log_id": "90020250202175601573", "data": {"type": "s", "user_id": "auth0|x"}},
                source=LOG_STREAM_SOURCE,
                detail_type="Auth0 log",
            )
        ),
        "source_not_allowed": json.dumps(
            eventbridge_event(fixture("user.updated"), source="com.example.app")
        ),
        "not_eventbridge": "garbage, not even JSON",
        "origin_not_allowed": json.dumps(eventbridge_event(cloudevent("user.created", a0tenant="globex"))),
    }
    bare_cloudevent = json.dumps(fixture("user.deleted"))  # what an API destination may get, not a rule's SQS

    env = consuming_relay_environment(database, aws, queue, RELAY_ALLOWED_TENANTS="acme")
    with running_relay(env) as relay:
        for body in refused.values():
            queue.send(body)
        queue.send(bare_cloudevent)
        bus.put([good])
        wait_for(
            lambda: queue.counts(queue.dead_letter_url)[0] == len(refused) + 1, 40, "the dead-letter queue"
        )
        wait_for(lambda: queue_is_empty(queue), 20, "the queue to empty")
        with relay.client() as client:
            metrics = client.get("/metrics").text

    assert ledger(database) == [ledger_row(good, "applied")]
    assert row_counts(database) == {"users": 1, "processed_events": 1, "dead_letters": 0}
    assert sorted(queue.dead_lettered()) == sorted([*refused.values(), bare_cloudevent])
    for reason in refused:
        assert metric(metrics, "relay_sqs_messages_refused_total", reason=reason) >= 1, reason
    assert metric(metrics, "relay_sqs_messages_refused_total", reason="not_eventbridge") >= 2
    assert metric(metrics, "relay_sqs_messages_deleted_total") == 1


def test_an_authentic_event_that_cannot_be_decoded_becomes_a_dead_letter_and_its_message_is_deleted(
    database: Database, aws: Aws
) -> None:
    queue = make_queue(aws, visibility_seconds=VISIBILITY_SECONDS, max_receives=2)
    bus = route_to_queue(aws, queue)
    broken = cloudevent("user.created", email=["not", "a", "string"])
    with running_relay(consuming_relay_environment(database, aws, queue)):
        bus.put([broken])
        wait_for(lambda: len(dead_letters(database)) == 1, 20, "the dead letter")
        wait_for(lambda: queue_is_empty(queue), 20, "the queue to empty")
    [letter] = dead_letters(database)
    assert (letter.route, json.loads(letter.body), letter.resolved) == ("sqs", broken, False)
    assert "not an Auth0 user" in letter.error
    assert row_counts(database) == {"users": 0, "processed_events": 0, "dead_letters": 1}
    time.sleep(VISIBILITY_SECONDS + 1)
    assert queue.counts(queue.dead_letter_url) == (0, 0)


def test_postgresql_down_keeps_the_messages_in_the_queue_and_applies_them_once_it_is_back(
    tmp_path: Path, aws: Aws
) -> None:
    """Longer than maxReceiveCount visibility timeouts: the consumer holds its messages (their visibility
    extended) instead of letting them go round to the dead-letter queue. The API destination route answers
    503 with Retry-After meanwhile."""
    server = start_embedded(tmp_path / "stopped", stop_at_exit=False)
    try:
        asyncio.run(migrate(server.conninfo, "eventbridge"))
        database = Database(server.conninfo, "eventbridge")
        queue = make_queue(aws, visibility_seconds=VISIBILITY_SECONDS, max_receives=2)
        bus = route_to_queue(aws, queue)
        first, *later = list(new_users("pgd", 6))
        env = consuming_relay_environment(database, aws, queue, RELAY_DB_TIMEOUT_SECONDS="1")
        with running_relay(env) as relay:
            bus.put([first])
            wait_for(lambda: len(ledger(database)) == 1, 20, "the first event")
            server.handle.stop()
            bus.put(later)
            time.sleep(4 * VISIBILITY_SECONDS)
            assert sum(queue.counts()) == len(later), "the messages stay in the queue"
            assert queue.counts(queue.dead_letter_url) == (0, 0)
            with relay.client() as client:
                body = encode(eventbridge_event(cloudevent("user.updated")))
                answer = deliver(client, "eventbridge", body)
            assert answer.status_code == 503
            assert int(answer.headers["retry-after"]) > 0

            server.handle.start()
            wait_for(lambda: len(ledger(database)) == 6, 40, "the held events once PostgreSQL is back")
            wait_for(lambda: queue_is_empty(queue), 20, "the queue to empty")
        assert outcomes_recorded(database) == {event["id"]: "applied" for event in [first, *later]}
        assert queue.dead_lettered() == []
    finally:
        server.handle.stop()


def test_sigterm_while_messages_flow_commits_and_deletes_what_it_took_and_leaves_the_rest(
    database: Database, aws: Aws
) -> None:
    """Nothing taken is lost and nothing committed is left undeleted: a second relay finds the rest of the
    queue, and not one duplicate."""
    queue = make_queue(aws, visibility_seconds=VISIBILITY_SECONDS, max_receives=5)
    bus = route_to_queue(aws, queue)
    events = list(new_users("trm", 300))
    with running_relay(consuming_relay_environment(database, aws, queue)) as first:
        bus.put(events)
        wait_for(lambda: len(ledger(database)) >= 20, 30, "some events in the ledger")
        first.process.send_signal(signal.SIGTERM)
        first.process.wait(timeout=15)
        assert first.process.returncode == 0, first.output()[-2000:]
    taken_by_the_first = len(ledger(database))
    with running_relay(consuming_relay_environment(database, aws, queue)) as second:
        wait_for(lambda: len(ledger(database)) == len(events), 60, "every event")
        wait_for(lambda: queue_is_empty(queue), 20, "the queue to empty")
        with second.client() as client:
            metrics = client.get("/metrics").text
    assert metric(metrics, "relay_events_total", type="user.created", outcome="duplicate") == 0
    assert metric(metrics, "relay_sqs_messages_deleted_total") == len(events) - taken_by_the_first
    assert set(outcomes_recorded(database).values()) == {"applied"}
