"""Loads a users export (gzip NDJSON, one Auth0 user per line) into the copy, under the same rules as events.

Each export row is a full snapshot whose version is its `updated_at` (ties lose to any real event), applied
like a `user.updated` snapshot: it never revives a deleted user, and a live event or a tombstone newer than it
wins, field by field. Rows go through COPY into a staging table and are merged in one transaction per chunk:
new users with one INSERT … SELECT, known ones through the same merge the handlers use. A chunk commits whole
or not at all, so an interrupted load leaves no half-applied chunk, and running it again is safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import psycopg
from psycopg_pool import AsyncConnectionPool

from relay.batching import DEADLOCK_ATTEMPTS, is_unstorable
from relay.events import EventKind, UserEvent, UserObject
from relay.handlers import UserState, from_micros, to_micros
from relay.settings import DeleteMode
from relay.store import Connection, SnapshotCounts, merge_snapshots, record_dead_letter

# Ties between a snapshot and an event at the same instant go to the event: "backfill" sorts before "evt_".
BACKFILL_VERSION_ID = "backfill"
CHUNK_ROWS = 10_000

# What `relay backfill` asks the export job for: every field the copy keeps, metadata objects whole.
EXPORT_FIELDS = (
    "user_id",
    "email",
    "email_verified",
    "username",
    "phone_number",
    "phone_verified",
    "name",
    "given_name",
    "family_name",
    "nickname",
    "picture",
    "identities",
    "app_metadata",
    "user_metadata",
    "created_at",
    "updated_at",
    "last_login",
    "last_ip",
    "logins_count",
    "blocked",
    "multifactor",
)

_profile_decoder = msgspec.json.Decoder(dict[str, Any])
_user_decoder = msgspec.json.Decoder(UserObject)


@dataclass
class BackfillReport:
    rows: int = 0
    inserted: int = 0  # users the copy did not have
    merged: int = 0  # known users the snapshot was newer for, in some field at least
    stale: int = 0  # known users whose stored state is newer than the snapshot
    rejected: int = 0  # rows that are not Auth0 users: kept in dead_letters


@dataclass(frozen=True, slots=True)
class SnapshotRow:
    user_id: str
    line: bytes
    profile: dict[str, Any]
    version_us: int

    def as_event(self) -> UserEvent:
        return UserEvent(
            id=BACKFILL_VERSION_ID,
            kind=EventKind.UPDATED,
            time=from_micros(self.version_us),
            user_id=self.user_id,
            profile=self.profile,
            is_snapshot=True,
            deleted_at=None,
        )

    def new_user_state(self) -> UserState:
        """The state a user seen for the first time gets from this row, as `apply_event` would give it."""
        state = UserState(self.user_id)
        version = (self.version_us, BACKFILL_VERSION_ID)
        state.profile = self.profile
        state.snapshot_version = version
        state.last_version = version
        return state


def export_lines(path: Path) -> Iterator[bytes]:
    """The NDJSON lines of an export file, gunzipped as they are read when the file is gzip."""
    with path.open("rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    if gzipped:
        with gzip.open(path, "rb") as unzipped:
            yield from io.BufferedReader(unzipped, buffer_size=1 << 20)
    else:
        with path.open("rb") as plain:
            yield from plain


def parse_row(line: bytes) -> SnapshotRow:
    """One export line as a snapshot, or `ValueError` saying why it is not an Auth0 user."""
    try:
        checked = _user_decoder.decode(line)
        profile = _profile_decoder.decode(line)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as error:
        raise ValueError(f"not an Auth0 user: {error}") from None
    moment = checked.updated_at if isinstance(checked.updated_at, datetime) else None
    if moment is None:
        moment = checked.created_at if isinstance(checked.created_at, datetime) else None
    if moment is None:
        raise ValueError("an export row needs updated_at (or created_at) to be versioned")
    return SnapshotRow(checked.user_id, line.strip(), profile, to_micros(moment))


async def load_export(
    pool: AsyncConnectionPool[Connection],
    lines: Iterable[bytes],
    delete_mode: DeleteMode,
    *,
    progress: Callable[[BackfillReport], None] = lambda _: None,
    chunk_rows: int = CHUNK_ROWS,
) -> BackfillReport:
    """Merges every row of an export into the copy, one committed chunk at a time.

    While PostgreSQL merges one chunk, the next is read and checked: the two halves of the work overlap
    instead of taking turns.
    """
    report = BackfillReport()
    chunk: dict[str, SnapshotRow] = {}
    merging: asyncio.Task[None] | None = None

    async def hand_over(rows: dict[str, SnapshotRow]) -> asyncio.Task[None]:
        if merging is not None:
            await merging
            progress(report)
        return asyncio.create_task(_merge_chunk(pool, rows, delete_mode, report))

    try:
        for line in lines:
            if not line.strip():
                continue
            report.rows += 1
            if report.rows % 1000 == 0:
                await asyncio.sleep(0)  # let the merge in flight send its next statement
            try:
                row = parse_row(line)
            except ValueError as error:
                report.rejected += 1
                async with pool.connection() as conn:
                    await record_dead_letter(conn, "backfill", line, {}, str(error))
                continue
            known = chunk.get(row.user_id)
            if known is None or row.version_us > known.version_us:
                chunk[row.user_id] = row
            if len(chunk) >= chunk_rows:
                merging = await hand_over(chunk)
                chunk = {}
        if chunk:
            merging = await hand_over(chunk)
        if merging is not None:
            await merging
    finally:
        if merging is not None and not merging.done():
            merging.cancel()  # its transaction rolls back: no half-applied chunk
            with contextlib.suppress(asyncio.CancelledError):
                await merging
    progress(report)
    return report


async def _merge_chunk(
    pool: AsyncConnectionPool[Connection],
    chunk: dict[str, SnapshotRow],
    delete_mode: DeleteMode,
    report: BackfillReport,
) -> None:
    rows = list(chunk.values())
    try:
        counts = await _merge_retrying_deadlocks(pool, rows, delete_mode)
    except psycopg.Error as error:
        if not is_unstorable(error):
            raise
        if len(rows) == 1:
            report.rejected += 1
            async with pool.connection() as conn:
                await record_dead_letter(
                    conn, "backfill", rows[0].line, {}, f"PostgreSQL refused the row: {error}"
                )
            return
        # Find the rows PostgreSQL refuses by halves, so the rest of the chunk still lands.
        middle = len(rows) // 2
        for half in (rows[:middle], rows[middle:]):
            await _merge_chunk(pool, {row.user_id: row for row in half}, delete_mode, report)
        return
    report.inserted += counts.inserted
    report.merged += counts.merged
    report.stale += counts.stale


async def _merge_retrying_deadlocks(
    pool: AsyncConnectionPool[Connection], rows: list[SnapshotRow], delete_mode: DeleteMode
) -> SnapshotCounts:
    # A chunk locks the users it knows, then inserts the others: with live batches doing the same, two
    # transactions can each hold what the other needs. PostgreSQL rolls one back; merging again is safe.
    for attempt in range(1, DEADLOCK_ATTEMPTS + 1):
        try:
            async with pool.connection() as conn:
                return await merge_snapshots(conn, rows, delete_mode)
        except psycopg.errors.DeadlockDetected:
            if attempt == DEADLOCK_ATTEMPTS:
                raise
    raise AssertionError("unreachable: the last attempt returns or raises")
