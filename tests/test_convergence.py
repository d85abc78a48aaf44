"""Promise 2: the copy converges whatever the delivery order and duplicates.

The reference below applies each user's events one by one in version order, written as plainly as the
promise reads. Random histories (creates, full and partial updates, deletes, re-creates, equal timestamps,
test events) are then delivered in random order with random duplicates, through the pure handlers and
through the real store with several concurrent connections, and the result must equal the reference.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.batching import GroupCommitter
from relay.events import SNAPSHOT_FIELDS, decode_event
from relay.handlers import SCRUB_KEPT_FIELDS, UserState, apply_event
from relay.store import apply_events

BASE_TIME = datetime(2025, 1, 1, tzinfo=UTC)
OPTIONAL_FIELDS = ("email", "name", "nickname", "logins_count", "blocked", "app_metadata", "custom_field")
DB_EXAMPLES = 200 if os.environ.get("CI") else 40
# Examples run against real PostgreSQL share one migrated schema (each uses fresh users and ids).
through_postgresql = settings(
    max_examples=DB_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass(frozen=True)
class Spec:
    """One generated event before it is given ids: kind, time offset, and the fields it carries."""

    kind: str  # created | updated | deleted | test
    user: int
    millis: int
    fields: dict[str, Any]
    snapshot: bool


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


field_values = {
    "email": st.sampled_from(["a@example.com", "B@Example.com", "c@example.org"]),
    "name": st.sampled_from(["Ann", "Bo", "Zoë"]),
    "nickname": st.sampled_from(["ann", "bo"]),
    "logins_count": st.integers(0, 5),
    "blocked": st.booleans(),
    "app_metadata": st.sampled_from([{}, {"plan": "pro"}, {"plan": "free", "seats": 3}]),
    "custom_field": st.sampled_from(["x", "y"]),
}


@st.composite
def event_specs(draw: st.DrawFn) -> Spec:
    kind = draw(st.sampled_from(["created", "updated", "updated", "deleted", "test"]))
    user = draw(st.integers(0, 2))
    millis = draw(st.integers(0, 6))  # a small range, so equal timestamps are common
    chosen = draw(st.lists(st.sampled_from(OPTIONAL_FIELDS), unique=True, max_size=len(OPTIONAL_FIELDS)))
    fields = {name: draw(field_values[name]) for name in chosen}
    snapshot = kind != "deleted" and draw(st.booleans())
    if snapshot:
        fields["identities"] = [{"provider": "auth0", "connection": "db", "user_id": str(user)}]
        fields["created_at"] = iso(BASE_TIME)
        fields["updated_at"] = iso(BASE_TIME + timedelta(milliseconds=millis))
    elif kind == "deleted" and draw(st.booleans()):
        fields = {"deleted_at": iso(BASE_TIME + timedelta(milliseconds=millis, microseconds=500))}
    elif draw(st.booleans()):
        fields["updated_at"] = iso(BASE_TIME + timedelta(milliseconds=millis))
    return Spec(kind, user, millis, fields, snapshot)


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[list[Spec], list[int]]:
    """A history, and the order it is delivered in: a permutation with duplicates."""
    history = draw(st.lists(event_specs(), min_size=1, max_size=14))
    order = draw(st.permutations(range(len(history))))
    duplicates = draw(st.lists(st.integers(0, len(history) - 1), max_size=5))
    positions = draw(st.lists(st.integers(0, len(order)), min_size=len(duplicates), max_size=len(duplicates)))
    delivered = list(order)
    for event_index, position in zip(duplicates, positions, strict=True):
        delivered.insert(position, event_index)
    return history, delivered


def to_cloudevents(history: list[Spec], prefix: str) -> list[dict[str, Any]]:
    """Gives each spec an id and turns it into the CloudEvent Auth0 would send."""
    events = []
    for number, spec in enumerate(history):
        user_id = f"auth0|{prefix}-{spec.user}"
        envelope: dict[str, Any] = {
            "specversion": "1.0",
            # Ids are drawn at random so that equal times are broken in no particular pattern.
            "id": f"evt_{prefix}{secrets.token_hex(4)}{number:03d}",
            "type": "user.created" if spec.kind == "test" else f"user.{spec.kind}",
            "time": iso(BASE_TIME + timedelta(milliseconds=spec.millis)),
            "data": {"object": {"user_id": user_id, **spec.fields}},
        }
        if spec.kind == "test":
            envelope["a0purpose"] = "test"
        events.append(envelope)
    return events


def expected_users(events: list[dict[str, Any]], delete_mode: str) -> dict[str, dict[str, Any]]:
    """Each user's events, once each, in version order: the state the promise says must result."""
    expected: dict[str, dict[str, Any]] = {}
    ordered = sorted((e for e in events if e.get("a0purpose") != "test"), key=lambda e: (e["time"], e["id"]))
    for event in ordered:
        user_object = event["data"]["object"]
        user = expected.setdefault(user_object["user_id"], {"profile": {}, "deleted_at": None})
        kind = event["type"]
        is_snapshot = all(name in user_object for name in SNAPSHOT_FIELDS)
        if kind == "user.deleted":
            user["deleted_at"] = user_object.get("deleted_at", event["time"])
            if delete_mode == "scrub":
                user["profile"] = {k: v for k, v in user_object.items() if k in SCRUB_KEPT_FIELDS}
            else:
                user["profile"] = {**user["profile"], **user_object}
        else:
            if kind == "user.created":
                user["deleted_at"] = None
            user["profile"] = dict(user_object) if is_snapshot else {**user["profile"], **user_object}
        user["last_event"] = (event["time"], event["id"])
    return expected


def parse_time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


@settings(max_examples=600, deadline=None)
@given(deliveries(), st.sampled_from(["soft", "scrub"]))
def test_pure_handlers_converge_in_any_order(
    delivery: tuple[list[Spec], list[int]], delete_mode: str
) -> None:
    history, order = delivery
    events = to_cloudevents(history, "p")
    states: dict[str, UserState] = {}
    applied: set[str] = set()
    for index in order:
        event = decode_event(json.dumps(events[index]).encode())
        if event.id in applied or not hasattr(event, "kind"):
            continue
        applied.add(event.id)
        state = states.setdefault(event.user_id, UserState(event.user_id))
        apply_event(state, event, delete_mode)  # type: ignore[arg-type]

    expected = expected_users(events, delete_mode)
    assert set(states) == set(expected)
    for user_id, want in expected.items():
        got = states[user_id]
        assert got.profile == want["profile"], user_id
        assert got.deleted_at == parse_time(want["deleted_at"])
        assert got.last_version is not None
        assert got.last_version[1] == want["last_event"][1]


@pytest.mark.anyio
@through_postgresql
@given(
    delivery=deliveries(),
    delete_mode=st.sampled_from(["soft", "scrub"]),
    connections=st.integers(1, 4),
    batch_size=st.integers(1, 4),
)
async def test_store_converges_with_concurrent_connections(
    pool: Any,
    database: Any,
    delivery: tuple[list[Spec], list[int]],
    delete_mode: str,
    connections: int,
    batch_size: int,
) -> None:
    history, order = delivery
    prefix = secrets.token_hex(4)  # fresh users and ids for every example in the shared schema
    events = to_cloudevents(history, prefix)
    decoded = [decode_event(json.dumps(events[index]).encode()) for index in order]

    # Deal the deliveries round-robin to concurrent workers, each on its own connection, in batches.
    lanes = [decoded[lane::connections] for lane in range(connections)]

    async def deliver(lane: list[Any]) -> None:
        for start in range(0, len(lane), batch_size):
            async with pool.connection() as conn:
                await apply_events(conn, lane[start : start + batch_size], delete_mode)

    await asyncio.gather(*(deliver(lane) for lane in lanes))
    assert_copy_matches(database, events, prefix, delete_mode, len(history))


@pytest.mark.anyio
@through_postgresql
@given(
    delivery=deliveries(),
    delete_mode=st.sampled_from(["soft", "scrub"]),
    max_events=st.integers(1, 6),
    max_wait_ms=st.sampled_from([0.0, 1.0]),
    flushers=st.integers(1, 3),
)
async def test_group_commit_converges_with_concurrent_requests(
    pool: Any,
    database: Any,
    delivery: tuple[list[Spec], list[int]],
    delete_mode: Any,
    max_events: int,
    max_wait_ms: float,
    flushers: int,
) -> None:
    history, order = delivery
    prefix = secrets.token_hex(4)
    events = to_cloudevents(history, prefix)
    committer = GroupCommitter(
        pool,
        delete_mode,
        max_events=max_events,
        max_wait_seconds=max_wait_ms / 1000,
        max_queued_events=1000,
        flushers=flushers,
    )
    committer.start()
    # Every delivery is its own concurrent request, as when Auth0 posts them in parallel.
    requests = [committer.apply([decode_event(json.dumps(events[index]).encode())]) for index in order]
    answers = await asyncio.gather(*requests)
    await committer.close()
    assert all(len(answer) == 1 for answer in answers)
    assert_copy_matches(database, events, prefix, delete_mode, len(history))


def assert_copy_matches(
    database: Any, events: list[dict[str, Any]], prefix: str, delete_mode: str, event_count: int
) -> None:
    expected = expected_users(events, delete_mode)
    rows = database.query(
        "SELECT user_id, profile, deleted_at, last_event_processed, last_event_id, email "
        "FROM users WHERE user_id LIKE %s",
        [f"auth0|{prefix}-%"],
    )
    assert {row[0] for row in rows} == set(expected)
    for user_id, profile, deleted_at, last_time, last_id, email in rows:
        want = expected[user_id]
        assert profile == want["profile"], user_id
        assert deleted_at == parse_time(want["deleted_at"])
        assert (last_time, last_id) == (parse_time(want["last_event"][0]), want["last_event"][1])
        assert email == want["profile"].get("email")

    ledger = database.query(
        "SELECT count(*) FROM processed_events WHERE event_id LIKE %s", [f"evt_{prefix}%"]
    )
    assert ledger == [(event_count,)]


def cloudevent(event_id: str, kind: str, millis: int, **fields: Any) -> bytes:
    return json.dumps(
        {
            "specversion": "1.0",
            "id": event_id,
            "type": f"user.{kind}",
            "time": iso(BASE_TIME + timedelta(milliseconds=millis)),
            "data": {"object": {"user_id": "auth0|fixed", **fields}},
        }
    ).encode()


async def deliver_in_order(pool: Any, bodies: list[bytes], delete_mode: str = "soft") -> list[str]:
    outcomes = []
    for body in bodies:
        async with pool.connection() as conn:
            outcomes += [
                str(outcome) for outcome in await apply_events(conn, [decode_event(body)], delete_mode)
            ]
    return outcomes


@pytest.mark.anyio
async def test_equal_times_are_broken_by_event_id(pool: Any, database: Any) -> None:
    later_id = cloudevent("evt_b", "updated", 5, name="from b")
    earlier_id = cloudevent("evt_a", "updated", 5, name="from a")
    assert await deliver_in_order(pool, [later_id, earlier_id]) == ["applied", "stale"]
    assert database.query("SELECT name, last_event_id FROM users") == [("from b", "evt_b")]


@pytest.mark.anyio
async def test_late_older_update_does_not_revive_a_deleted_user(pool: Any, database: Any) -> None:
    outcomes = await deliver_in_order(
        pool,
        [
            cloudevent("evt_2", "deleted", 20),
            cloudevent("evt_1", "updated", 10, email="old@example.com"),
            cloudevent("evt_0", "created", 0, email="first@example.com"),
        ],
    )
    assert outcomes == ["tombstoned", "stale", "stale"]
    [(deleted_at, live)] = database.query("SELECT deleted_at, (SELECT count(*) FROM live_users) FROM users")
    assert deleted_at == BASE_TIME + timedelta(milliseconds=20)
    assert live == 0


@pytest.mark.anyio
async def test_newer_created_revives_a_tombstone(pool: Any, database: Any) -> None:
    outcomes = await deliver_in_order(
        pool,
        [
            cloudevent("evt_3", "created", 30, email="back@example.com"),
            cloudevent("evt_2", "deleted", 20),
        ],
    )
    assert outcomes == ["applied", "stale"]
    assert database.query("SELECT email, deleted_at FROM live_users") == [("back@example.com", None)]


@pytest.mark.anyio
async def test_scrub_mode_clears_personal_fields_but_keeps_the_tombstone(pool: Any, database: Any) -> None:
    await deliver_in_order(
        pool,
        [
            cloudevent("evt_1", "updated", 10, email="jane@example.com", name="Jane", app_metadata={"a": 1}),
            cloudevent("evt_2", "deleted", 20, deleted_at=iso(BASE_TIME)),
        ],
        delete_mode="scrub",
    )
    [(email, name, app_metadata, profile, deleted_at)] = database.query(
        "SELECT email, name, app_metadata, profile, deleted_at FROM users"
    )
    assert (email, name, app_metadata) == (None, None, None)
    assert profile == {"user_id": "auth0|fixed", "deleted_at": iso(BASE_TIME)}
    assert deleted_at == BASE_TIME


@pytest.mark.anyio
async def test_partial_update_arriving_late_still_fills_fields_no_newer_event_wrote(
    pool: Any, database: Any
) -> None:
    await deliver_in_order(
        pool,
        [
            cloudevent("evt_2", "updated", 20, name="newer name"),
            cloudevent("evt_1", "updated", 10, name="older name", nickname="nick"),
        ],
    )
    assert database.query("SELECT name, nickname, last_event_id FROM users") == [
        ("newer name", "nick", "evt_2")
    ]
