"""From an authenticated body to committed outcomes: the one place that decides what becomes of an event.

Both routes, and the operator tools that replay events, come through here. An event that cannot be decoded,
or that PostgreSQL refuses as data (a NUL character, a value out of range), is kept in `dead_letters` and
acknowledged: Auth0 never retries a 4xx, and one bad event must never disable the stream. A database that
cannot be reached is the caller's to answer with 503, since nothing was committed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import psycopg
from psycopg_pool import AsyncConnectionPool

from relay.events import Event, UndecodableEvent, decode_event, split_body
from relay.handlers import Outcome
from relay.settings import DeleteMode
from relay.store import Connection, apply_events, record_dead_letter

# Only these request headers are kept with a dead letter: never credentials or signatures.
DIAGNOSTIC_HEADERS = frozenset(
    {"content-type", "content-length", "user-agent", "webhook-id", "webhook-timestamp", "x-request-id"}
)


@dataclass(frozen=True, slots=True)
class EventResult:
    event_id: str | None
    outcome: Outcome
    dead_letter_id: int | None = None
    error: str | None = None


class _DeadLetter(Protocol):
    async def __call__(self, raw: bytes, error: str, event_id: str | None = None) -> EventResult: ...


def is_unstorable(error: psycopg.Error) -> bool:
    """PostgreSQL refused the event's content itself (SQLSTATE class 22 or 54): retrying cannot help."""
    return isinstance(error, psycopg.DataError) or (error.sqlstate or "")[:2] in ("22", "54")


async def ingest_body(
    pool: AsyncConnectionPool[Connection],
    *,
    route: str,
    headers: Mapping[str, str],
    body: bytes,
    delete_mode: DeleteMode,
    expected_event_id: str | None = None,
) -> list[EventResult]:
    """Decodes, applies and records every event of an authenticated request body."""
    kept_headers = {name: value for name, value in headers.items() if name.lower() in DIAGNOSTIC_HEADERS}

    async def dead_letter(raw: bytes, error: str, event_id: str | None = None) -> EventResult:
        async with pool.connection() as conn:
            letter_id = await record_dead_letter(conn, route, raw, kept_headers, error)
        return EventResult(event_id, Outcome.DEAD_LETTERED, letter_id, error)

    try:
        items = split_body(body)
    except UndecodableEvent as error:
        return [await dead_letter(body, str(error))]

    results: list[EventResult | None] = [None] * len(items)
    decoded: list[tuple[int, bytes, Event]] = []
    for index, raw in enumerate(items):
        try:
            event = decode_event(raw)
        except UndecodableEvent as error:
            results[index] = await dead_letter(raw, str(error))
            continue
        if expected_event_id is not None and event.id != expected_event_id:
            # The signature covers both, so this is a sender bug, not an attack: keep it for a person.
            results[index] = await dead_letter(
                raw, f"webhook-id header {expected_event_id!r} does not match the event id", event.id
            )
            continue
        decoded.append((index, raw, event))

    for index, result in await _apply(pool, decoded, delete_mode, dead_letter):
        results[index] = result
    return [result for result in results if result is not None]


async def _apply(
    pool: AsyncConnectionPool[Connection],
    decoded: Sequence[tuple[int, bytes, Event]],
    delete_mode: DeleteMode,
    dead_letter: _DeadLetter,
) -> list[tuple[int, EventResult]]:
    if not decoded:
        return []
    try:
        async with pool.connection() as conn:
            outcomes = await apply_events(conn, [event for _, _, event in decoded], delete_mode)
    except psycopg.Error as error:
        if not is_unstorable(error):
            raise
        if len(decoded) > 1:
            # Find the culprit: each event on its own, so its batch-mates are still applied.
            isolated = []
            for item in decoded:
                isolated.extend(await _apply(pool, [item], delete_mode, dead_letter))
            return isolated
        index, raw, event = decoded[0]
        return [(index, await dead_letter(raw, f"PostgreSQL refused the event: {error}", event.id))]
    return [
        (index, EventResult(event.id, outcome))
        for (index, _, event), outcome in zip(decoded, outcomes, strict=True)
    ]
