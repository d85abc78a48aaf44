"""From an authenticated body to committed outcomes: the one place that decides what becomes of an event.

Both routes, and the operator tools that replay events, come through here. An event that cannot be decoded,
or that PostgreSQL refuses as data (a NUL character, a value out of range), is kept in `dead_letters` and
acknowledged: Auth0 never retries a 4xx, and one bad event must never disable the stream. A database that
cannot be reached is the caller's to answer with 503, since nothing was committed.

With the allow-lists set, a body holding an event that names another tenant or stream is refused whole
(`NotAllowed`, answered 403) before anything is stored: it is not ours to keep, not even as a dead letter,
and the failures Auth0 records make the misdirected stream visible, and eventually disable it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from psycopg_pool import AsyncConnectionPool

from relay.batching import Result, Unstorable
from relay.events import (
    Event,
    EventKind,
    Origin,
    UndecodableEvent,
    UserEvent,
    decode_event,
    read_origin,
    split_body,
)
from relay.handlers import Outcome
from relay.observability import count_events, observe_lag
from relay.store import Connection, record_dead_letter, record_replay_failure

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
    event_type: str | None = None
    user_id: str | None = None


class NotAllowed(Exception):
    """Authentic, but an event names a tenant or stream outside the allow-lists; nothing was stored."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Applier(Protocol):
    """Applies decoded events and answers once they are committed: the group committer, or a direct call."""

    async def __call__(self, events: Sequence[Event]) -> list[Result]: ...


async def ingest_body(
    pool: AsyncConnectionPool[Connection],
    apply: Applier,
    *,
    route: str,
    headers: Mapping[str, str],
    body: bytes,
    expected_event_id: str | None = None,
    allowed_tenants: Collection[str] = (),
    allowed_streams: Collection[str] = (),
    replaying: int | None = None,
) -> list[EventResult]:
    """Decodes, applies and records every event of an authenticated request body.

    `allowed_tenants` and `allowed_streams`, when not empty, are the only origins accepted: any other
    raises `NotAllowed` before anything is stored. `replaying` is the id of the dead letter this body
    comes from: a failure then updates that dead letter's error instead of keeping the body twice.
    """

    async def dead_letter(raw: bytes, error: str, event: Event | None = None) -> EventResult:
        async with pool.connection() as conn:
            if replaying is None:
                kept_headers = {
                    name: value for name, value in headers.items() if name.lower() in DIAGNOSTIC_HEADERS
                }
                letter_id = await record_dead_letter(conn, route, raw, kept_headers, error)
            else:
                letter_id = await record_replay_failure(conn, replaying, error)
        return _result(event, Outcome.DEAD_LETTERED, letter_id, error)

    try:
        items = split_body(body)
    except UndecodableEvent as error:
        return _counted([await dead_letter(body, str(error))])
    if allowed_tenants or allowed_streams:
        for raw in items:
            refusal = _origin_refusal(read_origin(raw), allowed_tenants, allowed_streams)
            if refusal is not None:
                raise NotAllowed(refusal)

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
                raw, f"webhook-id header {expected_event_id!r} does not match the event id", event
            )
            continue
        decoded.append((index, raw, event))

    applied = await apply([event for _, _, event in decoded]) if decoded else []
    for (index, raw, event), result in zip(decoded, applied, strict=True):
        if isinstance(result, Unstorable):
            results[index] = await dead_letter(raw, result.error, event)
        else:
            results[index] = _result(event, result)
    observe_lag(event.time.timestamp() for _, _, event in decoded if isinstance(event, UserEvent))
    return _counted([result for result in results if result is not None])


def _origin_refusal(
    origin: Origin | None, allowed_tenants: Collection[str], allowed_streams: Collection[str]
) -> str | None:
    """Why an item's origin is outside the allow-lists, or None when it may be taken.

    An item that is not even a JSON object names no origin at all; it is dead-lettered like any other
    undecodable body, since the credentials that came with it are ours.
    """
    if origin is None:
        return None
    for allowed, name, field, variable in (
        (allowed_tenants, origin.tenant, "tenant (a0tenant)", "RELAY_ALLOWED_TENANTS"),
        (allowed_streams, origin.stream, "event stream (a0stream)", "RELAY_ALLOWED_STREAMS"),
    ):
        if not allowed or name in allowed:
            continue
        if name is None:
            return f"the event names no {field}, and this relay accepts only those in {variable}"
        return f"events from {field} {_shortened(name)!r} are not accepted by this relay ({variable})"
    return None


def _shortened(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _result(
    event: Event | None, outcome: Outcome, dead_letter_id: int | None = None, error: str | None = None
) -> EventResult:
    if event is None:
        return EventResult(None, outcome, dead_letter_id, error)
    event_type = event.kind.value if isinstance(event, UserEvent) else event.type
    return EventResult(event.id, outcome, dead_letter_id, error, event_type, event.user_id)


_METRIC_TYPES = frozenset(kind.value for kind in EventKind)


def _counted(results: list[EventResult]) -> list[EventResult]:
    # Types other than the three the relay handles are one label, whatever a sender invents.
    count_events(
        (result.event_type if result.event_type in _METRIC_TYPES else "other", str(result.outcome))
        for result in results
    )
    return results
