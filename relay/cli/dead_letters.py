"""`relay dead-letters list | show | replay | resolve`: stored bodies and errors shown with their control
characters escaped (they are someone else's text, and must not drive the terminal); exit status 1 when the
dead letter asked for is not there, or a replay still fails. A letter that holds nothing to replay is
reported with why and left as it is, without failing the replay: a person reads it and resolves it."""

from __future__ import annotations

import argparse
import asyncio
import unicodedata
from collections.abc import Sequence

from relay import operations
from relay.cli.database import database
from relay.operations import iso_utc
from relay.settings import Settings
from relay.store import open_pool

# Larger bodies are shown in hex only this far; the whole body stays in the table.
HEX_PREVIEW_BYTES = 512
ERROR_COLUMN_WIDTH = 100


def dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    conninfo, _ = database(settings)
    command = args.dead_letters_command
    if command == "list":
        return asyncio.run(list_letters(conninfo, settings, include_resolved=args.all, limit=args.limit))
    if command == "show":
        return asyncio.run(show(conninfo, settings, args.id))
    if command == "replay":
        return asyncio.run(replay(conninfo, settings, args.ids))
    return asyncio.run(resolve(conninfo, settings, args.id))


async def list_letters(conninfo: str, settings: Settings, *, include_resolved: bool, limit: int) -> int:
    async with open_pool(conninfo, settings) as pool:
        listing = await operations.list_dead_letters(pool, include_resolved=include_resolved, limit=limit)
    kind = "dead letters" if include_resolved else "unresolved dead letters"
    if not listing.letters:
        print(f"no {kind}")
        return 0
    header = ["ID", "RECEIVED", "ROUTE", "BYTES"] + (["RESOLVED"] if include_resolved else []) + ["ERROR"]
    rows = [
        [str(letter.id), iso_utc(letter.received_at), _printable(letter.route), str(letter.body_size)]
        + ([iso_utc(letter.resolved_at) if letter.resolved_at else "-"] if include_resolved else [])
        + [_first_line(letter.error)]
        for letter in listing.letters
    ]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header) - 1)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
    print(f"{len(listing.letters)} of {listing.total} {kind} shown (oldest first)")
    return 0


async def show(conninfo: str, settings: Settings, letter_id: int) -> int:
    async with open_pool(conninfo, settings) as pool:
        letter = await operations.find_dead_letter(pool, letter_id)
    if letter is None:
        print(f"no dead letter {letter_id}")
        return 1
    print(f"dead letter {letter.id}")
    print(f"route:    {_printable(letter.route)}")
    print(f"received: {iso_utc(letter.received_at)}")
    print(f"resolved: {iso_utc(letter.resolved_at) if letter.resolved_at else 'no'}")
    print("headers:")
    for name, value in sorted(letter.headers.items()):
        print(f"  {_printable(name)}: {_printable(str(value))}")
    print("error:")
    for line in letter.error.splitlines() or [""]:
        print(f"  {_printable(line)}")
    try:
        text = letter.body.decode("utf-8")
    except UnicodeDecodeError:
        shown = letter.body[:HEX_PREVIEW_BYTES]
        more = f", first {len(shown)} in hex" if len(shown) < len(letter.body) else ", in hex"
        print(f"body ({len(letter.body)} bytes, not UTF-8{more}):")
        for offset in range(0, len(shown), 16):
            chunk = shown[offset : offset + 16]
            print(f"  {offset:08x}  {chunk.hex(' ')}")
    else:
        print(f"body ({len(letter.body)} bytes, UTF-8):")
        print(_printable(text))
    return 0


async def replay(conninfo: str, settings: Settings, letter_ids: Sequence[int]) -> int:
    """Exit status 1 when a dead letter that could be replayed still fails, or one asked for was not found,
    so scripts can tell; one that holds nothing to replay does not count against it."""
    counts: dict[str, int] = {}
    async with open_pool(conninfo, settings) as pool:
        async for replayed in operations.replay_dead_letters(pool, letter_ids, settings):
            counts[replayed.status] = counts.get(replayed.status, 0) + 1
            detail = f": {_first_line(replayed.detail)}" if replayed.detail else ""
            print(f"dead letter {replayed.letter_id}: {replayed.status}{detail}")
    if not counts:
        print("no unresolved dead letters")
        return 0
    print("replayed: " + ", ".join(f"{count} {status}" for status, count in counts.items()))
    if "not replayable" in counts:
        print(
            "not replayable ones are left unresolved: read each with `relay dead-letters show ID`, then mark "
            "it handled with `relay dead-letters resolve ID`"
        )
    return 1 if counts.keys() & {"failing", "not found"} else 0


async def resolve(conninfo: str, settings: Settings, letter_id: int) -> int:
    async with open_pool(conninfo, settings) as pool:
        resolution = await operations.resolve_dead_letter(pool, letter_id)
    if resolution == "not found":
        print(f"no dead letter {letter_id}")
        return 1
    if resolution == "already resolved":
        print(f"dead letter {letter_id} was already resolved")
        return 0
    print(f"dead letter {letter_id} resolved (not replayed)")
    return 0


def _first_line(text: str) -> str:
    line = _printable(text.strip().splitlines()[0] if text.strip() else "")
    return line if len(line) <= ERROR_COLUMN_WIDTH else line[: ERROR_COLUMN_WIDTH - 1] + "…"


def _printable(text: str) -> str:
    """Control characters escaped: a stored body is someone else's text, and must not drive the terminal."""
    return "".join(
        char if char in "\n\t" or unicodedata.category(char) != "Cc" else f"\\x{ord(char):02x}"
        for char in text
    )
