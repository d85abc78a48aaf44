"""Amazon EventBridge through SQS: events put on a bus reach the queue through a rule, and `relay serve`
(a real process, `RELAY_SQS_QUEUE_URL` set) takes them through the one pipeline into a real PostgreSQL. moto
in server mode plays SQS and EventBridge (what it cannot emulate is said in tests/support/aws.py)."""

from __future__ import annotations

import pytest

from tests.support.aws import (
    Aws,
    Queue,
    make_queue,
    route_to_queue,
    wait_for,
)
from tests.support.database import (
    Database,
    assert_stored_as_sent,
    ledger,
    outcomes_recorded,
)
from tests.support.events import fixture
from tests.support.http import metric, relay_environment, running_relay

pytestmark = pytest.mark.integration

VISIBILITY_SECONDS = 2


def consuming_relay_environment(
    database: Database, aws: Aws, queue: Queue, **overrides: str
) -> dict[str, str]:
    return relay_environment(
        database.conninfo,
        database.schema,
        RELAY_SQS_QUEUE_URL=queue.url,
        RELAY_SQS_VISIBILITY_SECONDS=str(VISIBILITY_SECONDS),
        **aws.environment(),
        **overrides,
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
