"""SQL text, the functions that run it on a pooled connection (or, for an operator command's checks, on a
connection of its own), and the store's own errors.

Every statement is literal and parameterised. A batch of live events costs two statements: one reads the
ledger and the batch's known users; then, once the caller has decided every event's fate from those facts,
one writes the new users, the changed users, the ledger rows and the dead letters, as one transaction. So an
event is applied, recorded, or kept as a dead letter together with its batch-mates, or not at all.

Nothing here lets a psycopg exception out: callers see `StoreUnavailable` (retry later), `NotMigrated` (an
operator must run `relay migrate`) or `Unstorable` (PostgreSQL refused the data itself; retrying cannot help).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

import msgspec
import psycopg
from psycopg import AsyncConnection, errors
from psycopg.types.json import set_json_dumps, set_json_loads
from psycopg_pool import AsyncConnectionPool, PoolTimeout, TooManyRequests

from relay.events import EventKind, UserEvent, from_micros
from relay.handlers import UserState
from relay.settings import Settings

Connection = AsyncConnection[Any]
Pool = AsyncConnectionPool[Connection]
T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger("relay.store")

# JSON in and out of PostgreSQL: Decimals (a profile's exact numbers, see relay.events) written as numbers.
_encode = msgspec.json.Encoder(decimal_format="number").encode
_decode_exactly = msgspec.json.Decoder(float_hook=Decimal).decode

# Attempts at work that PostgreSQL rolled back because of another writer (a deadlock victim, a user changed
# between a batch's read and its write, a new user inserted first by a concurrent batch); each attempt starts
# from fresh facts.
CONFLICT_ATTEMPTS = 5


class StoreError(Exception):
    """PostgreSQL could not do what was asked. The message names the cause, never a value or a password."""


class StoreUnavailable(StoreError):
    """PostgreSQL cannot be reached, or cannot take writes now: nothing was committed; retry later."""


class NotMigrated(StoreError):
    """The relay's tables are missing or behind this version: run `relay migrate`."""


class Unstorable(StoreError):
    """PostgreSQL refused the data itself (a value out of range, a malformed time): retrying cannot help.
    The message is PostgreSQL's primary message alone: its DETAIL and CONTEXT can quote other rows' data."""


def _store_error(error: psycopg.Error) -> StoreError:
    sqlstate = error.sqlstate or ""
    # Only the primary message: its DETAIL and CONTEXT lines can quote the values of a whole batch.
    primary = error.diag.message_primary or type(error).__name__
    if isinstance(
        error,
        errors.UndefinedTable | errors.UndefinedColumn | errors.UndefinedFunction | errors.InvalidSchemaName,
    ):
        return NotMigrated(f"the relay's tables are missing or behind ({primary}): run `relay migrate`")
    if isinstance(error, psycopg.DataError | psycopg.IntegrityError) or sqlstate[:2] in ("22", "54"):
        return Unstorable(primary)
    # Connection loss, a failover to a read-only server, revoked privileges, a cancelled statement: none of
    # them is the event's fault, and all of them may pass.
    return StoreUnavailable(f"{type(error).__name__}: {primary}")


def in_drivers_words(error: psycopg.Error) -> StoreUnavailable:
    """psycopg's error as the store's own, with libpq's and PostgreSQL's whole message: for the operator's
    own connections (migrations, the checks below), whose statements carry no one's data, and whose libpq
    messages name the host and port but never the password."""
    return StoreUnavailable(str(error).strip() or type(error).__name__)


def _is_conflict(error: psycopg.Error) -> bool:
    return isinstance(error, errors.DeadlockDetected | errors.SerializationFailure | errors.UniqueViolation)


@asynccontextmanager
async def _pooled(pool: Pool) -> AsyncIterator[Connection]:
    """A connection from the pool; the pool is drained if it turned out unable to write.

    A session opened on a server that refuses writes (a standby after a failover, or one whose role or
    database defaults to read-only transactions) keeps refusing them for its whole life in the pool, and so
    do its pool-mates, opened on the same server. Draining replaces them all (this one once it is back), so
    fresh connections find the writable server once there is one again.
    """
    async with pool.connection() as conn:
        try:
            yield conn
        except errors.ReadOnlySqlTransaction:
            await pool.drain()
            raise


async def run_retrying(pool: Pool, work: Callable[[Connection], Awaitable[T]]) -> T:
    """`work(conn)` on a pooled connection, run again from the start when PostgreSQL rolled its writes back
    for another writer's sake; psycopg's errors come out as the store's own."""
    for attempt in range(1, CONFLICT_ATTEMPTS + 1):
        try:
            async with _pooled(pool) as conn:
                return await work(conn)
        except (PoolTimeout, TooManyRequests):
            raise StoreUnavailable(f"no database connection within {pool.timeout:g} s") from None
        except psycopg.Error as error:
            if _is_conflict(error) and attempt < CONFLICT_ATTEMPTS:
                # Batches lock users in one order, so they cannot deadlock each other, but an operator's own
                # transaction can; and two batches may both see the same user as new. Either way PostgreSQL
                # rolled this one back, and running it again is safe.
                await asyncio.sleep(0.001 * attempt)
                continue
            raise _store_error(error) from None
    raise AssertionError("unreachable: the last attempt returns or raises")


async def commit_isolating(
    rows: Sequence[T],
    commit: Callable[[Sequence[T]], Awaitable[R]],
    set_aside: Callable[[T, str], Awaitable[R]],
    *,
    what: str,
) -> list[R]:
    """`commit(rows)`, or, if PostgreSQL refuses some of their data, `commit` of each half, and so on down to
    the single row it refuses, which is handed to `set_aside` with the reason. One answer per commit made, in
    the order of `rows`: a refused row never takes its batch-mates down with it.

    An exception that is not the store's (the caller's own code tripping over one row's data) is treated the
    same way; a database that is unavailable or not migrated is not, and is raised as it is.
    """
    try:
        return [await commit(rows)]
    except Unstorable as error:
        reason = f"PostgreSQL refused the {what}: {error}"
    except StoreError:
        raise
    except Exception as error:
        log.warning(
            f"{what}s could not be stored; isolating the one at fault",
            extra={"fields": {"count": len(rows), "error_class": type(error).__name__}},
        )
        reason = f"the {what} could not be stored ({type(error).__name__})"
    if len(rows) == 1:
        return [await set_aside(rows[0], reason)]
    middle = len(rows) // 2
    return [
        *await commit_isolating(rows[:middle], commit, set_aside, what=what),
        *await commit_isolating(rows[middle:], commit, set_aside, what=what),
    ]


@asynccontextmanager
async def connection(pool: Pool) -> AsyncIterator[Connection]:
    """A pooled connection for the operator's reads and small writes; psycopg's errors as the store's own."""
    try:
        async with _pooled(pool) as conn:
            yield conn
    except (PoolTimeout, TooManyRequests):
        raise StoreUnavailable(f"no database connection within {pool.timeout:g} s") from None
    except psycopg.Error as error:
        raise _store_error(error) from None


# ---------------------------------------------------------------------------------------------------------
# Connections


def _dump_json(value: Any) -> str:
    return _encode(value).decode()


async def _configure(conn: Connection) -> None:
    # msgspec reads and writes the JSON columns several times faster than the standard library; numbers
    # with a fraction or an exponent travel as Decimals both ways, so a stored profile is read back and merged
    # again with every digit it was sent with.
    set_json_dumps(_dump_json, context=conn)
    set_json_loads(_decode_exactly, context=conn)


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


def create_pool(conninfo: str, settings: Settings) -> Pool:
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


@asynccontextmanager
async def open_pool(conninfo: str, settings: Settings) -> AsyncIterator[Pool]:
    """The relay's own pool (schema on the search path, the same JSON codecs) for one operator command."""
    pool = create_pool(conninfo, settings)
    try:
        await pool.open(wait=True, timeout=10)
    except PoolTimeout:
        await pool.close()
        raise StoreUnavailable("cannot connect to the PostgreSQL at DATABASE_URL within 10 s") from None
    try:
        yield pool
    finally:
        await pool.close()


# ---------------------------------------------------------------------------------------------------------
# Live batches: ledger, users and dead letters in one statement

# What a batch needs to know before deciding: which of its events the ledger has seen, and its known users as
# they are now (with the row version, `xmin`, that the write checks they still have). Ids and rows travel as
# one JSON document per parameter: PostgreSQL unpacks them faster than the driver could bind arrays.
READ_BATCH = """
SELECT 'user', user_id, profile, merge_state, deleted_at, xmin::text
  FROM users
 WHERE user_id = ANY(ARRAY(SELECT jsonb_array_elements_text(%(user_ids)s::jsonb)))
UNION ALL
SELECT 'event', event_id, NULL, NULL, NULL, NULL
  FROM processed_events
 WHERE event_id = ANY(ARRAY(SELECT jsonb_array_elements_text(%(event_ids)s::jsonb)))
"""

# The same, for a batch that lost a race: its known users are locked (in user_id order, as every writer locks
# them) until its write commits, so no other writer can change them in between and it cannot lose again. Only
# a retry pays for holding locks while the relay decides; under contention for a few hot users, optimistic
# attempts alone can lose every time.
READ_BATCH_LOCKED = """
WITH known AS (
    SELECT user_id, profile, merge_state, deleted_at, xmin::text AS row_version
      FROM users
     WHERE user_id = ANY(ARRAY(SELECT jsonb_array_elements_text(%(user_ids)s::jsonb)))
     ORDER BY user_id
       FOR UPDATE
)
SELECT 'user', user_id, profile, merge_state, deleted_at, row_version FROM known
UNION ALL
SELECT 'event', event_id, NULL, NULL, NULL, NULL
  FROM processed_events
 WHERE event_id = ANY(ARRAY(SELECT jsonb_array_elements_text(%(event_ids)s::jsonb)))
"""

# Everything a batch writes, in one statement and so one transaction: committed whole or not at all.
#
# The users it changes are locked in user_id order and must still be the row versions it read; if another
# writer changed one in between, relay_write_conflict() fails the statement and the batch runs again from
# fresh facts. Every batch, from any replica, takes its locks in the same order (known users, then ledger ids,
# then new users, each sorted: the branches of the final SELECT run in turn, and the INSERT of new users is
# first read by the last one), so concurrent batches queue on each other instead of deadlocking. A user seen
# as new by two batches at once is inserted by one; the other fails on the primary key and runs again.
#
# The last branch also announces the users written on the change feed (`relay_announce_changes`, delivered at
# commit), so the feed costs no round trip of its own.
WRITE_BATCH = """
WITH locked AS (
    SELECT user_id, xmin::text AS row_version
      FROM users
     WHERE user_id = ANY(ARRAY(SELECT changed.user_id
                                 FROM jsonb_to_recordset(%(changed_users)s::jsonb) AS changed(user_id text)))
     ORDER BY user_id
       FOR UPDATE
), changed AS (
    UPDATE users
       SET profile = batch.profile,
           merge_state = batch.merge_state,
           deleted_at = batch.deleted_at,
           last_event_processed = batch.last_event_processed,
           last_event_id = batch.last_event_id
      FROM jsonb_to_recordset(%(changed_users)s::jsonb)
           AS batch(user_id text, row_version text, profile jsonb, merge_state jsonb, deleted_at timestamptz,
                    last_event_processed timestamptz, last_event_id text)
      JOIN locked ON locked.user_id = batch.user_id AND locked.row_version = batch.row_version
     WHERE users.user_id = batch.user_id
    RETURNING users.user_id, users.deleted_at IS NOT NULL AS tombstoned
), inserted AS (
    INSERT INTO users (user_id, profile, merge_state, deleted_at, last_event_processed, last_event_id)
    SELECT user_id, profile, merge_state, deleted_at, last_event_processed, last_event_id
      FROM jsonb_to_recordset(%(new_users)s::jsonb)
           AS batch(user_id text, profile jsonb, merge_state jsonb, deleted_at timestamptz,
                    last_event_processed timestamptz, last_event_id text)
     WHERE (SELECT count(*) FROM locked) >= 0  -- the known users are locked before any new one is inserted
     ORDER BY user_id
    RETURNING user_id, deleted_at IS NOT NULL AS tombstoned
), recorded AS (
    INSERT INTO processed_events (event_id, event_type, user_id, event_time, outcome)
    SELECT event_id, event_type, user_id, event_time, outcome
      FROM jsonb_to_recordset(%(ledger)s::jsonb)
           AS batch(event_id text, event_type text, user_id text, event_time timestamptz, outcome text)
     ORDER BY event_id
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id
), letters AS (
    INSERT INTO dead_letters (route, body, headers, error)
    SELECT route, decode(body, 'base64'), headers, error
      FROM jsonb_to_recordset(%(dead_letters)s::jsonb)
           AS letter(route text, body text, headers jsonb, error text)
    RETURNING id
), history AS (
    -- Empty unless RELAY_HISTORY=on. Insert-only; an event a concurrent batch kept already is kept once.
    INSERT INTO user_events (user_id, event_time, event_id, event_type, replaces, object)
    SELECT user_id, event_time, event_id, event_type, replaces, object
      FROM jsonb_to_recordset(%(history)s::jsonb)
           AS kept(user_id text, event_time timestamptz, event_id text, event_type text, replaces boolean,
                   object jsonb)
    ON CONFLICT DO NOTHING
), replays_failing AS (
    -- A replayed dead letter that fails again says so on itself, rather than keeping the body twice.
    UPDATE dead_letters
       SET error = failure.error
      FROM jsonb_to_recordset(%(replay_failures)s::jsonb) AS failure(id bigint, error text)
     WHERE dead_letters.id = failure.id
), replays_resolved AS (
    UPDATE dead_letters
       SET resolved_at = now()
     WHERE id = ANY(ARRAY(SELECT jsonb_array_elements_text(%(resolved_letters)s::jsonb)::bigint))
       AND resolved_at IS NULL
), written AS (
    SELECT user_id, tombstoned FROM changed
     UNION ALL
    SELECT user_id, tombstoned FROM inserted
)
SELECT 'conflict', relay_write_conflict() WHERE (SELECT count(*) FROM changed) <> %(changed_count)s
 UNION ALL
SELECT 'event', event_id FROM recorded
 UNION ALL
-- Identity values rise in insertion order, so the ids returned, sorted, match the letters given.
SELECT 'letter', id::text FROM letters
 UNION ALL
SELECT 'announced',
       relay_announce_changes(%(channel)s::text, array_agg(user_id), array_agg(tombstoned))::text
  FROM written
"""


@dataclass(frozen=True, slots=True)
class StoredUser:
    """A user's row as the batch found it."""

    profile: dict[str, Any]
    merge_state: dict[str, Any]
    deleted_at: datetime | None
    row_version: str  # xmin: the write checks the row is still this version

    def state(self, user_id: str) -> UserState:
        """A fresh `UserState` of this row, for the caller to merge events into."""
        return UserState.from_stored(user_id, self.profile, self.merge_state, self.deleted_at)

    def holds(self, state: UserState) -> bool:
        """Whether writing `state` would change nothing in this row."""
        return (
            state.profile == self.profile
            and state.deleted_at == self.deleted_at
            and state.to_merge_state() == self.merge_state
        )


class LedgerRow(msgspec.Struct, frozen=True):
    event_id: str
    event_type: str
    user_id: str | None
    event_time: datetime
    outcome: str


class NewDeadLetter(msgspec.Struct, frozen=True):
    route: str
    body: bytes
    headers: dict[str, str]
    error: str


class ReplayFailure(msgspec.Struct, frozen=True):
    id: int  # the dead letter replayed
    error: str


class HistoryRow(msgspec.Struct, frozen=True):
    """One merged event's object (or export row) as `user_events` keeps it, with RELAY_HISTORY=on."""

    user_id: str
    event_time: datetime
    event_id: str
    event_type: str
    replaces: bool
    object: dict[str, Any]

    @classmethod
    def of(cls, event: UserEvent) -> HistoryRow:
        # As the handlers merge it: a snapshot replaces the profile, a deletion and a partial object merge.
        replaces = event.is_snapshot and event.kind is not EventKind.DELETED
        return cls(event.user_id, event.time, event.id, event.kind.value, replaces, event.profile)


@dataclass(slots=True)
class BatchWrites:
    """Everything one batch writes, decided by the caller from what `commit_batch` found."""

    new_users: list[UserState] = field(default_factory=list)
    changed_users: list[tuple[UserState, str]] = field(default_factory=list)  # (state, row version read)
    ledger: list[LedgerRow] = field(default_factory=list)
    dead_letters: list[NewDeadLetter] = field(default_factory=list)
    replay_failures: list[ReplayFailure] = field(default_factory=list)
    resolved_letters: list[int] = field(default_factory=list)
    history: list[HistoryRow] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Committed:
    writes: BatchWrites
    recorded: frozenset[str]  # ledger ids written by this batch; the others were recorded concurrently
    dead_letter_ids: list[int]  # in the order of `writes.dead_letters`


Decide = Callable[[frozenset[str], dict[str, StoredUser]], BatchWrites]


async def commit_batch(
    pool: Pool,
    event_ids: Sequence[str],
    user_ids: Sequence[str],
    decide: Decide,
    *,
    change_feed: str | None = None,
) -> Committed:
    """One committed batch: finds which `event_ids` are already processed and reads the known `user_ids`,
    asks `decide(processed, known_users)` what to write, and writes it in one statement, announcing the users
    it wrote on the `change_feed` channel (when given). Run again from fresh facts if another writer got there
    first, then with the known users locked from read to write."""
    ids = {
        "event_ids": _encode(list(event_ids)).decode(),
        "user_ids": _encode(sorted(set(user_ids))).decode(),
    }

    attempts = 0

    async def work(conn: Connection) -> Committed:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            return await read_decide_write(conn, READ_BATCH)
        async with conn.transaction():
            return await read_decide_write(conn, READ_BATCH_LOCKED)

    async def read_decide_write(conn: Connection, read: str) -> Committed:
        cursor = await conn.execute(read, ids)
        processed: set[str] = set()
        known: dict[str, StoredUser] = {}
        for kind, key, profile, merge_state, deleted_at, row_version in await cursor.fetchall():
            if kind == "user":
                known[key] = StoredUser(profile, merge_state, deleted_at, row_version)
            else:
                processed.add(key)
        writes = decide(frozenset(processed), known)
        cursor = await conn.execute(WRITE_BATCH, _write_parameters(writes, change_feed))
        recorded, letters = set(), []
        for kind, key in await cursor.fetchall():
            if kind == "event":
                recorded.add(key)
            elif kind == "letter":
                letters.append(int(key))
        return Committed(writes, frozenset(recorded), sorted(letters))

    return await run_retrying(pool, work)


def _write_parameters(writes: BatchWrites, change_feed: str | None) -> dict[str, Any]:
    return {
        "channel": change_feed,
        "changed_users": _encode(
            [_user_row(state, row_version) for state, row_version in writes.changed_users]
        ).decode(),
        "changed_count": len(writes.changed_users),
        "new_users": _encode([_user_row(state) for state in writes.new_users]).decode(),
        "ledger": _encode(writes.ledger).decode(),
        "dead_letters": _encode(writes.dead_letters).decode(),
        "replay_failures": _encode(writes.replay_failures).decode(),
        "resolved_letters": _encode(writes.resolved_letters).decode(),
        "history": _encode(writes.history).decode(),
    }


def _user_row(state: UserState, row_version: str | None = None) -> dict[str, Any]:
    last = state.last_version
    return {
        "user_id": state.user_id,
        "row_version": row_version,
        "profile": state.profile,
        "merge_state": state.to_merge_state(),
        "deleted_at": state.deleted_at,
        "last_event_processed": from_micros(last[0]) if last else None,
        "last_event_id": last[1] if last else None,
    }


# ---------------------------------------------------------------------------------------------------------
# Backfill: export rows copied in raw, merged in SQL

# Per connection, emptied at each commit. The lines arrive exactly as the export has them: CSV with quote and
# delimiter characters that valid JSON never holds unescaped, so each line is one value, taken literally.
CREATE_EXPORT_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS export_lines (line jsonb NOT NULL) ON COMMIT DELETE ROWS
"""

# A chunk's rows are sorted and staged twice over; with the default 4 MB that spills to temporary files.
EXPORT_CHUNK_WORK_MEM = """
SET LOCAL work_mem = '64MB'
"""

COPY_EXPORT_LINES = """
COPY export_lines (line) FROM STDIN WITH (FORMAT csv, QUOTE e'\\x01', DELIMITER e'\\x02')
"""

# A chunk of export rows, each a full snapshot versioned by its updated_at (or created_at). Known users are
# locked in user_id order and returned for the relay to merge under the handlers' rules, except those whose
# stored snapshot is newer than the row, for which the row changes nothing (counted as stale). Users the copy
# does not have are inserted here, directly, with the state the handlers would give them: the row as the
# profile, the row's version as both the snapshot and the last version. The same lock order as live batches
# (known users, then new ones, each sorted), so the two never deadlock. The known users come with their row
# version, which stays as it is while they are locked, so WRITE_BATCH writes what the relay merged.
MERGE_EXPORT_LINES = """
WITH staged AS (
    SELECT DISTINCT ON (user_id) user_id, line, version_time,
           (extract(epoch FROM version_time) * 1000000)::bigint AS version_us
      FROM (SELECT line ->> 'user_id' AS user_id, line,
                   relay_timestamptz(coalesce(line ->> 'updated_at', line ->> 'created_at')) AS version_time
              FROM export_lines) AS lines
     ORDER BY user_id, version_time DESC
), known AS (
    SELECT users.user_id, users.profile, users.merge_state, users.deleted_at, users.xmin::text AS row_version
      FROM users
      JOIN staged ON staged.user_id = users.user_id
     ORDER BY users.user_id
       FOR UPDATE OF users
), inserted AS (
    INSERT INTO users (user_id, profile, merge_state, last_event_processed, last_event_id)
    SELECT user_id, line,
           jsonb_build_object('fields', '{}'::jsonb,
                              'snapshot', jsonb_build_array(version_us, %(version_id)s::text),
                              'lifecycle', NULL,
                              'last', jsonb_build_array(version_us, %(version_id)s::text)),
           version_time, %(version_id)s
      FROM staged
     WHERE user_id NOT IN (SELECT user_id FROM known)
     ORDER BY user_id
    RETURNING user_id
)
SELECT 'inserted', NULL::text, (SELECT count(*) FROM inserted), NULL::jsonb, NULL::jsonb, NULL::jsonb,
       NULL::timestamptz, NULL::text
 UNION ALL
-- The users inserted, on the change feed; the known ones are announced by WRITE_BATCH, which writes them.
SELECT 'announced', NULL, relay_announce_changes(%(channel)s::text, array_agg(user_id), array_agg(false)),
       NULL, NULL, NULL, NULL, NULL
  FROM inserted
 UNION ALL
SELECT 'stale', NULL, count(*), NULL, NULL, NULL, NULL, NULL
  FROM known JOIN staged USING (user_id)
 WHERE staged.version_us < (known.merge_state -> 'snapshot' ->> 0)::bigint
 UNION ALL
SELECT 'known', known.user_id, staged.version_us, staged.line,
       known.profile, known.merge_state, known.deleted_at, known.row_version
  FROM known JOIN staged USING (user_id)
 WHERE NOT coalesce(staged.version_us < (known.merge_state -> 'snapshot' ->> 0)::bigint, false)
"""

# With RELAY_HISTORY=on, a chunk's rows as snapshots versioned like the merge versions them; a row loaded
# again is kept once.
RECORD_EXPORT_HISTORY = """
INSERT INTO user_events (user_id, event_time, event_id, event_type, replaces, object)
SELECT line ->> 'user_id', relay_timestamptz(coalesce(line ->> 'updated_at', line ->> 'created_at')),
       %(version_id)s, %(version_id)s, true, line
  FROM export_lines
    ON CONFLICT DO NOTHING
"""


@dataclass(frozen=True, slots=True)
class KnownSnapshot:
    """An export row for a user the copy already has, with the user as stored (locked)."""

    user_id: str
    version_us: int
    row: dict[str, Any]
    stored: StoredUser


@dataclass(frozen=True, slots=True)
class ExportChunkCounts:
    inserted: int
    stale: int  # known users whose stored snapshot is newer than the row: nothing to do
    known: list[KnownSnapshot]  # the other known users, merged by the caller


async def merge_export_chunk(
    pool: Pool,
    lines: Sequence[bytes],
    rejected: Sequence[NewDeadLetter],
    version_id: str,
    merge: Callable[[list[KnownSnapshot]], list[UserState]],
    *,
    keep_history: bool = False,
    change_feed: str | None = None,
) -> ExportChunkCounts:
    """One committed transaction for a chunk of export lines (already checked to be Auth0 users): COPY them in
    raw, insert the new users in SQL, hand the known ones to `merge` and write what it returns, keep the
    `rejected` lines as dead letters, and with `keep_history` every line in `user_events`; the users
    written are announced on the `change_feed` channel (when given)."""

    async def work(conn: Connection) -> ExportChunkCounts:
        async with conn.transaction(), conn.cursor() as cursor:
            await cursor.execute(CREATE_EXPORT_STAGING)
            await cursor.execute(EXPORT_CHUNK_WORK_MEM)
            if lines:
                async with cursor.copy(COPY_EXPORT_LINES) as copy:
                    await copy.write(b"\n".join(lines))
            inserted = stale = 0
            known: list[KnownSnapshot] = []
            if lines and keep_history:
                await cursor.execute(RECORD_EXPORT_HISTORY, {"version_id": version_id})
            if lines:
                await cursor.execute(MERGE_EXPORT_LINES, {"version_id": version_id, "channel": change_feed})
                for kind, user_id, number, row, *stored_columns in await cursor.fetchall():
                    if kind == "inserted":
                        inserted = int(number)
                    elif kind == "stale":
                        stale = int(number)
                    elif kind == "known":
                        known.append(KnownSnapshot(user_id, int(number), row, StoredUser(*stored_columns)))
            row_versions = {snapshot.user_id: snapshot.stored.row_version for snapshot in known}
            writes = BatchWrites(
                changed_users=[(state, row_versions[state.user_id]) for state in merge(known)],
                dead_letters=list(rejected),
            )
            if writes.changed_users or writes.dead_letters:
                # The live batches' own write: the merged users (still locked, so still the versions read) and
                # the rejected lines as dead letters, announced on the change feed.
                await cursor.execute(WRITE_BATCH, _write_parameters(writes, change_feed))
        return ExportChunkCounts(inserted, stale, known)

    return await run_retrying(pool, work)


# ---------------------------------------------------------------------------------------------------------
# Reconciling deletes: the users a complete export does not list

# Per connection, emptied at each commit: the user ids a complete export lists.
CREATE_EXPORT_LISTING = """
CREATE TEMP TABLE IF NOT EXISTS export_listing (user_id text PRIMARY KEY) ON COMMIT DELETE ROWS
"""

FILL_EXPORT_LISTING = """
INSERT INTO export_listing (user_id)
SELECT jsonb_array_elements_text(%(listed)s::jsonb)
    ON CONFLICT DO NOTHING
"""

# The users live in the copy that the export does not list and that nothing newer than the export's start has
# written: those the relay may tombstone, through a batch of its own that reads them again (one written at the
# export's very microsecond is returned too: the handlers' version order settles it). The anti-join reads the
# listing through its primary key, whatever the size of either side.
ABSENT_USERS = """
SELECT users.user_id
  FROM users
 WHERE users.deleted_at IS NULL
   AND coalesce((users.merge_state -> 'last' ->> 0)::bigint, 0) <= %(exported_us)s
   AND NOT EXISTS (SELECT 1 FROM export_listing WHERE export_listing.user_id = users.user_id)
 ORDER BY users.user_id
"""


async def absent_users(pool: Pool, listed: Sequence[str], exported_us: int) -> list[str]:
    """The ids of the users live in the copy, absent from `listed`, and written by nothing newer than
    `exported_us`, sorted."""

    async def work(conn: Connection) -> list[str]:
        async with conn.transaction(), conn.cursor() as cursor:
            await cursor.execute(CREATE_EXPORT_LISTING)
            await cursor.execute(EXPORT_CHUNK_WORK_MEM)
            await cursor.execute(FILL_EXPORT_LISTING, {"listed": _encode(list(listed)).decode()})
            await cursor.execute(ABSENT_USERS, {"exported_us": exported_us})
            return [str(row[0]) for row in await cursor.fetchall()]

    return await run_retrying(pool, work)


# ---------------------------------------------------------------------------------------------------------
# The tenant a schema holds

# Pins `name` unless a tenant is pinned already; returns the pinned tenant. When another relay pins at the
# same moment, this statement waits for it, inserts nothing and (its snapshot being older) finds nothing:
# READ_TENANT, a statement of its own, then sees the winner.
PIN_TENANT = """
WITH pinned AS (
    INSERT INTO tenant (name) VALUES (%(name)s) ON CONFLICT DO NOTHING RETURNING name
)
SELECT name FROM pinned
 UNION ALL
SELECT name FROM tenant
 LIMIT 1
"""

READ_TENANT = """
SELECT name FROM tenant
"""


async def pin_tenant(pool: Pool, name: str) -> str:
    """The tenant this schema holds, pinned to `name` if it held none."""
    async with connection(pool) as conn:
        row = await (await conn.execute(PIN_TENANT, {"name": name})).fetchone()
        if row is None:
            row = await (await conn.execute(READ_TENANT)).fetchone()
    if row is None:
        raise StoreUnavailable("the tenant row vanished while it was being pinned; retry")
    return str(row[0])


# ---------------------------------------------------------------------------------------------------------
# Health and `relay verify`

CHECK_READY = """
SELECT coalesce(max(version), 0) FROM schema_migrations
"""

# `relay verify` watches one user's row appear, change and become a tombstone.
FIND_USER = """
SELECT name, deleted_at FROM users WHERE user_id = %(user_id)s
"""


async def migrated_version(pool: Pool) -> int:
    """The newest migration applied to the relay's schema (`NotMigrated` when there is none)."""
    async with connection(pool) as conn, conn.cursor() as cursor:
        await cursor.execute(CHECK_READY)
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


# Every batch's two statements, planned but not run: a schema missing a column or a privilege they need (one
# changed by hand, or a migration half rolled back) is not ready, whatever schema_migrations says. Planning
# takes only the locks a batch takes, for a few milliseconds.
_PLANNED_FOR_READINESS = (
    ("EXPLAIN " + READ_BATCH, {"event_ids": "[]", "user_ids": "[]"}),
    ("EXPLAIN " + WRITE_BATCH, _write_parameters(BatchWrites(), None)),
)


async def check_batch_statements(pool: Pool) -> None:
    """`NotMigrated` or `StoreUnavailable` if PostgreSQL could not run a batch on the relay's schema now."""
    async with connection(pool) as conn:
        for statement, parameters in _PLANNED_FOR_READINESS:
            await conn.execute(statement, parameters)


# The operator commands' own checks, on a plain connection rather than a pool: `relay backfill` and `relay
# catch-up` check the schema before asking Auth0 for anything, and `relay verify` watches one user's row.

DirectConnection = psycopg.Connection[Any]


@contextmanager
def direct_connection(conninfo: str, settings: Settings) -> Iterator[DirectConnection]:
    """One connection of its own, with the relay's options; psycopg's errors, from opening it or from the
    statements run on it, come out as the store's own in the driver's words."""
    try:
        with psycopg.connect(conninfo, **connection_options(settings)) as conn:
            yield conn
    except psycopg.Error as error:
        found = _store_error(error)
        if isinstance(found, NotMigrated):
            raise found from None
        raise in_drivers_words(error) from None


def require_migrations(conninfo: str, settings: Settings, needed: int) -> None:
    """`NotMigrated` unless the relay's schema has every migration up to `needed` applied."""
    with direct_connection(conninfo, settings) as conn:
        try:
            row = conn.execute(CHECK_READY).fetchone()
        except errors.UndefinedTable:
            row = None
    found = int(row[0]) if row else 0
    if found < needed:
        raise NotMigrated(
            f"schema {settings.db_schema!r} is at migration {found}, this relay needs {needed}: "
            "run `relay migrate` first"
        )


@dataclass(frozen=True, slots=True)
class WatchedUser:
    """What `relay verify` looks for in a user's row: the name it changes, and the tombstone."""

    name: str | None
    deleted_at: datetime | None


def find_watched_user(conn: DirectConnection, user_id: str) -> WatchedUser | None:
    """The user's row as `relay verify` watches it; on a `direct_connection`, `NotMigrated` when there is no
    users table."""
    row = conn.execute(FIND_USER, {"user_id": user_id}).fetchone()
    return WatchedUser(*row) if row else None


# `relay export`: the live users (of one connection, when named), in user_id order, through a server-side
# cursor so that a large copy is never held whole; the GIN index on identities serves the containment.
LIVE_USERS_OF_CONNECTION = """
SELECT profile::text
  FROM live_users
 WHERE %(connection)s::text IS NULL
    OR identities @> jsonb_build_array(jsonb_build_object('connection', %(connection)s::text))
 ORDER BY user_id
"""

COUNT_LIVE_USERS_OF_CONNECTION = """
SELECT count(*)
  FROM live_users
 WHERE %(connection)s::text IS NULL
    OR identities @> jsonb_build_array(jsonb_build_object('connection', %(connection)s::text))
"""


def count_live_users(conn: DirectConnection, connection: str | None) -> int:
    row = conn.execute(COUNT_LIVE_USERS_OF_CONNECTION, {"connection": connection}).fetchone()
    return int(row[0]) if row else 0


def live_users(conn: DirectConnection, connection: str | None) -> Iterator[dict[str, Any]]:
    """The profiles of the live users (with an identity in `connection`, when given), sorted by user_id, with
    every digit of their numbers; on a `direct_connection`, read in one snapshot."""
    with conn.transaction(), conn.cursor(name="live_users") as cursor:
        cursor.itersize = 1000
        cursor.execute(LIVE_USERS_OF_CONNECTION, {"connection": connection})
        for (profile,) in cursor:
            yield _decode_exactly(profile)


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


# History older than the cutoff, by the time of the event (or export row), not of its arrival: what a
# retention policy for personal data asks. The profiles user_history folds for later rows no longer see the
# fields only pruned rows carried.
PRUNE_USER_EVENTS = """
DELETE FROM user_events
 WHERE (user_id, event_time, event_id) IN (SELECT user_id, event_time, event_id FROM user_events
                                            WHERE event_time < %(cutoff)s LIMIT %(limit)s)
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


async def prune_user_events(conn: Connection, cutoff: datetime, limit: int) -> int:
    """Deletes up to `limit` history rows of events before `cutoff`; returns how many."""
    async with conn.transaction(), conn.cursor() as cursor:
        await cursor.execute(PRUNE_USER_EVENTS, {"cutoff": cutoff, "limit": limit})
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
