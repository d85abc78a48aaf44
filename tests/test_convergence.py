"""Promise 2: the copy converges whatever the delivery order and duplicates.

Random histories (creates, full and partial updates, deletes, re-creates, equal timestamps, test events) are
delivered in random order with random duplicates, through the pure handlers and through the real pipeline
and store, with several concurrent commits touching the same users, and the result must equal the reference
model in `tests/support/reference.py`.
"""

from __future__ import annotations

import asyncio
import secrets
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.events import UserEvent, decode_body, decode_event
from relay.handlers import UserState, apply_event
from relay.pipeline import Delivery, Pipeline
from relay.store import Pool
from tests.support.database import Database
from tests.support.events import BASE_TIME, encode, user_event
from tests.support.properties import PURE, THROUGH_POSTGRESQL
from tests.support.reference import Spec, assert_copy_matches, deliveries, reference_copy, to_cloudevents


@PURE
@given(deliveries(), st.sampled_from(["soft", "scrub"]))
def test_pure_handlers_converge_in_any_order(
    delivery: tuple[list[Spec], list[int]], delete_mode: Any
) -> None:
    history, order = delivery
    events = to_cloudevents(history, "p")
    states: dict[str, UserState] = {}
    applied: set[str] = set()
    for index in order:
        event = decode_event(encode(events[index]))
        if not isinstance(event, UserEvent) or event.id in applied:
            continue
        applied.add(event.id)
        apply_event(states.setdefault(event.user_id, UserState(event.user_id)), event, delete_mode)

    expected = reference_copy(events, delete_mode=delete_mode)
    assert set(states) == set(expected)
    for user_id, want in expected.items():
        got = states[user_id]
        assert got.profile == want.profile, user_id
        assert got.deleted_at == want.deleted_at, user_id
        assert want.last_version is not None and got.last_version is not None
        assert got.last_version[1] == want.last_version[1], user_id


def as_deliveries(events: list[dict[str, Any]], order: list[int]) -> list[Delivery]:
    """One delivery per arrival, as Auth0 posts them: a signed body of one event each."""
    return [Delivery("action", decode_body(encode(events[index]))) for index in order]


@pytest.mark.anyio
@THROUGH_POSTGRESQL
@given(
    delivery=deliveries(),
    delete_mode=st.sampled_from(["soft", "scrub"]),
    lanes=st.integers(1, 4),
    batch_size=st.integers(1, 4),
)
async def test_concurrent_commits_converge(
    pool: Pool,
    database: Database,
    delivery: tuple[list[Spec], list[int]],
    delete_mode: Any,
    lanes: int,
    batch_size: int,
) -> None:
    """Several lanes commit batches of deliveries at once through `Pipeline.commit`; batches that read a
    user another lane changes before they write are run again (the xmin check), never merged twice."""
    history, order = delivery
    prefix = secrets.token_hex(4)  # fresh users and ids for every example in the shared schema
    events = to_cloudevents(history, prefix)
    pipeline = Pipeline(pool, database.with_settings(delete_mode=delete_mode))
    arrivals = as_deliveries(events, order)

    async def commit(lane: list[Delivery]) -> None:
        for start in range(0, len(lane), batch_size):
            batch = lane[start : start + batch_size]
            assert [len(answers) for answers in await pipeline.commit(batch)] == [1] * len(batch)

    await asyncio.gather(*(commit(arrivals[lane::lanes]) for lane in range(lanes)))
    assert_copy_matches(database, events, prefix, delete_mode=delete_mode)


@pytest.mark.anyio
@THROUGH_POSTGRESQL
@given(
    delivery=deliveries(),
    delete_mode=st.sampled_from(["soft", "scrub"]),
    max_events=st.integers(1, 6),
    max_wait_ms=st.sampled_from([0.0, 1.0]),
    flushers=st.integers(1, 3),
)
async def test_group_commit_converges_with_concurrent_requests(
    pool: Pool,
    database: Database,
    delivery: tuple[list[Spec], list[int]],
    delete_mode: Any,
    max_events: int,
    max_wait_ms: float,
    flushers: int,
) -> None:
    """Every delivery is its own concurrent request, as when Auth0 posts them in parallel, through the group
    committer the HTTP routes use."""
    history, order = delivery
    prefix = secrets.token_hex(4)
    events = to_cloudevents(history, prefix)
    settings = database.with_settings(
        delete_mode=delete_mode,
        batch_max_events=max_events,
        batch_max_wait_ms=max_wait_ms,
        batch_flushers=flushers,
        queue_max_events=1000,
    )
    pipeline = Pipeline(pool, settings)
    pipeline.start()
    try:
        answers = await asyncio.gather(
            *(pipeline.deliver(arrival) for arrival in as_deliveries(events, order))
        )
    finally:
        await pipeline.close()

    assert [len(answer) for answer in answers] == [1] * len(order)
    assert_copy_matches(database, events, prefix, delete_mode=delete_mode)


# ---------------------------------------------------------------------------------------------------------
# The rules one by one, each through the pipeline


def fixed_user(event_id: str, kind: str, millis: int, **fields: Any) -> bytes:
    """An event for the one user these tests follow, as sent."""
    return encode(user_event(kind, event_id, millis, "auth0|fixed", **fields))


async def commit_in_order(pipeline: Pipeline, bodies: list[bytes]) -> list[str]:
    """Each body committed on its own, one after the other; the outcomes."""
    outcomes = []
    for body in bodies:
        [results] = await pipeline.commit([Delivery("webhook", decode_body(body))])
        outcomes += [result.outcome.value for result in results]
    return outcomes


@pytest.mark.anyio
async def test_equal_times_are_broken_by_event_id(pipeline: Pipeline, database: Database) -> None:
    later_id = fixed_user("evt_b", "updated", 5, name="from b")
    earlier_id = fixed_user("evt_a", "updated", 5, name="from a")
    assert await commit_in_order(pipeline, [later_id, earlier_id]) == ["applied", "stale"]
    assert database.query("SELECT name, last_event_id FROM users") == [("from b", "evt_b")]


@pytest.mark.anyio
async def test_late_older_update_does_not_revive_a_deleted_user(
    pipeline: Pipeline, database: Database
) -> None:
    outcomes = await commit_in_order(
        pipeline,
        [
            fixed_user("evt_2", "deleted", 20),
            fixed_user("evt_1", "updated", 10, email="old@example.com"),
            fixed_user("evt_0", "created", 0, email="first@example.com"),
        ],
    )
    assert outcomes == ["tombstoned", "stale", "stale"]
    [(deleted_at, live)] = database.query("SELECT deleted_at, (SELECT count(*) FROM live_users) FROM users")
    assert deleted_at == BASE_TIME + timedelta(milliseconds=20)
    assert live == 0


@pytest.mark.anyio
async def test_newer_created_revives_a_tombstone(pipeline: Pipeline, database: Database) -> None:
    outcomes = await commit_in_order(
        pipeline,
        [fixed_user("evt_3", "created", 30, email="back@example.com"), fixed_user("evt_2", "deleted", 20)],
    )
    assert outcomes == ["applied", "stale"]
    assert database.query("SELECT email, deleted_at FROM live_users") == [("back@example.com", None)]


@pytest.mark.anyio
async def test_scrub_mode_clears_personal_fields_but_keeps_the_tombstone(
    pool: Pool, database: Database
) -> None:
    pipeline = Pipeline(pool, database.with_settings(delete_mode="scrub"))
    await commit_in_order(
        pipeline,
        [
            fixed_user("evt_1", "updated", 10, email="jane@example.com", name="Jane", app_metadata={"a": 1}),
            fixed_user("evt_2", "deleted", 20, deleted_at="2025-01-01T00:00:00.000Z"),
        ],
    )
    [(email, name, app_metadata, profile, deleted_at)] = database.query(
        "SELECT email, name, app_metadata, profile, deleted_at FROM users"
    )
    assert (email, name, app_metadata) == (None, None, None)
    assert profile == {"user_id": "auth0|fixed", "deleted_at": "2025-01-01T00:00:00.000Z"}
    assert deleted_at == BASE_TIME


@pytest.mark.anyio
async def test_partial_update_arriving_late_still_fills_fields_no_newer_event_wrote(
    pipeline: Pipeline, database: Database
) -> None:
    await commit_in_order(
        pipeline,
        [
            fixed_user("evt_2", "updated", 20, name="newer name"),
            fixed_user("evt_1", "updated", 10, name="older name", nickname="nick"),
        ],
    )
    assert database.query("SELECT name, nickname, last_event_id FROM users") == [
        ("newer name", "nick", "evt_2")
    ]


@pytest.mark.anyio
async def test_one_batch_holding_a_whole_history_in_reverse_reads_as_one_by_one(
    pipeline: Pipeline, database: Database
) -> None:
    """Within a batch, outcomes are decided in version order, whatever order the deliveries came in."""
    bodies = [
        fixed_user("evt_3", "deleted", 30),
        fixed_user("evt_2", "updated", 20, name="renamed"),
        fixed_user("evt_1", "created", 10, name="first"),
        fixed_user("evt_2", "updated", 20, name="renamed"),
    ]
    results = await pipeline.commit([Delivery("webhook", decode_body(body)) for body in bodies])

    assert [[result.outcome.value for result in answers] for answers in results] == [
        ["tombstoned"],
        ["applied"],
        ["applied"],
        ["duplicate"],
    ]
    assert database.query("SELECT name, deleted_at IS NOT NULL, last_event_id FROM users") == [
        ("renamed", True, "evt_3")
    ]
