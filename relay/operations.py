"""Operator tasks on what the relay has stored: dead letters (`relay dead-letters list | show | replay |
resolve`) and retention (`relay prune`). The SQL is in `store.py`; what the commands print is in `relay/cli/`.

A replay treats each dead letter as what its route says it holds:

- a body as it was delivered (`action`, `webhook`, and any other way in that hands the pipeline events) goes
  to the pipeline again, so it meets the current decoder, handlers, allow-lists and the schema's tenant
  exactly as a new delivery would, and is applied at most once whatever happens (the ledger sees to that).
  The same transaction that applies its events resolves the letter, or, if an item still fails, records the
  new error on it; no second copy of the body is made.
- a `catch-up` letter is the one event catch-up could not apply, replayed likewise, or the data of an Events
  API message that held no event (`catch_up.event_in_letter` tells which): nothing to replay, so it is
  reported as not replayable, with why, and left for a person to read and resolve.
- a `backfill` letter is an export row, merged again by the backfill's own rules (`backfill.merge_row`), so
  it never overwrites anything newer and never revives a deleted user. The export merge cannot resolve a
  letter in its own transaction, so the letter is resolved just after it commits; if the command stops in
  between, the next replay finds the row stale and resolves it then.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from relay import backfill, store
from relay.auth0 import catch_up
from relay.events import Item, Undecodable, decode_body, decode_event
from relay.handlers import Outcome
from relay.pipeline import Delivery, NotAllowed, Pipeline, check_origins
from relay.settings import Settings
from relay.store import (
    BatchWrites,
    Connection,
    DeadLetter,
    DeadLetterSummary,
    Pool,
    ReplayFailure,
    StoredUser,
)

# Unresolved dead letters are replayed a page at a time, so their bodies are never all in memory at once.
REPLAY_PAGE = 100

_AGE = re.compile(r"([1-9][0-9]{0,5})([dh])")


def parse_age(text: str) -> timedelta:
    """`30d` or `12h`: how old a row must be for `relay prune` to delete it."""
    match = _AGE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"expected a whole number of days or hours such as 30d or 12h, got {text!r}")
    count = int(match[1])
    return timedelta(days=count) if match[2] == "d" else timedelta(hours=count)


def iso_utc(moment: datetime) -> str:
    """A stored time as the operator commands show it: UTC, to the second, `Z`."""
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# ---------------------------------------------------------------------------------------------------------
# Looking at dead letters


@dataclass(frozen=True, slots=True)
class DeadLetterListing:
    letters: list[DeadLetterSummary]  # oldest first, at most the limit asked for
    total: int  # how many there are in all


async def list_dead_letters(pool: Pool, *, include_resolved: bool, limit: int) -> DeadLetterListing:
    """The unresolved dead letters (all of them with `include_resolved`), oldest first."""
    async with store.connection(pool) as conn:
        letters = await store.list_dead_letters(conn, include_resolved=include_resolved, limit=limit)
        total = await store.count_dead_letters(conn, include_resolved=include_resolved)
    return DeadLetterListing(letters, total)


async def find_dead_letter(pool: Pool, letter_id: int) -> DeadLetter | None:
    async with store.connection(pool) as conn:
        return await store.find_dead_letter(conn, letter_id)


Resolution = Literal["resolved", "already resolved", "not found"]


async def resolve_dead_letter(pool: Pool, letter_id: int) -> Resolution:
    """Marks a dead letter handled without replaying it."""
    async with store.connection(pool) as conn:
        letter = await store.find_dead_letter(conn, letter_id)
        if letter is None:
            return "not found"
        if letter.resolved_at is not None or not await store.resolve_dead_letter(conn, letter_id):
            return "already resolved"
    return "resolved"


# ---------------------------------------------------------------------------------------------------------
# Replay


ReplayStatus = Literal["resolved", "failing", "not replayable", "already resolved", "not found"]


@dataclass(frozen=True, slots=True)
class Replayed:
    letter_id: int
    status: ReplayStatus
    detail: str = ""  # what went in, why it still fails, or why there is nothing to replay


async def replay_dead_letter(
    pipeline: Pipeline, pool: Pool, settings: Settings, letter: DeadLetter
) -> Replayed:
    """Replays one dead letter as its route calls for; it is resolved if what it holds went in."""
    if letter.route == backfill.DEAD_LETTER_ROUTE:
        return await _replay_export_row(pool, settings, letter)
    if letter.route == catch_up.DEAD_LETTER_ROUTE:
        event = catch_up.event_in_letter(letter.body)
        if isinstance(event, catch_up.NoEvent):
            return Replayed(letter.id, "not replayable", event.reason)
        return await _replay_events(pipeline, letter, [decode_event(event)])
    return await _replay_events(pipeline, letter, decode_body(letter.body))


async def _replay_events(pipeline: Pipeline, letter: DeadLetter, items: list[Item]) -> Replayed:
    try:
        check_origins(items, pipeline.allowed_tenants, pipeline.allowed_streams)
        await pipeline.check_tenant(items)
    except NotAllowed as refused:
        # Not ours to apply any more; the letter keeps the reason, and its body, for a person to judge.
        items = [Undecodable(item.raw, str(refused), item.origin, item.id) for item in items]
    delivery = Delivery(letter.route, items, letter.headers, replaying=letter.id)
    [results] = await pipeline.commit([delivery])
    failures = [result.error or "" for result in results if result.outcome is Outcome.DEAD_LETTERED]
    if failures:
        return Replayed(letter.id, "failing", "; ".join(failures))
    return Replayed(letter.id, "resolved", ", ".join(f"{r.id} {r.outcome.value}" for r in results))


async def _replay_export_row(pool: Pool, settings: Settings, letter: DeadLetter) -> Replayed:
    merged = await backfill.merge_row(
        pool,
        letter.body,
        settings.delete_mode,
        keep_history=settings.history,
        change_feed=settings.change_feed_channel,
    )
    if isinstance(merged, str):
        if merged != letter.error:
            await _record_replay_failure(pool, letter.id, merged)
        return Replayed(letter.id, "failing", merged)
    async with store.connection(pool) as conn:
        await store.resolve_dead_letter(conn, letter.id)
    return Replayed(letter.id, "resolved", f"export row of {merged.user_id} {merged.outcome}")


async def _record_replay_failure(pool: Pool, letter_id: int, error: str) -> None:
    """The new error on a letter that still fails, written as a failing event replay's is: by the batch
    statement's `replay_failures`, with nothing else in the batch."""

    def writes(_processed: frozenset[str], _known: dict[str, StoredUser]) -> BatchWrites:
        return BatchWrites(replay_failures=[ReplayFailure(letter_id, error)])

    await store.commit_batch(pool, [], [], writes)


async def replay_dead_letters(
    pool: Pool, letter_ids: Sequence[int], settings: Settings
) -> AsyncIterator[Replayed]:
    """Replays the given dead letters, or every unresolved one when none is given, oldest first; one that
    cannot be replayed, or still fails, is reported and the rest go on."""
    pipeline = Pipeline(pool, settings)
    if letter_ids:
        for letter_id in letter_ids:
            async with store.connection(pool) as conn:
                letter = await store.find_dead_letter(conn, letter_id)
            if letter is None:
                yield Replayed(letter_id, "not found")
            elif letter.resolved_at is not None:
                yield Replayed(letter_id, "already resolved", f"at {iso_utc(letter.resolved_at)}")
            else:
                yield await replay_dead_letter(pipeline, pool, settings, letter)
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
                yield await replay_dead_letter(pipeline, pool, settings, letter)
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
    user_events: int


async def prune(pool: Pool, older_than: timedelta, batch_size: int) -> Pruned:
    """Deletes ledger rows received, dead letters resolved, and history rows of events, more than
    `older_than` ago, in batches. Users, tombstones included, are never touched."""
    async with store.connection(pool) as conn:
        cutoff = await store.prune_cutoff(conn, older_than)
        processed_events = await _in_batches(store.prune_processed_events, conn, cutoff, batch_size)
        dead_letters = await _in_batches(store.prune_resolved_dead_letters, conn, cutoff, batch_size)
        user_events = await _in_batches(store.prune_user_events, conn, cutoff, batch_size)
    return Pruned(cutoff, processed_events, dead_letters, user_events)


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
