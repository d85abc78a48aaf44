"""SQL text, and the functions that run it on a pooled connection.

Every statement is literal and parameterised. A batch locks its users' rows with one statement, in
`user_id` order, so concurrent requests and replicas queue on each other instead of deadlocking; the
merge itself happens in `handlers.py` between the load and the save, inside the same transaction as the
ledger row that records the event, so an event is applied and recorded together or not at all.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import msgspec
from psycopg import AsyncConnection, AsyncCursor
from psycopg.types.json import Jsonb, set_json_dumps, set_json_loads
from psycopg_pool import AsyncConnectionPool

from relay.events import Event, OtherEvent, UserEvent
from relay.handlers import Outcome, UserState, apply_event, from_micros, version_of
from relay.settings import DeleteMode, Settings

if TYPE_CHECKING:
    from relay.backfill import SnapshotRow

Connection = AsyncConnection[Any]

# Claims every user of a batch in one statement, in user_id order: a user seen for the first time is
# inserted with the state its events give it, and a known user's row is locked without being written
# (`DO UPDATE … WHERE false` locks the row and changes nothing). Every batch, from any replica, takes its
# row locks in this one order, so concurrent batches queue on each other instead of deadlocking.
# Returns the users it inserted; the others are known, locked, and merged next.
CLAIM_USERS = """
INSERT INTO users (user_id, profile, merge_state, deleted_at, last_event_processed, last_event_id)
SELECT user_id, profile::jsonb, merge_state::jsonb, deleted_at, last_event_processed, last_event_id
  FROM unnest(%(user_ids)b::text[], %(profiles)b::text[], %(merge_states)b::text[],
              %(deleted_ats)b::timestamptz[], %(last_event_times)b::timestamptz[], %(last_event_ids)b::text[])
       AS batch(user_id, profile, merge_state, deleted_at, last_event_processed, last_event_id)
 ORDER BY user_id
ON CONFLICT (user_id) DO UPDATE SET user_id = EXCLUDED.user_id WHERE false
RETURNING user_id
"""

# The known users of a batch, already locked by CLAIM_USERS (or its backfill twin).
READ_USERS = """
SELECT user_id, profile, merge_state, deleted_at
  FROM users
 WHERE user_id = ANY(%(user_ids)b::text[])
"""

# One statement for the whole batch. The arrays are sent in binary (`%(…)b`): no quoting or escaping of the
# JSON inside them, so each row costs one JSON encoding and nothing more.
UPDATE_USERS = """
UPDATE users
   SET profile = batch.profile::jsonb,
       merge_state = batch.merge_state::jsonb,
       deleted_at = batch.deleted_at,
       last_event_processed = batch.last_event_processed,
       last_event_id = batch.last_event_id
  FROM unnest(%(user_ids)b::text[], %(profiles)b::text[], %(merge_states)b::text[],
              %(deleted_ats)b::timestamptz[], %(last_event_times)b::timestamptz[], %(last_event_ids)b::text[])
       AS batch(user_id, profile, merge_state, deleted_at, last_event_processed, last_event_id)
 WHERE users.user_id = batch.user_id
"""

# Before locking anything: which events are already in the ledger, and which users already have a row (rows
# are never deleted, so a user known here is known when CLAIM_USERS runs; the caller copes if not).
FIND_PROCESSED_AND_KNOWN = """
SELECT 'event', event_id FROM processed_events WHERE event_id = ANY(%(event_ids)b::text[])
UNION ALL
SELECT 'user', user_id FROM users WHERE user_id = ANY(%(user_ids)b::text[])
"""

# Returns the ids it recorded; an id missing from the answer was recorded concurrently: a duplicate.
RECORD_EVENTS = """
INSERT INTO processed_events (event_id, event_type, user_id, event_time, outcome)
SELECT * FROM unnest(%(event_ids)b::text[], %(event_types)b::text[], %(user_ids)b::text[],
                     %(event_times)b::timestamptz[], %(outcomes)b::text[])
 ORDER BY 1
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id
"""

RECORD_DEAD_LETTER = """
INSERT INTO dead_letters (route, body, headers, error)
VALUES (%(route)s, %(body)s, %(headers)s, %(error)s)
RETURNING id
"""

# Backfill: a chunk of export rows is staged with COPY, then merged under the same lock order as events.
CREATE_BACKFILL_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS backfill_rows (
    user_id              text PRIMARY KEY,
    profile              jsonb NOT NULL,
    merge_state          jsonb NOT NULL,
    last_event_processed timestamptz NOT NULL
) ON COMMIT DELETE ROWS
"""

COPY_BACKFILL_ROWS = """
COPY backfill_rows (user_id, profile, merge_state, last_event_processed) FROM STDIN
"""

# The backfill's CLAIM_USERS: the same single statement and order, over the staged rows.
CLAIM_BACKFILLED_USERS = """
INSERT INTO users (user_id, profile, merge_state, last_event_processed, last_event_id)
SELECT b.user_id, b.profile, b.merge_state, b.last_event_processed, %(version_id)s
  FROM backfill_rows b
 ORDER BY b.user_id
ON CONFLICT (user_id) DO UPDATE SET user_id = EXCLUDED.user_id WHERE false
RETURNING user_id
"""

# `relay verify` watches one user's row appear, change and become a tombstone.
FIND_USER = """
SELECT name, deleted_at FROM users WHERE user_id = %(user_id)s
"""

CHECK_READY = """
SELECT coalesce(max(version), 0) FROM schema_migrations
"""


def _dump_json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


async def _configure(conn: Connection) -> None:
    # msgspec reads and writes the JSON columns several times faster than the standard library.
    set_json_dumps(_dump_json, context=conn)
    set_json_loads(msgspec.json.decode, context=conn)


# A connection back in use within this many seconds is trusted without a round trip to check it.
_TRUSTED_IDLE_SECONDS = 1.0
_returned_at: weakref.WeakKeyDictionary[Connection, float] = weakref.WeakKeyDictionary()


async def _note_returned(conn: Connection) -> None:
    _returned_at[conn] = time.monotonic()


async def _check_if_idle(conn: Connection) -> None:
    """Replaces a connection that died while idle (PostgreSQL restarted) before a batch gets it, instead of
    failing that batch; one that was in use a moment ago is not worth a round trip under load."""
    if time.monotonic() - _returned_at.get(conn, 0.0) > _TRUSTED_IDLE_SECONDS:
        await AsyncConnectionPool.check_connection(conn)


def connection_options(settings: Settings) -> dict[str, Any]:
    """libpq options for every relay connection: the relay's schema first on the search path."""
    # db_schema is validated as a plain identifier, so it is safe inside the options string.
    return {"options": f"-c search_path={settings.db_schema}", "connect_timeout": 5, "autocommit": True}


def create_pool(conninfo: str, settings: Settings) -> AsyncConnectionPool[Connection]:
    return AsyncConnectionPool(
        conninfo,
        open=False,
        min_size=1,
        max_size=settings.pool_size,
        timeout=settings.db_timeout_seconds,
        check=_check_if_idle,
        reset=_note_returned,
        kwargs=connection_options(settings),
        configure=_configure,
        name="relay",
    )


async def apply_events(conn: Connection, events: Sequence[Event], delete_mode: DeleteMode) -> list[Outcome]:
    """Applies a batch of decoded events in one transaction; returns an outcome per event, in order."""
    outcomes: list[Outcome | None] = [None] * len(events)
    first_index: dict[str, int] = {}
    for index, event in enumerate(events):
        if event.id in first_index:
            outcomes[index] = Outcome.DUPLICATE
        else:
            first_index[event.id] = index
    fresh = [(index, events[index]) for index in first_index.values()]

    async with conn.transaction(), conn.cursor() as cursor:
        event_ids = [event.id for _, event in fresh]
        user_ids = sorted({event.user_id for _, event in fresh if isinstance(event, UserEvent)})
        await cursor.execute(FIND_PROCESSED_AND_KNOWN, {"event_ids": event_ids, "user_ids": user_ids})
        found = await cursor.fetchall()
        already_processed = {key for kind, key in found if kind == "event"}
        known_before = {key for kind, key in found if kind == "user"}
        # Version order within the batch, so outcomes read as they would had the events come one by one.
        by_user: dict[str, list[tuple[int, UserEvent]]] = {}
        for index, event in sorted(fresh, key=lambda item: _sort_key(item[1])):
            if event.id in already_processed:
                outcomes[index] = Outcome.DUPLICATE
            elif isinstance(event, OtherEvent):
                outcomes[index] = Outcome.TEST if event.is_test else Outcome.IGNORED
            else:
                by_user.setdefault(event.user_id, []).append((index, event))

        if by_user:
            # A new user is inserted with the state its events give it; a known one only needs its row
            # locked, so it is sent as an empty placeholder that CLAIM_USERS never writes.
            claimed = (
                UserState(user_id)
                if user_id in known_before
                else _merge(UserState(user_id), by_user[user_id], outcomes, delete_mode)
                for user_id in sorted(by_user)
            )
            await cursor.execute(CLAIM_USERS, _user_columns(claimed))
            inserted = {row[0] for row in await cursor.fetchall()}
            known = await _read_users(cursor, sorted(by_user.keys() - inserted))
            # A placeholder was inserted only if the row vanished in between (removed by hand): merge onto it.
            known |= {user_id: UserState(user_id) for user_id in inserted & known_before}
            if known:
                merged = (
                    _merge(state, by_user[user_id], outcomes, delete_mode) for user_id, state in known.items()
                )
                await cursor.execute(UPDATE_USERS, _user_columns(merged))

        to_record = [(index, event) for index, event in fresh if outcomes[index] is not Outcome.DUPLICATE]
        if to_record:
            await cursor.execute(RECORD_EVENTS, _ledger_rows(to_record, outcomes))
            recorded = {row[0] for row in await cursor.fetchall()}
            for index, event in to_record:
                if event.id not in recorded:
                    outcomes[index] = Outcome.DUPLICATE

    return [outcome if outcome is not None else Outcome.DUPLICATE for outcome in outcomes]


@dataclass
class SnapshotCounts:
    inserted: int = 0
    merged: int = 0
    stale: int = 0


async def merge_snapshots(
    conn: Connection, rows: Sequence[SnapshotRow], delete_mode: DeleteMode
) -> SnapshotCounts:
    """Merges export rows (at most one per user) in one transaction: COPY to staging, then merge."""
    by_user = {row.user_id: row for row in rows}
    counts = SnapshotCounts()
    async with conn.transaction(), conn.cursor() as cursor:
        await cursor.execute(CREATE_BACKFILL_STAGING)
        async with cursor.copy(COPY_BACKFILL_ROWS) as copy:
            for row in rows:
                state = row.new_user_state()
                await copy.write_row(
                    (
                        row.user_id,
                        row.line.decode(),
                        _dump_json(state.to_merge_state()),
                        from_micros(row.version_us),
                    )
                )
        await cursor.execute(CLAIM_BACKFILLED_USERS, {"version_id": rows[0].as_event().id if rows else ""})
        inserted = {row[0] for row in await cursor.fetchall()}
        counts.inserted = len(inserted)
        stored = await _read_users(cursor, sorted(by_user.keys() - inserted))
        for user_id, state in stored.items():
            outcome = apply_event(state, by_user[user_id].as_event(), delete_mode)
            if outcome is Outcome.STALE:
                counts.stale += 1
            else:
                counts.merged += 1
        if stored:
            await cursor.execute(UPDATE_USERS, _user_columns(stored.values()))
    return counts


async def _read_users(cursor: AsyncCursor[Any], user_ids: list[str]) -> dict[str, UserState]:
    if not user_ids:
        return {}
    await cursor.execute(READ_USERS, {"user_ids": user_ids})
    return {
        user_id: UserState.from_stored(user_id, profile, merge_state, deleted_at)
        for user_id, profile, merge_state, deleted_at in await cursor.fetchall()
    }


def _merge(
    state: UserState,
    user_events: list[tuple[int, UserEvent]],
    outcomes: list[Outcome | None],
    delete_mode: DeleteMode,
) -> UserState:
    for index, event in user_events:
        outcomes[index] = apply_event(state, event, delete_mode)
    return state


async def record_dead_letter(
    conn: Connection, route: str, body: bytes, headers: Mapping[str, str], error: str
) -> int:
    async with conn.transaction(), conn.cursor() as cursor:
        await cursor.execute(
            RECORD_DEAD_LETTER,
            {"route": route, "body": body, "headers": Jsonb(dict(headers)), "error": error},
        )
        row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


async def migrated_version(conn: Connection) -> int:
    async with conn.cursor() as cursor:
        await cursor.execute(CHECK_READY)
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


def _sort_key(event: Event) -> tuple[int, str]:
    return version_of(event) if isinstance(event, UserEvent) else (0, event.id)


def _user_columns(states: Iterable[UserState]) -> dict[str, list[Any]]:
    columns: dict[str, list[Any]] = {
        "user_ids": [],
        "profiles": [],
        "merge_states": [],
        "deleted_ats": [],
        "last_event_times": [],
        "last_event_ids": [],
    }
    for state in states:
        last = state.last_version
        columns["user_ids"].append(state.user_id)
        columns["profiles"].append(_dump_json(state.profile))
        columns["merge_states"].append(_dump_json(state.to_merge_state()))
        columns["deleted_ats"].append(state.deleted_at)
        columns["last_event_times"].append(from_micros(last[0]) if last else None)
        columns["last_event_ids"].append(last[1] if last else None)
    return columns


def _ledger_rows(
    recorded: Iterable[tuple[int, Event]], outcomes: Sequence[Outcome | None]
) -> dict[str, list[Any]]:
    columns: dict[str, list[Any]] = {
        "event_ids": [],
        "event_types": [],
        "user_ids": [],
        "event_times": [],
        "outcomes": [],
    }
    for index, event in recorded:
        columns["event_ids"].append(event.id)
        columns["event_types"].append(event.kind.value if isinstance(event, UserEvent) else event.type)
        columns["user_ids"].append(event.user_id)
        columns["event_times"].append(event.time)
        columns["outcomes"].append(str(outcomes[index]))
    return columns


# Dead letters: listed, shown, replayed and resolved by `relay dead-letters`; retention by `relay prune`.


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    route: str
    body: bytes
    headers: dict[str, str]
    error: str
    received_at: datetime
    resolved_at: datetime | None


@dataclass(frozen=True, slots=True)
class DeadLetterSummary:
    id: int
    route: str
    body_size: int
    error: str
    received_at: datetime
    resolved_at: datetime | None


LIST_DEAD_LETTERS = """
SELECT id, route, octet_length(body), error, received_at, resolved_at
  FROM dead_letters
 WHERE resolved_at IS NULL OR %(include_resolved)s
 ORDER BY id
 LIMIT %(limit)s
"""

COUNT_DEAD_LETTERS = """
SELECT count(*) FROM dead_letters WHERE resolved_at IS NULL OR %(include_resolved)s
"""

FIND_DEAD_LETTER = """
SELECT id, route, body, headers, error, received_at, resolved_at FROM dead_letters WHERE id = %(id)s
"""

# Keyset pages, so replaying every unresolved dead letter never holds all their bodies at once.
NEXT_UNRESOLVED_DEAD_LETTERS = """
SELECT id FROM dead_letters WHERE resolved_at IS NULL AND id > %(after)s ORDER BY id LIMIT %(limit)s
"""

RESOLVE_DEAD_LETTER = """
UPDATE dead_letters SET resolved_at = now() WHERE id = %(id)s AND resolved_at IS NULL RETURNING id
"""

# A replay that fails again says so on the dead letter it replayed, rather than keeping the body twice.
RECORD_REPLAY_FAILURE = """
UPDATE dead_letters SET error = %(error)s WHERE id = %(id)s RETURNING id
"""

PRUNE_CUTOFF = """
SELECT now() - %(age)s::interval
"""

# Retention deletes in small batches, each its own short transaction, so no lock is held for long. Tombstones
# in `users` are never pruned: they are what keeps a late, older event from bringing a deleted user back.
PRUNE_PROCESSED_EVENTS = """
DELETE FROM processed_events
 WHERE event_id IN (SELECT event_id FROM processed_events WHERE received_at < %(cutoff)s LIMIT %(limit)s)
"""

PRUNE_RESOLVED_DEAD_LETTERS = """
DELETE FROM dead_letters
 WHERE id IN (SELECT id FROM dead_letters WHERE resolved_at < %(cutoff)s LIMIT %(limit)s)
"""


def _dead_letter(row: Sequence[Any]) -> DeadLetter:
    letter_id, route, body, headers, error, received_at, resolved_at = row
    return DeadLetter(int(letter_id), route, bytes(body), dict(headers), error, received_at, resolved_at)


async def list_dead_letters(
    conn: Connection, *, include_resolved: bool, limit: int
) -> list[DeadLetterSummary]:
    async with conn.cursor() as cursor:
        await cursor.execute(LIST_DEAD_LETTERS, {"include_resolved": include_resolved, "limit": limit})
        return [DeadLetterSummary(*row) for row in await cursor.fetchall()]


async def count_dead_letters(conn: Connection, *, include_resolved: bool) -> int:
    async with conn.cursor() as cursor:
        await cursor.execute(COUNT_DEAD_LETTERS, {"include_resolved": include_resolved})
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def find_dead_letter(conn: Connection, letter_id: int) -> DeadLetter | None:
    async with conn.cursor() as cursor:
        await cursor.execute(FIND_DEAD_LETTER, {"id": letter_id})
        row = await cursor.fetchone()
    return _dead_letter(row) if row else None


async def next_unresolved_dead_letters(conn: Connection, *, after: int, limit: int) -> list[int]:
    async with conn.cursor() as cursor:
        await cursor.execute(NEXT_UNRESOLVED_DEAD_LETTERS, {"after": after, "limit": limit})
        return [int(row[0]) for row in await cursor.fetchall()]


async def resolve_dead_letter(conn: Connection, letter_id: int) -> bool:
    """Marks a dead letter resolved; False when it was resolved already (or does not exist)."""
    async with conn.transaction(), conn.cursor() as cursor:
        await cursor.execute(RESOLVE_DEAD_LETTER, {"id": letter_id})
        return await cursor.fetchone() is not None


async def record_replay_failure(conn: Connection, letter_id: int, error: str) -> int:
    async with conn.transaction(), conn.cursor() as cursor:
        await cursor.execute(RECORD_REPLAY_FAILURE, {"id": letter_id, "error": error})
        row = await cursor.fetchone()
    if row is None:
        raise LookupError(f"dead letter {letter_id} no longer exists")
    return int(row[0])


async def prune_cutoff(conn: Connection, age: timedelta) -> datetime:
    """The database's now minus `age`: the one clock every replica and the ledger's timestamps share."""
    async with conn.cursor() as cursor:
        await cursor.execute(PRUNE_CUTOFF, {"age": age})
        row = await cursor.fetchone()
    assert row is not None
    cutoff: datetime = row[0]
    return cutoff


async def prune_processed_events(conn: Connection, cutoff: datetime, limit: int) -> int:
    """Deletes up to `limit` ledger rows received before `cutoff`; returns how many."""
    async with conn.transaction(), conn.cursor() as cursor:
        await cursor.execute(PRUNE_PROCESSED_EVENTS, {"cutoff": cutoff, "limit": limit})
        return cursor.rowcount


async def prune_resolved_dead_letters(conn: Connection, cutoff: datetime, limit: int) -> int:
    """Deletes up to `limit` dead letters resolved before `cutoff`; returns how many."""
    async with conn.transaction(), conn.cursor() as cursor:
        await cursor.execute(PRUNE_RESOLVED_DEAD_LETTERS, {"cutoff": cutoff, "limit": limit})
        return cursor.rowcount


# Catch-up cursor

READ_CURSOR = """
SELECT cursor FROM event_cursors WHERE stream = %(stream)s
"""

SAVE_CURSOR = """
INSERT INTO event_cursors (stream, cursor) VALUES (%(stream)s, %(cursor)s)
ON CONFLICT (stream) DO UPDATE SET cursor = EXCLUDED.cursor, updated_at = now()
"""


async def read_cursor(conn: Connection, stream: str) -> str | None:
    """Where `relay catch-up` stopped reading `stream`, if it has read it before."""
    async with conn.cursor() as cursor:
        await cursor.execute(READ_CURSOR, {"stream": stream})
        row = await cursor.fetchone()
    return str(row[0]) if row else None


async def save_cursor(conn: Connection, stream: str, position: str) -> None:
    async with conn.transaction():
        await conn.execute(SAVE_CURSOR, {"stream": stream, "cursor": position})
