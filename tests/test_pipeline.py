"""The pipeline's promise: no item can make another item's delivery fail (DESIGN.md, "Shape").

Deliveries committed in one batch: one event whose merge raises (a fault injected in the relay's own code)
becomes a dead letter, and everything else in its batch, its own user's other events included, ends exactly
as it would have without it. Then over HTTP: an event whose data PostgreSQL refuses, posted at the same time
as good ones and committed in the same batch, is found and kept as a dead letter while the others land.
And `decide`, the one function that settles every outcome, on its own.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import httpx
import psycopg
import pytest

from relay import pipeline as pipeline_module
from relay.events import Undecodable, UserEvent, decode_body
from relay.handlers import Outcome
from relay.pipeline import Delivery, EventResult, Pipeline, decide
from relay.store import LedgerRow, NewDeadLetter, Pool, ReplayFailure, StoredUser, create_pool
from tests.support.database import Database, StoredLetter, dead_letters, migrated_schema
from tests.support.events import (
    BASE_TIME,
    NUMBER_POSTGRESQL_REFUSES,
    REFUSED_NUMBER_ERROR,
    cloudevent,
    encode,
    fixture,
    new_users,
    user_event,
)
from tests.support.http import deliver, relay_environment, running_relay

pytestmark = pytest.mark.integration

MERGE_ERROR = "the event could not be merged (InjectedFault)"


class InjectedFault(Exception):
    """Raised by the test's stand-in for `apply_event`, for one marked event only."""


MARKED = user_event("updated", "evt_marked", 20, "auth0|ann", name="from the marked event", nickname="marked")


def batch_without(marked: dict[str, Any] | None) -> list[Delivery]:
    """Four deliveries for one batch: three users' histories in no particular order (the marked event's user
    among them, with events before and after it), a test event, an undecodable item and a duplicate; then,
    when given, the marked event alone in a fifth delivery."""
    ann_created = user_event("created", "evt_ann_1", 10, "auth0|ann", email="ann@example.com", name="Ann")
    ann_renamed = user_event("updated", "evt_ann_3", 30, "auth0|ann", name="Ann B.")
    bo_created = user_event("created", "evt_bo_1", 15, "auth0|bo", email="bo@example.com")
    bo_deleted = user_event("deleted", "evt_bo_2", 25, "auth0|bo")
    cy_created = user_event("created", "evt_cy_1", 5, "auth0|cy", email="cy@example.com")
    bodies = [
        ("webhook", encode([ann_renamed, bo_created])),
        ("action", encode(cy_created)),
        ("webhook", encode([fixture("test-event"), [1, 2], bo_deleted])),  # [1, 2]: not a CloudEvent
        ("webhook", encode([ann_created, cy_created])),  # cy_created again: a duplicate within the batch
    ]
    if marked is not None:
        bodies.append(("action", encode(marked)))
    headers = {"content-type": "application/json", "authorization": "Bearer never-kept"}
    return [Delivery(route, decode_body(body), headers) for route, body in bodies]


@pytest.fixture
def fault_in_apply_event(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`apply_event`, as the pipeline calls it, raising for the marked event and working for all others."""
    real = pipeline_module.apply_event

    def apply_event(state: Any, event: UserEvent, delete_mode: Any) -> Outcome:
        outcome = real(state, event, delete_mode)
        if event.id == MARKED["id"]:
            # Halfway through, as a real bug would: the user's state has already been changed.
            raise InjectedFault("a bug in the relay's own merge, for this event only")
        return outcome

    monkeypatch.setattr(pipeline_module, "apply_event", apply_event)
    yield


@pytest.fixture
def control(database_server: str) -> Iterator[Database]:
    """A second schema, where the same batch is committed without the marked event and without the fault."""
    with migrated_schema(database_server, prefix="test_control_") as migrated:
        yield migrated


def stored(database: Database) -> dict[str, Any]:
    """Everything a batch writes, but the dead letters."""
    return {
        "users": database.query(
            "SELECT user_id, profile, merge_state, deleted_at, last_event_processed, last_event_id,"
            " email, name FROM users ORDER BY user_id"
        ),
        "ledger": database.query(
            "SELECT event_id, event_type, user_id, event_time, outcome FROM processed_events"
            " ORDER BY event_id"
        ),
    }


async def commit_in_one_batch(pool: Pool, database: Database, deliveries: list[Delivery], how: str) -> Any:
    """The deliveries as one batch: handed to `Pipeline.commit` together, or delivered concurrently to a
    running group committer that takes them all in one batch."""
    if how == "commit":
        return await Pipeline(pool, database.settings).commit(deliveries)
    events = sum(len(delivery) for delivery in deliveries)
    settings = database.with_settings(batch_max_events=events, batch_max_wait_ms=1000, batch_flushers=1)
    pipeline = Pipeline(pool, settings)
    pipeline.start()
    try:
        return await asyncio.gather(*(pipeline.deliver(delivery) for delivery in deliveries))
    finally:
        await pipeline.close()


@pytest.mark.anyio
@pytest.mark.usefixtures("fault_in_apply_event")
@pytest.mark.parametrize("how", ["commit", "concurrent deliveries"])
async def test_an_event_whose_merge_raises_is_a_dead_letter_and_its_batch_is_as_without_it(
    pool: Pool, database: Database, control: Database, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.pipeline")
    results = await commit_in_one_batch(pool, database, batch_without(MARKED), how)
    batches = [record for record in caplog.records if record.getMessage() == "batch committed"]

    control_pool = create_pool(control.conninfo, control.settings)
    await control_pool.open(wait=True)
    try:
        expected = await Pipeline(control_pool, control.settings).commit(batch_without(None))
    finally:
        await control_pool.close()

    # One batch: one commit, one log line naming every item of it.
    [batch] = batches
    assert len(batch.fields["events"]) == sum(len(delivery) for delivery in batch_without(MARKED))
    # The marked event: a dead letter holding exactly its bytes, saying which exception it met.
    assert list(results[-1]) == [
        EventResult(id=MARKED["id"], outcome=Outcome.DEAD_LETTERED, dead_letter_id=2, error=MERGE_ERROR)
    ]
    assert dead_letters(database) == [
        dead_letters(control)[0],  # the undecodable item of the third delivery, as without the fault
        StoredLetter(2, "action", encode(MARKED), {"content-type": "application/json"}, MERGE_ERROR, False),
    ]
    # Every other delivery's results, and everything written, exactly as without the marked event.
    assert [list(answers) for answers in results[:-1]] == [list(answers) for answers in expected]
    assert stored(database) == stored(control)
    assert [outcome for _, outcome in batch.fields["events"]] == [
        result.outcome.value for answers in results for result in answers
    ]


@pytest.mark.anyio
@pytest.mark.usefixtures("fault_in_apply_event")
async def test_a_replayed_event_whose_merge_raises_keeps_its_letter_unresolved_with_the_new_error(
    pool: Pool, database: Database
) -> None:
    [(letter_id,)] = database.query(
        "INSERT INTO dead_letters (route, body, headers, error)"
        " VALUES ('action', %s, '{}', 'old') RETURNING id",
        [encode(MARKED)],
    )
    replayed = Delivery("action", decode_body(encode(MARKED)), replaying=letter_id)

    results = await Pipeline(pool, database.settings).commit([replayed, *batch_without(None)])

    [result] = results[0]
    assert result == EventResult(
        id=MARKED["id"], outcome=Outcome.DEAD_LETTERED, dead_letter_id=letter_id, error=MERGE_ERROR
    )
    assert [(letter.id, letter.error, letter.resolved) for letter in dead_letters(database)] == [
        (letter_id, MERGE_ERROR, False),
        (letter_id + 1, "not a CloudEvent: Expected `object`, got `array`", False),  # the batch's own
    ]
    assert database.query("SELECT count(*) FROM processed_events WHERE event_id = %s", [MARKED["id"]]) == [
        (0,)
    ]


# ---------------------------------------------------------------------------------------------------------
# Over HTTP: data PostgreSQL refuses, in a batch of concurrent requests

BATCH = 8


@pytest.fixture
def one_batch_relay(database: Database) -> Iterator[Any]:
    """A relay that commits BATCH events in one batch: one flusher, which waits for BATCH events."""
    env = relay_environment(
        database.conninfo,
        database.schema,
        RELAY_BATCH_FLUSHERS="1",
        RELAY_BATCH_MAX_EVENTS=str(BATCH),
        RELAY_BATCH_MAX_WAIT_MS="1000",
        RELAY_LOG_LEVEL="INFO",
    )
    with running_relay(env) as relay:
        yield relay


def test_an_event_postgresql_refuses_is_isolated_from_concurrent_requests_in_its_batch(
    one_batch_relay: Any, database: Database
) -> None:
    good = list(new_users("iso", BATCH - 1))
    # A number the decoder takes and PostgreSQL's numeric cannot hold.
    bad = cloudevent(
        "user.created",
        id="evt_refused",
        user_id="auth0|refused",
        user_metadata={"size": NUMBER_POSTGRESQL_REFUSES},
    )
    events = [*good[:3], bad, *good[3:]]
    clients = [one_batch_relay.client() for _ in events]
    for client in clients:
        assert client.get("/healthz").status_code == 200  # connected before any event is sent
    start = threading.Barrier(len(events))

    def post(client: httpx.Client, event: dict[str, Any]) -> httpx.Response:
        start.wait()
        return deliver(client, "action", encode(event), event["id"])

    try:
        with ThreadPoolExecutor(max_workers=len(events)) as threads:
            answers = dict(zip([e["id"] for e in events], threads.map(post, clients, events), strict=True))
    finally:
        for client in clients:
            client.close()

    error = f"PostgreSQL refused the event: {REFUSED_NUMBER_ERROR}"
    for event in good:
        assert answers[event["id"]].json() == {"events": [{"id": event["id"], "outcome": "applied"}]}
    assert answers[bad["id"]].status_code == 200
    [refused] = answers[bad["id"]].json()["events"]
    assert (refused["outcome"], refused["error"]) == ("dead_lettered", error)
    [letter] = dead_letters(database)
    assert (letter.id, letter.route, letter.body, letter.error) == (
        refused["dead_letter_id"],
        "action",
        encode(bad),
        error,
    )
    for event in good:  # nothing of its batch-mates in the dead letter
        for value in (event["id"], event["data"]["object"]["user_id"], event["data"]["object"]["email"]):
            assert value not in letter.error
            assert value.encode() not in letter.body
    assert database.query("SELECT user_id FROM users ORDER BY user_id") == sorted(
        (event["data"]["object"]["user_id"],) for event in good
    )
    # They were one batch: the relay's log line for it names every one of them.
    batches = [line for line in one_batch_relay.output().splitlines() if '"batch committed"' in line]
    assert len(batches) == 1, batches
    assert all(f'["{event["id"]}",' in batches[0] for event in good)
    assert f'["{bad["id"]}","dead_lettered"]' in batches[0]


# ---------------------------------------------------------------------------------------------------------
# decide(): every outcome settled in one pure function


def decoded(*events: dict[str, Any]) -> list[Any]:
    return decode_body(encode(list(events)))


def test_decide_settles_a_batch_in_version_order_whatever_order_it_came_in() -> None:
    created = user_event("created", "evt_1", 10, "auth0|ann", email="ann@example.com")
    renamed = user_event("updated", "evt_2", 20, "auth0|ann", name="Ann")
    deleted = user_event("deleted", "evt_3", 30, "auth0|ann")
    delivery = Delivery("webhook", decoded(deleted, renamed, fixture("test-event"), created, renamed))
    entries = [(delivery, item) for item in delivery.items]

    decided = decide(entries, processed=frozenset(), stored={}, delete_mode="soft")

    assert decided.outcomes == [
        Outcome.TOMBSTONED,
        Outcome.APPLIED,
        Outcome.TEST,
        Outcome.APPLIED,
        Outcome.DUPLICATE,
    ]
    [state] = decided.writes.new_users
    assert (state.user_id, state.profile["name"], state.last_version) == (
        "auth0|ann",
        "Ann",
        (1_735_689_600_030_000, "evt_3"),
    )
    assert decided.writes.changed_users == []
    assert [row.event_id for row in decided.writes.ledger] == [
        "evt_3",
        "evt_2",
        fixture("test-event")["id"],
        "evt_1",
    ]
    assert decided.writes.dead_letters == []


def test_decide_keeps_what_the_ledger_knows_as_duplicates_and_changes_a_known_user_at_its_row_version() -> (
    None
):
    seen = user_event("updated", "evt_seen", 10, "auth0|ann", name="seen")
    new = user_event("updated", "evt_new", 20, "auth0|ann", nickname="new")
    delivery = Delivery("webhook", decoded(seen, new))
    known = StoredUser(
        {"user_id": "auth0|ann", "name": "stored"},
        {"fields": {}, "snapshot": None, "lifecycle": None, "last": [1, "evt_0"]},
        None,
        "4242",
    )

    decided = decide(
        [(delivery, item) for item in delivery.items], frozenset({"evt_seen"}), {"auth0|ann": known}, "soft"
    )

    assert decided.outcomes == [Outcome.DUPLICATE, Outcome.APPLIED]
    [(state, row_version)] = decided.writes.changed_users
    assert (state.profile, row_version) == (
        {"user_id": "auth0|ann", "name": "stored", "nickname": "new"},
        "4242",
    )
    assert decided.writes.ledger == [
        LedgerRow("evt_new", "user.updated", "auth0|ann", BASE_TIME + timedelta(milliseconds=20), "applied")
    ]


def test_decide_keeps_an_undecodable_item_with_its_diagnostic_headers_only() -> None:
    headers = {"content-type": "application/json", "authorization": "Bearer secret", "webhook-id": "msg_1"}
    delivery = Delivery("action", [Undecodable(b"{nope", "not a CloudEvent: because")], headers)

    decided = decide([(delivery, delivery.items[0])], frozenset(), {}, "soft")

    assert decided.outcomes == [Outcome.DEAD_LETTERED]
    assert decided.writes.dead_letters == [
        NewDeadLetter(
            "action",
            b"{nope",
            {"content-type": "application/json", "webhook-id": "msg_1"},
            "not a CloudEvent: because",
        )
    ]
    assert decided.writes.ledger == []


def test_decide_resolves_a_replayed_letter_only_when_all_its_items_went_in_and_else_records_why() -> None:
    good = user_event("created", "evt_good", 10, "auth0|ann")
    whole = Delivery("webhook", decoded(good), replaying=7)
    failing = Delivery("webhook", [*decoded(good), Undecodable(b"x", "broken")], replaying=8)

    resolved = decide([(whole, item) for item in whole.items], frozenset(), {}, "soft")
    still_failing = decide([(failing, item) for item in failing.items], frozenset(), {}, "soft")

    assert (resolved.writes.resolved_letters, resolved.writes.replay_failures) == ([7], [])
    assert (still_failing.writes.resolved_letters, still_failing.writes.replay_failures) == (
        [],
        [ReplayFailure(8, "broken")],
    )
    assert still_failing.writes.dead_letters == []  # no second copy of the body


# ---------------------------------------------------------------------------------------------------------
# Another writer between a batch's read and its write


@pytest.mark.anyio
async def test_a_batch_whose_user_changes_under_it_is_merged_again_and_then_holds_its_users(
    pool: Pool, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch reads without locks, decides, then writes only if its users are still as it read them. Here
    another writer (an operator's UPDATE) changes the user after every read: the first time it gets in, and
    the batch runs again from fresh facts, keeping the operator's change; from then on the batch holds the
    user locked from read to write, so the operator's next attempts wait (and give up, after a short
    lock_timeout) and the batch commits."""
    pipeline = Pipeline(pool, database.settings)
    created = user_event("created", "evt_1", 10, "auth0|ann", email="ann@example.com")
    await pipeline.commit([Delivery("webhook", decode_body(encode(created)))])
    operator_writes: list[str] = []

    def decide_while_an_operator_writes(*arguments: Any) -> Any:
        with psycopg.connect(
            database.conninfo, autocommit=True, options=f"-c search_path={database.schema}"
        ) as operator:
            operator.execute("SET lock_timeout = '200ms'")
            try:
                operator.execute(
                    "UPDATE users SET profile = profile || '{\"blocked\": true}' WHERE user_id = 'auth0|ann'"
                )
                operator_writes.append("written")
            except psycopg.errors.LockNotAvailable:
                operator_writes.append("waited for the batch's lock")
        return decide(*arguments)

    monkeypatch.setattr(pipeline_module, "decide", decide_while_an_operator_writes)
    renamed = user_event("updated", "evt_2", 20, "auth0|ann", nickname="annie")
    [[result]] = await pipeline.commit([Delivery("webhook", decode_body(encode(renamed)))])

    assert result == EventResult(id="evt_2", outcome=Outcome.APPLIED)
    assert operator_writes == ["written", "waited for the batch's lock"]
    [(profile, last_event_id)] = database.query("SELECT profile, last_event_id FROM users")
    assert profile == {
        "user_id": "auth0|ann",
        "email": "ann@example.com",
        "blocked": True,
        "nickname": "annie",
    }
    assert last_event_id == "evt_2"


@pytest.mark.usefixtures("fault_in_apply_event")
def test_a_second_copy_of_an_event_whose_merge_raises_is_not_answered_duplicate() -> None:
    delivery = Delivery("webhook", decoded(MARKED, MARKED))

    decided = decide([(delivery, item) for item in delivery.items], frozenset(), {}, "soft")

    assert decided.writes.ledger == []
    assert decided.outcomes == [Outcome.DEAD_LETTERED, Outcome.DEAD_LETTERED]
