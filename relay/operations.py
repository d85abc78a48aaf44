"""Operator tasks on what the relay has stored: dead letters (`relay dead-letters list | show | replay |
resolve`) and retention (`relay prune`). The SQL is in `store.py`; `cli.py` only wires these up.

A replay hands a dead letter's stored body to the pipeline again, so it meets the current decoder, handlers
and allow-lists exactly as a new delivery would, and is applied at most once whatever happens (the ledger
sees to that). The same transaction that applies its events resolves the dead letter, or, if an item still
fails, records the new error on it; no second copy of the body is made.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal, TextIO

from relay import store
from relay.events import Undecodable, decode_body
from relay.handlers import Outcome
from relay.pipeline import Delivery, NotAllowed, Pipeline, check_origins
from relay.settings import Settings
from relay.store import Connection, DeadLetter, Pool, open_pool

# Unresolved dead letters are replayed a page at a time, so their bodies are never all in memory at once.
REPLAY_PAGE = 100
# Larger bodies are shown in hex only this far; the whole body stays in the table.
HEX_PREVIEW_BYTES = 512
ERROR_COLUMN_WIDTH = 100

_AGE = re.compile(r"([1-9][0-9]{0,5})([dh])")


def parse_age(text: str) -> timedelta:
    """`30d` or `12h`: how old a row must be for `relay prune` to delete it."""
    match = _AGE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"expected a whole number of days or hours such as 30d or 12h, got {text!r}")
    count = int(match[1])
    return timedelta(days=count) if match[2] == "d" else timedelta(hours=count)


# ---------------------------------------------------------------------------------------------------------
# Replay


@dataclass(frozen=True, slots=True)
class Replayed:
    letter_id: int
    status: Literal["resolved", "failing", "already resolved", "not found"]
    detail: str = ""


async def replay_dead_letter(pipeline: Pipeline, letter: DeadLetter) -> Replayed:
    """Runs one dead letter's body through the pipeline; it is resolved if all of its events went in."""
    items = decode_body(letter.body)
    try:
        check_origins(items, pipeline.allowed_tenants, pipeline.allowed_streams)
    except NotAllowed as refused:
        # Not ours to apply any more; the letter keeps the reason, and its body, for a person to judge.
        items = [Undecodable(item.raw, str(refused), item.origin, item.id) for item in items]
    delivery = Delivery(letter.route, items, letter.headers, replaying=letter.id)
    [results] = await pipeline.commit([delivery])
    failures = [result.error or "" for result in results if result.outcome is Outcome.DEAD_LETTERED]
    if failures:
        return Replayed(letter.id, "failing", "; ".join(failures))
    return Replayed(letter.id, "resolved", ", ".join(f"{r.id} {r.outcome.value}" for r in results))


async def replay_dead_letters(
    pool: Pool, letter_ids: Sequence[int], settings: Settings
) -> AsyncIterator[Replayed]:
    """Replays the given dead letters, or every unresolved one when none is given, oldest first."""
    pipeline = Pipeline(pool, settings)
    if letter_ids:
        for letter_id in letter_ids:
            async with store.connection(pool) as conn:
                letter = await store.find_dead_letter(conn, letter_id)
            if letter is None:
                yield Replayed(letter_id, "not found")
            elif letter.resolved_at is not None:
                yield Replayed(letter_id, "already resolved", f"at {_when(letter.resolved_at)}")
            else:
                yield await replay_dead_letter(pipeline, letter)
        return

    after = 0
    while True:
        async with store.connection(pool) as conn:
            page = await store.next_unresolved_dead_letters(conn, after=after, limit=REPLAY_PAGE)
        for letter_id in page:
            async with store.connection(pool) as conn:
                letter = await store.find_dead_letter(conn, letter_id)
            # Resolved or pruned by someone else since the page was read: nothing left to do.
            if letter is not None and letter.resolved_at is None:
                yield await replay_dead_letter(pipeline, letter)
        if len(page) < REPLAY_PAGE:
            return
        after = page[-1]


# ---------------------------------------------------------------------------------------------------------
# Retention


@dataclass(frozen=True, slots=True)
class Pruned:
    cutoff: datetime
    processed_events: int
    dead_letters: int


async def prune(pool: Pool, older_than: timedelta, batch_size: int) -> Pruned:
    """Deletes ledger rows received, and dead letters resolved, more than `older_than` ago, in batches.
    Users, tombstones included, are never touched."""
    async with store.connection(pool) as conn:
        cutoff = await store.prune_cutoff(conn, older_than)
        processed_events = await _in_batches(store.prune_processed_events, conn, cutoff, batch_size)
        dead_letters = await _in_batches(store.prune_resolved_dead_letters, conn, cutoff, batch_size)
    return Pruned(cutoff, processed_events, dead_letters)


async def _in_batches(
    delete: Callable[[Connection, datetime, int], Awaitable[int]],
    conn: Connection,
    cutoff: datetime,
    batch_size: int,
) -> int:
    total = 0
    while True:
        deleted = await delete(conn, cutoff, batch_size)
        total += deleted
        if deleted < batch_size:
            return total


# ---------------------------------------------------------------------------------------------------------
# The commands: what `relay dead-letters …` and `relay prune` print, and their exit codes


async def list_command(
    conninfo: str, settings: Settings, *, include_resolved: bool, limit: int, out: TextIO
) -> int:
    async with open_pool(conninfo, settings) as pool, store.connection(pool) as conn:
        letters = await store.list_dead_letters(conn, include_resolved=include_resolved, limit=limit)
        total = await store.count_dead_letters(conn, include_resolved=include_resolved)
    kind = "dead letters" if include_resolved else "unresolved dead letters"
    if not letters:
        print(f"no {kind}", file=out)
        return 0
    header = ["ID", "RECEIVED", "ROUTE", "BYTES"] + (["RESOLVED"] if include_resolved else []) + ["ERROR"]
    rows = [
        [str(letter.id), _when(letter.received_at), _printable(letter.route), str(letter.body_size)]
        + ([_when(letter.resolved_at) if letter.resolved_at else "-"] if include_resolved else [])
        + [_first_line(letter.error)]
        for letter in letters
    ]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header) - 1)]
    for row in [header, *rows]:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1],
            file=out,
        )
    print(f"{len(letters)} of {total} {kind} shown (oldest first)", file=out)
    return 0


async def show_command(conninfo: str, settings: Settings, letter_id: int, out: TextIO) -> int:
    async with open_pool(conninfo, settings) as pool, store.connection(pool) as conn:
        letter = await store.find_dead_letter(conn, letter_id)
    if letter is None:
        print(f"no dead letter {letter_id}", file=out)
        return 1
    print(f"dead letter {letter.id}", file=out)
    print(f"route:    {_printable(letter.route)}", file=out)
    print(f"received: {_when(letter.received_at)}", file=out)
    print(f"resolved: {_when(letter.resolved_at) if letter.resolved_at else 'no'}", file=out)
    print("headers:", file=out)
    for name, value in sorted(letter.headers.items()):
        print(f"  {_printable(name)}: {_printable(str(value))}", file=out)
    print("error:", file=out)
    for line in letter.error.splitlines() or [""]:
        print(f"  {_printable(line)}", file=out)
    try:
        text = letter.body.decode("utf-8")
    except UnicodeDecodeError:
        shown = letter.body[:HEX_PREVIEW_BYTES]
        more = f", first {len(shown)} in hex" if len(shown) < len(letter.body) else ", in hex"
        print(f"body ({len(letter.body)} bytes, not UTF-8{more}):", file=out)
        for offset in range(0, len(shown), 16):
            chunk = shown[offset : offset + 16]
            print(f"  {offset:08x}  {chunk.hex(' ')}", file=out)
    else:
        print(f"body ({len(letter.body)} bytes, UTF-8):", file=out)
        print(_printable(text), file=out)
    return 0


async def replay_command(conninfo: str, settings: Settings, letter_ids: Sequence[int], out: TextIO) -> int:
    """Exit status 1 when any dead letter still fails or was not found, so scripts can tell."""
    counts: dict[str, int] = {}
    async with open_pool(conninfo, settings) as pool:
        async for replayed in replay_dead_letters(pool, letter_ids, settings):
            counts[replayed.status] = counts.get(replayed.status, 0) + 1
            detail = f": {_first_line(replayed.detail)}" if replayed.detail else ""
            print(f"dead letter {replayed.letter_id}: {replayed.status}{detail}", file=out)
    if not counts:
        print("no unresolved dead letters", file=out)
        return 0
    print("replayed: " + ", ".join(f"{count} {status}" for status, count in counts.items()), file=out)
    return 1 if counts.keys() & {"failing", "not found"} else 0


async def resolve_command(conninfo: str, settings: Settings, letter_id: int, out: TextIO) -> int:
    async with open_pool(conninfo, settings) as pool, store.connection(pool) as conn:
        letter = await store.find_dead_letter(conn, letter_id)
        if letter is None:
            print(f"no dead letter {letter_id}", file=out)
            return 1
        if letter.resolved_at is not None or not await store.resolve_dead_letter(conn, letter_id):
            print(f"dead letter {letter_id} was already resolved", file=out)
            return 0
    print(f"dead letter {letter_id} resolved (not replayed)", file=out)
    return 0


async def prune_command(
    conninfo: str, settings: Settings, older_than: timedelta, batch_size: int, out: TextIO
) -> int:
    async with open_pool(conninfo, settings) as pool:
        pruned = await prune(pool, older_than, batch_size)
    cutoff = _when(pruned.cutoff)
    print(f"processed_events: deleted {pruned.processed_events} rows received before {cutoff}", file=out)
    print(f"dead_letters: deleted {pruned.dead_letters} resolved before {cutoff}", file=out)
    print("users: kept (tombstones are never pruned)", file=out)
    return 0


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _first_line(text: str) -> str:
    line = _printable(text.strip().splitlines()[0] if text.strip() else "")
    return line if len(line) <= ERROR_COLUMN_WIDTH else line[: ERROR_COLUMN_WIDTH - 1] + "…"


def _printable(text: str) -> str:
    """Control characters escaped: a stored body is someone else's text, and must not drive the terminal."""
    return "".join(
        char if char in "\n\t" or unicodedata.category(char) != "Cc" else f"\\x{ord(char):02x}"
        for char in text
    )
