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

An export also says who is *absent*: `reconcile_deletes` tombstones each user live in the copy that a complete
export does not list and that nothing has changed since the export started, as a `user.deleted` versioned at
the export's start would. A later `user.created` still revives the user; a late, older event cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, BinaryIO, Literal

import msgspec

from relay import store
from relay.events import (
    EventKind,
    Origin,
    UserEvent,
    UserObject,
    Version,
    from_micros,
    holds_nul,
    to_micros,
)
from relay.handlers import Outcome, UserState, apply_event
from relay.settings import DeleteMode
from relay.store import BatchWrites, HistoryRow, KnownSnapshot, NewDeadLetter, Pool, StoredUser

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


class _Listed(msgspec.Struct):
    user_id: str


# Only the user id of a row the copy cannot take: the export still lists that user.
_listed_decoder = msgspec.json.Decoder(_Listed)

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


class IncompleteExport(Exception):
    """The export file is cut short or corrupt, or (for reconciling deletes) does not list everyone: the
    message says where and what to do."""


def export_lines(path: Path) -> Iterator[bytes]:
    """The non-blank lines of an export file, stripped, gunzipped as they are read when the file is gzip.
    `IncompleteExport` when the gzip stream ends early or is corrupt, after the lines read so far."""
    with path.open("rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    with gzip.open(path, "rb") if gzipped else path.open("rb") as file:
        rest = b""
        while block := _read_block(file, path):
            lines = (rest + block).split(b"\n")
            rest = lines.pop()
            yield from (line.strip() for line in lines if line.strip())
        if rest.strip():
            yield rest.strip()


def _read_block(file: gzip.GzipFile | BinaryIO, path: Path) -> bytes:
    try:
        return file.read(_READ_BYTES)
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise IncompleteExport(
            f"{path.name} is cut short or corrupt ({error}); download the export again"
        ) from None


def check_row(line: bytes) -> UserObject | str:
    """The export line as the Auth0 user it is, or why it is not one the copy can take."""
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
    return checked


@dataclass
class ExportListing:
    """Who an export lists, for reconciling deletes: every row's user id, and the first row whose user id
    could not be read, if any (then the export cannot say who is absent)."""

    user_ids: set[str] = field(default_factory=set)
    rows: int = 0
    unreadable: str | None = None

    def add(self, line: bytes, checked: UserObject | str) -> None:
        self.rows += 1
        if not isinstance(checked, str):
            self.user_ids.add(checked.user_id)
            return
        try:
            self.user_ids.add(_listed_decoder.decode(line).user_id)
        except msgspec.DecodeError:
            if self.unreadable is None:
                self.unreadable = f"row {self.rows} names no user ({checked})"


def list_export(lines: Iterable[bytes]) -> ExportListing:
    """Who an export lists, reading it without loading it (for `--dry-run`)."""
    listing = ExportListing()
    for line in lines:
        listing.add(line, check_row(line))
    return listing


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
    listing: ExportListing | None = None,
    keep_history: bool = False,
    change_feed: str | None = None,
) -> BackfillReport:
    """Merges every line of an export into the copy, one committed chunk at a time, several at once; notes
    who the export lists in `listing`, when given; each chunk's users are announced on `change_feed`."""
    report = BackfillReport()
    merging: set[asyncio.Task[None]] = set()

    async def hand_over(chunk: list[bytes], rejected: list[NewDeadLetter]) -> None:
        while len(merging) >= chunks_in_flight:
            done, _ = await asyncio.wait(merging, return_when=asyncio.FIRST_COMPLETED)
            merging.difference_update(done)
            for task in done:
                task.result()  # a failed chunk stops the load
            progress(report)
        merging.add(
            asyncio.create_task(
                _merge_chunk(pool, chunk, rejected, delete_mode, report, keep_history, change_feed)
            )
        )

    try:
        chunk: list[bytes] = []
        rejected: list[NewDeadLetter] = []
        for line in lines:
            report.rows += 1
            checked = check_row(line)
            if listing is not None:
                listing.add(line, checked)
            if isinstance(checked, str):
                rejected.append(NewDeadLetter(DEAD_LETTER_ROUTE, line, {}, checked))
            else:
                chunk.append(line)
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
    keep_history: bool,
    change_feed: str | None,
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
        counts = await store.merge_export_chunk(
            pool,
            part,
            letters,
            BACKFILL_VERSION_ID,
            merge,
            keep_history=keep_history,
            change_feed=change_feed,
        )
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


async def merge_row(
    pool: Pool,
    line: bytes,
    delete_mode: DeleteMode,
    *,
    keep_history: bool = False,
    change_feed: str | None = None,
) -> RowMerged | str:
    """One export row, kept as a dead letter, merged again exactly as a chunk's rows are (`check_row`, then
    the chunk merge, for a chunk of one) and committed; or why it still cannot go in, when nothing is
    written at all (no second dead letter either: the caller holds the row)."""
    checked = check_row(line)
    if isinstance(checked, str):
        return checked
    user_id = checked.user_id
    merged = 0

    def merge(known: list[KnownSnapshot]) -> list[UserState]:
        nonlocal merged
        states, merged, _stale = _merge_known(known, delete_mode)
        return states

    async def commit(rows: Sequence[bytes]) -> RowMerged | str:
        counts = await store.merge_export_chunk(
            pool, rows, [], BACKFILL_VERSION_ID, merge, keep_history=keep_history, change_feed=change_feed
        )
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


@dataclass(frozen=True, slots=True)
class Reconciled:
    """What reconciling deletes did (or, in a dry run, would do)."""

    exported_at: datetime
    tombstoned: list[str]  # user ids, sorted
    dry_run: bool


async def reconcile_deletes(
    pool: Pool,
    listing: ExportListing,
    exported_at: datetime,
    delete_mode: DeleteMode,
    *,
    dry_run: bool = False,
    keep_history: bool = False,
    change_feed: str | None = None,
) -> Reconciled:
    """Tombstones every user live in the copy that the export does not list and that no event or row newer
    than `exported_at` (the export's start) has written, as a `user.deleted` at that instant would; in a dry
    run, finds them and writes nothing. `IncompleteExport` when the export cannot say who is absent."""
    if listing.unreadable is not None:
        raise IncompleteExport(
            f"not reconciling deletes: {listing.unreadable}, so the export cannot say who is absent"
        )
    if not listing.user_ids:
        raise IncompleteExport(
            "not reconciling deletes: the export lists no users, and would tombstone everyone in the copy"
        )
    version = (to_micros(exported_at), BACKFILL_VERSION_ID)
    absent = await store.absent_users(pool, sorted(listing.user_ids), version[0])
    tombstoned: list[str] = []

    def tombstone(_processed: frozenset[str], known: dict[str, StoredUser]) -> BatchWrites:
        # Run again from fresh facts if a live batch changes one of them first: decided anew each time.
        tombstoned.clear()
        writes = BatchWrites()
        for user_id, stored in sorted(known.items()):
            state = stored.state(user_id)
            if stored.deleted_at is not None or (
                state.last_version is not None and state.last_version >= version
            ):
                continue  # deleted already, or written since the export started: it may not show it yet
            deletion = _deletion(user_id, stored.profile, exported_at, version)
            apply_event(state, deletion, delete_mode)
            writes.changed_users.append((state, stored.row_version))
            if keep_history:
                writes.history.append(HistoryRow.of(deletion))
            tombstoned.append(user_id)
        return BatchWrites() if dry_run else writes

    if absent:
        # The live batches' own read and write: the users locked in the same order, a user a live event
        # changes in between read again, history kept in the same statement.
        await store.commit_batch(pool, [], absent, tombstone, change_feed=change_feed)
    return Reconciled(exported_at, tombstoned, dry_run)


def _deletion(user_id: str, profile: dict[str, Any], exported_at: datetime, version: Version) -> UserEvent:
    """The `user.deleted` a reconcile stands in for: the user was gone by the export's start. It carries the
    times a live deletion carries, so a scrubbing delete keeps them as it would."""
    kept: dict[str, Any] = {name: profile[name] for name in ("created_at", "updated_at") if name in profile}
    return UserEvent(
        id=BACKFILL_VERSION_ID,
        kind=EventKind.DELETED,
        time=exported_at,
        version=version,
        user_id=user_id,
        profile={"user_id": user_id, **kept, "deleted_at": _rfc3339(exported_at)},
        is_snapshot=False,
        deleted_at=exported_at,
        origin=Origin(),
        raw=b"",
    )


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
