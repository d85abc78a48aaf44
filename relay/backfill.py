"""Loads a users export (gzip NDJSON, one Auth0 user per line) into the copy, under the same rules as events.

Each export row is a full snapshot whose version is its `updated_at` (ties lose to any real event), applied
like a `user.updated` snapshot: it never revives a deleted user, and a live event or a tombstone newer than it
wins, field by field.

The rows are not decoded into Python objects: each line is only checked against the same `UserObject` the
live path uses, then the chunk's lines go to PostgreSQL raw, through COPY, and users the copy does not have
(all of them, on a first load) are inserted there in one statement. Only users the copy already has come
back to be merged by `handlers.apply_event`. A chunk commits whole or not at all, so an interrupted load
leaves no half-applied chunk, and running it again is safe. Two chunks are merged at a time, on two
connections, while the next is read.

A row kept as a dead letter is replayed by `merge_row`: the same check and the same chunk merge, for a chunk
of one, so it too never overwrites anything newer and never revives a deleted user.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Literal

import msgspec

from relay import store
from relay.events import EventKind, Origin, UserEvent, UserObject, from_micros, holds_nul
from relay.handlers import Outcome, UserState, apply_event
from relay.settings import DeleteMode
from relay.store import KnownSnapshot, NewDeadLetter, Pool

# Ties between a snapshot and an event at the same instant go to the event: "backfill" sorts before "evt_".
BACKFILL_VERSION_ID = "backfill"
DEAD_LETTER_ROUTE = "backfill"
CHUNK_ROWS = 10_000
# Chunks merged at once, each on its own connection: PostgreSQL's side of a merge is one process per chunk.
CHUNKS_IN_FLIGHT = 2
_READ_BYTES = 1 << 20

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

# Checks a row as relay.events checks an event: numbers in metadata may be any a JSON number can be.
_user_decoder = msgspec.json.Decoder(UserObject, float_hook=Decimal)

# The deepest a row's arrays and objects may nest. msgspec's nesting limit is Python's recursion limit less
# the depth of the call, so a row checked here, in a shallow call, could be too deep for the relay to decode
# where it merges users (about 975 levels on Python 3.11, fewer as the call is deeper); inserted in SQL
# without being decoded again, it would leave a user no later event could ever be merged into. This bound
# holds the same at every call depth, far inside that limit.
MAX_NESTING = 512
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKET = re.compile(rb"[\[\]{}]")


@dataclass
class BackfillReport:
    rows: int = 0
    inserted: int = 0  # users the copy did not have
    merged: int = 0  # known users the snapshot was newer for, in some field at least
    stale: int = 0  # known users whose stored state is newer than the snapshot
    rejected: int = 0  # rows that are not Auth0 users, or that PostgreSQL refused: kept in dead_letters

    def describe(self, elapsed: float | None = None) -> str:
        """The counts in words, with the rate when `elapsed` seconds are given."""
        text = (
            f"{self.rows} rows: {self.inserted} inserted, {self.merged} merged, {self.stale} stale, "
            f"{self.rejected} rejected"
        )
        if elapsed is not None and elapsed > 0:
            text += f" ({self.rows / elapsed:,.0f} rows/s)"
        return text


def export_lines(path: Path) -> Iterator[bytes]:
    """The non-blank lines of an export file, stripped, gunzipped as they are read when the file is gzip."""
    with path.open("rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    with gzip.open(path, "rb") if gzipped else path.open("rb") as file:
        rest = b""
        while block := file.read(_READ_BYTES):
            lines = (rest + block).split(b"\n")
            rest = lines.pop()
            yield from (line.strip() for line in lines if line.strip())
        if rest.strip():
            yield rest.strip()


def check_row(line: bytes) -> str | None:
    """Why an export line is not an Auth0 user the copy can take, or None when it is."""
    if line.count(b"{") + line.count(b"[") > MAX_NESTING and nesting_depth(line) > MAX_NESTING:
        return f"not an Auth0 user the copy can keep: nested more than {MAX_NESTING} levels deep"
    try:
        checked = _user_decoder.decode(line)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as error:
        return f"not an Auth0 user: {error}"
    if not isinstance(checked.updated_at, datetime) and not isinstance(checked.created_at, datetime):
        return "an export row needs updated_at (or created_at) to be versioned"
    if b"\\u0000" in line and holds_nul(line):
        return "the row holds a \\u0000 character, which PostgreSQL cannot store in text or jsonb"
    return None


def nesting_depth(document: bytes) -> int:
    """How deeply the arrays and objects of a JSON document nest, strings aside; without recursing, so it
    answers for any depth."""
    depth = deepest = 0
    for bracket in _BRACKET.findall(_JSON_STRING.sub(b"", document)):
        if bracket in (b"{", b"["):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


async def load_export(
    pool: Pool,
    lines: Iterable[bytes],
    delete_mode: DeleteMode,
    *,
    progress: Callable[[BackfillReport], None] = lambda _: None,
    chunk_rows: int = CHUNK_ROWS,
    chunks_in_flight: int = CHUNKS_IN_FLIGHT,
) -> BackfillReport:
    """Merges every line of an export into the copy, one committed chunk at a time, several at once."""
    report = BackfillReport()
    merging: set[asyncio.Task[None]] = set()

    async def hand_over(chunk: list[bytes], rejected: list[NewDeadLetter]) -> None:
        while len(merging) >= chunks_in_flight:
            done, _ = await asyncio.wait(merging, return_when=asyncio.FIRST_COMPLETED)
            merging.difference_update(done)
            for task in done:
                task.result()  # a failed chunk stops the load
            progress(report)
        merging.add(asyncio.create_task(_merge_chunk(pool, chunk, rejected, delete_mode, report)))

    try:
        chunk: list[bytes] = []
        rejected: list[NewDeadLetter] = []
        for line in lines:
            report.rows += 1
            problem = check_row(line)
            if problem is None:
                chunk.append(line)
            else:
                rejected.append(NewDeadLetter(DEAD_LETTER_ROUTE, line, {}, problem))
            if len(chunk) + len(rejected) >= chunk_rows:
                await hand_over(chunk, rejected)
                chunk, rejected = [], []
        if chunk or rejected:
            await hand_over(chunk, rejected)
        for task in asyncio.as_completed(list(merging)):
            await task
        merging.clear()
    finally:
        for task in merging:
            task.cancel()  # its transaction rolls back: no half-applied chunk
        for task in merging:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    progress(report)
    return report


async def _merge_chunk(
    pool: Pool,
    lines: list[bytes],
    rejected: list[NewDeadLetter],
    delete_mode: DeleteMode,
    report: BackfillReport,
) -> None:
    """Merges one chunk; a line PostgreSQL refuses is found by halves and kept as a dead letter."""
    unwritten = list(rejected)  # the chunk's rejected lines go with whichever part commits first
    merged = stale = 0

    def merge(known: list[KnownSnapshot]) -> list[UserState]:
        # Called again if the chunk is run again, so it only counts; the counts are kept once committed.
        nonlocal merged, stale
        states, merged, stale = _merge_known(known, delete_mode)
        return states

    async def commit(part: Sequence[bytes], refused: Sequence[NewDeadLetter] = ()) -> None:
        letters = [*unwritten, *refused]
        counts = await store.merge_export_chunk(pool, part, letters, BACKFILL_VERSION_ID, merge)
        report.inserted += counts.inserted
        report.stale += counts.stale + stale
        report.merged += merged
        report.rejected += len(letters)
        unwritten.clear()

    async def set_aside(line: bytes, reason: str) -> None:
        await commit([], [NewDeadLetter(DEAD_LETTER_ROUTE, line, {}, reason)])

    if lines:
        await store.commit_isolating(lines, commit, set_aside, what="row")
    if unwritten:
        await commit([])


def _merge_known(known: list[KnownSnapshot], delete_mode: DeleteMode) -> tuple[list[UserState], int, int]:
    """The known users of a chunk with their rows merged in by the handlers: the states to write, and how
    many rows the handlers applied (merged) and how many they found stale."""
    merged = stale = 0
    states = []
    for snapshot in known:
        state = snapshot.stored.state(snapshot.user_id)
        if apply_event(state, _as_event(snapshot), delete_mode) is Outcome.STALE:
            stale += 1
            if snapshot.stored.holds(state):
                continue  # nothing to write: the same export loaded again, say
        else:
            merged += 1
        states.append(state)
    return states, merged, stale


@dataclass(frozen=True, slots=True)
class RowMerged:
    """What one export row did, as `BackfillReport` counts it: inserted a user the copy did not have, merged
    into a known one it is newer than, or stale (the user changed after the row; a field nothing newer wrote
    may still be filled from it)."""

    user_id: str
    outcome: Literal["inserted", "merged", "stale"]


async def merge_row(pool: Pool, line: bytes, delete_mode: DeleteMode) -> RowMerged | str:
    """One export row, kept as a dead letter, merged again exactly as a chunk's rows are (`check_row`, then
    the chunk merge, for a chunk of one) and committed; or why it still cannot go in, when nothing is
    written at all (no second dead letter either: the caller holds the row)."""
    problem = check_row(line)
    if problem is not None:
        return problem
    user_id = _user_decoder.decode(line).user_id
    merged = 0

    def merge(known: list[KnownSnapshot]) -> list[UserState]:
        nonlocal merged
        states, merged, _stale = _merge_known(known, delete_mode)
        return states

    async def commit(rows: Sequence[bytes]) -> RowMerged | str:
        counts = await store.merge_export_chunk(pool, rows, [], BACKFILL_VERSION_ID, merge)
        if counts.inserted:
            return RowMerged(user_id, "inserted")
        return RowMerged(user_id, "merged" if merged else "stale")

    async def refused(_row: bytes, reason: str) -> RowMerged | str:
        return reason

    [done] = await store.commit_isolating([line], commit, refused, what="row")
    return done


def _as_event(snapshot: KnownSnapshot) -> UserEvent:
    return UserEvent(
        id=BACKFILL_VERSION_ID,
        kind=EventKind.UPDATED,
        time=from_micros(snapshot.version_us),
        version=(snapshot.version_us, BACKFILL_VERSION_ID),
        user_id=snapshot.user_id,
        profile=snapshot.row,
        is_snapshot=True,
        deleted_at=None,
        origin=Origin(),
        raw=b"",
    )
