"""`relay catch-up`: apply the user events the relay missed (while it was down, or before Auth0 gave up
retrying), read from the Events API (`GET /api/v2/events`, server-sent events).

The stream is read from the cursor stored by the previous run, or from `--since` a point in time, filtered to
the three user event types. Each message carries an opaque offset (its SSE `id`, also `data.offset`); its
`data` is `{"offset": …, "event": <the CloudEvent>}`, and the CloudEvent goes through the same pipeline as
live traffic, in batches. An event already received live is recorded as a duplicate by the ledger; one that
cannot be decoded or stored is kept in `dead_letters`, and so is the data of a message that holds no event
(`event_in_letter` tells the two apart when a dead letter is replayed).

The live routes' refusals hold here too, judged per event: an event from a tenant or stream outside
`RELAY_ALLOWED_TENANTS` / `RELAY_ALLOWED_STREAMS` (`check_origins`), or naming a tenant other than the one the
schema holds (`Pipeline.check_tenant`), is neither applied nor kept, not even as a dead letter, only counted
as refused; the cursor moves past it, and its batch-mates are applied.

The cursor is stored in PostgreSQL (`event_cursors`) after each committed batch, and `offset-only` messages
(heartbeats that carry a position but no event) advance it too. A batch interrupted before its commit is
rolled back and its events are read again by the next run, which is safe: they become duplicates. Auth0 closes
the connection every few minutes; the reader reconnects from the last offset. With `until_idle` the command
ends by itself once no event has arrived for `idle_seconds`.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import httpx
import msgspec

from relay import store
from relay.auth0.management import MAX_ATTEMPTS, Management, RateLimited, retry_after, rfc3339
from relay.events import Item, Undecodable, decode_event
from relay.pipeline import Delivery, NotAllowed, Pipeline, check_origins
from relay.settings import Settings
from relay.store import Pool, read_cursor, save_cursor

USER_EVENT_TYPES = ("user.created", "user.updated", "user.deleted")
READ_EVENTS = "read:events"
BATCH_MAX_EVENTS = 500
BATCH_MAX_SECONDS = 1.0
DEFAULT_IDLE_SECONDS = 10.0
RECONNECT_SECONDS = 1.0
"""Wait before reconnecting when Auth0 has not said otherwise (`retry:`)."""
MAX_RECONNECT_SECONDS = 10.0
MAX_STREAM_ERRORS = 5
"""Transient `event: error` messages in a row before giving up."""
QUEUED_MESSAGES = 2000
"""Messages read ahead of the database; the reader waits beyond that."""
DEAD_LETTER_ROUTE = "catch-up"
EXPIRED_ADVICE = "run `relay backfill`, then `relay catch-up --since <time>`"
_TRANSIENT_ERRORS = frozenset({"timeout", "connection_timeout"})
_CURSOR_ERRORS = frozenset({"cursor_expired", "invalid_cursor"})
# Why an event is refused, as the catch-up report counts it.
_REFUSALS = (
    "not in RELAY_ALLOWED_TENANTS",
    "not in RELAY_ALLOWED_STREAMS",
    "of a tenant other than the schema's",
)
T = TypeVar("T")


class CatchUpFailed(Exception):
    """Catch-up cannot go on; the message says why and what to do."""


class CursorExpired(CatchUpFailed):
    """Auth0 no longer holds events from the position asked for (410, or `cursor_expired`)."""


def cursor_stream(domain: str) -> str:
    """The `event_cursors.stream` key for a tenant's user events."""
    return f"events-api/{domain}/user-events"


@dataclass
class CatchUpReport:
    received: int = 0  # events committed: applied, or recorded as duplicate, stale, dead-lettered…
    outcomes: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)  # events passed over, by why (`_REFUSALS`)
    cursor: str | None = None  # the position stored in PostgreSQL

    def describe(self) -> str:
        counts = ", ".join(
            f"{self.outcomes[name]} {name.replace('_', '-')}"
            for name in ("applied", "tombstoned", "stale", "duplicate", "ignored", "test", "dead_lettered")
            if self.outcomes[name] or name in ("applied", "duplicate")
        )
        text = f"{self.received} events ({counts})"
        if self.refused:
            reasons = [reason for reason in _REFUSALS if self.refused[reason]]
            why = ", ".join(
                f"{self.refused[reason]} {reason}" if len(reasons) > 1 else reason for reason in reasons
            )
            text += f"; {self.refused.total()} refused ({why})"
        return f"{text}; cursor {self.cursor or 'none'}"


@dataclass(frozen=True, slots=True)
class _Connected:
    """The stream answered 200: what the idle clock starts from."""


@dataclass(frozen=True, slots=True)
class _Received:
    offset: str | None
    body: bytes | None = None  # the CloudEvent, or the undecodable data when `problem` is set
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class _Failed:
    error: BaseException


_Item = _Connected | _Received | _Failed


@dataclass(frozen=True, slots=True)
class NoEvent:
    """A catch-up dead letter that holds no event to replay, and why."""

    reason: str


# A message's `data` is read member by member, the event kept raw for the one event decoder: a member of an
# unexpected type (an offset sent as a number, say) costs that member only, never the event beside it.
_members_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])
# msgspec reports invalid UTF-8 as UnicodeDecodeError, and JSON nested beyond the stack as RecursionError.
_READ_ERRORS = (msgspec.DecodeError, RecursionError, UnicodeDecodeError)


@dataclass
class _Message:
    event: str = "message"
    data: list[str] = field(default_factory=list)
    id: str | None = None


class _SseParser:
    """Server-sent events, line by line (WHATWG rules): `field: value` lines, a blank line ends a message."""

    def __init__(self) -> None:
        self._message = _Message()
        self.retry_seconds: float | None = None

    def feed(self, line: str) -> _Message | None:
        if not line:
            message, self._message = self._message, _Message()
            return message if message.data else None
        if line.startswith(":"):
            return None  # a comment: `:connected`, heartbeats
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._message.data.append(value)
        elif name == "event":
            self._message.event = value or "message"
        elif name == "id" and "\0" not in value:
            self._message.id = value
        elif name == "retry" and value.isdigit():
            self.retry_seconds = min(int(value) / 1000, MAX_RECONNECT_SECONDS)
        return None


async def catch_up(
    api: Management,
    pool: Pool,
    settings: Settings,
    *,
    since: datetime | None = None,
    until_idle: bool = True,
    idle_seconds: float = DEFAULT_IDLE_SECONDS,
    progress: Callable[[str], None] = lambda _line: None,
    on_rate_limit: RateLimited = lambda _what, _seconds: None,
    report: CatchUpReport | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    batch_max_events: int = BATCH_MAX_EVENTS,
    batch_max_seconds: float = BATCH_MAX_SECONDS,
) -> CatchUpReport:
    """Reads and applies events until idle (or forever without `until_idle`); returns what it did, telling
    `progress` after each committed batch. Raises CatchUpFailed, ManagementError or the store's errors.

    `report` is filled in as batches commit, so a caller that is interrupted can still say what was done.
    """
    report = report if report is not None else CatchUpReport()
    stream = cursor_stream(api.domain)
    pipeline = Pipeline(pool, settings)
    async with store.connection(pool) as conn:
        report.cursor = await read_cursor(conn, stream)
    if since is None and report.cursor is None:
        raise CatchUpFailed(
            "no stored cursor yet: pass --since <time> (ISO 8601, e.g. when the relay went down, or when the "
            "backfill started)"
        )
    start_cursor = None if since is not None else report.cursor

    queue: asyncio.Queue[_Item] = asyncio.Queue(QUEUED_MESSAGES)
    reader = asyncio.create_task(_read_events(api, start_cursor, since, queue, sleep, on_rate_limit))
    batch = _Batch()
    loop = asyncio.get_running_loop()
    idle_deadline: float | None = None  # set once connected: waiting for a connection is not idleness
    getter: asyncio.Task[_Item] | None = None

    async def flush() -> None:
        if batch.is_empty(report.cursor):
            return
        await _commit(pool, pipeline, stream, batch, report)
        batch.clear()
        progress(f"catch-up: {report.describe()}")

    try:
        while True:
            waits = []
            if not batch.is_empty(report.cursor):
                waits.append(batch.started + batch_max_seconds - loop.time())
            if until_idle and idle_deadline is not None:
                waits.append(idle_deadline - loop.time())
            if getter is None:
                getter = asyncio.create_task(queue.get())
            done, _ = await asyncio.wait({getter}, timeout=max(0.0, min(waits)) if waits else None)
            if not done:
                if not batch.is_empty(report.cursor) and loop.time() >= batch.started + batch_max_seconds:
                    await flush()
                if until_idle and idle_deadline is not None and loop.time() >= idle_deadline:
                    await flush()
                    return report
                continue
            item, getter = getter.result(), None
            if isinstance(item, _Failed):
                await flush()
                raise item.error
            if isinstance(item, _Connected):
                if idle_deadline is None:
                    idle_deadline = loop.time() + idle_seconds
                continue
            if batch.is_empty(report.cursor):
                batch.started = loop.time()
            if item.offset:
                batch.cursor = item.offset
            if item.body is not None:
                idle_deadline = loop.time() + idle_seconds
                event = (
                    decode_event(item.body) if item.problem is None else Undecodable(item.body, item.problem)
                )
                batch.add(event, await _refusal(event, pipeline))
            if len(batch.items) >= batch_max_events:
                await flush()
    finally:
        for task in (reader, getter):
            if task is not None:
                task.cancel()
        await asyncio.gather(reader, *([getter] if getter else []), return_exceptions=True)


@dataclass
class _Batch:
    items: list[Item] = field(default_factory=list)
    refused: Counter[str] = field(default_factory=Counter)  # events outside the allow-lists, passed over
    cursor: str | None = None
    started: float = 0.0

    def add(self, item: Item, refusal: str | None) -> None:
        """An event to commit, or, when it is refused, one more to count."""
        if refusal is None:
            self.items.append(item)
        else:
            self.refused[refusal] += 1

    def is_empty(self, stored_cursor: str | None) -> bool:
        return not self.items and not self.refused and (self.cursor is None or self.cursor == stored_cursor)

    def clear(self) -> None:
        self.items = []
        self.refused = Counter()
        self.cursor = None


async def _refusal(item: Item, pipeline: Pipeline) -> str | None:
    """Why `item` is not ours to apply or keep, judged as the live routes judge a body (`check_origins`, then
    `Pipeline.check_tenant`, which pins the schema's tenant if none is yet); None when it is ours."""
    allow_lists = (pipeline.allowed_tenants, frozenset[str]()), (frozenset[str](), pipeline.allowed_streams)
    for reason, (tenants, streams) in zip(_REFUSALS, allow_lists, strict=False):
        try:
            check_origins([item], tenants, streams)
        except NotAllowed:
            return reason
    try:
        await pipeline.check_tenant([item])
    except NotAllowed:
        return _REFUSALS[2]
    return None


async def _commit(pool: Pool, pipeline: Pipeline, stream: str, batch: _Batch, report: CatchUpReport) -> None:
    """Commits a batch, then stores the cursor: a crash in between only replays events, never skips one."""
    if batch.items:
        [results] = await pipeline.commit([Delivery(DEAD_LETTER_ROUTE, batch.items)])
        report.outcomes.update(result.outcome.value for result in results)
        report.received += len(results)
    if batch.cursor is not None and batch.cursor != report.cursor:
        async with store.connection(pool) as conn:
            await save_cursor(conn, stream, batch.cursor)
        report.cursor = batch.cursor
    report.refused.update(batch.refused)


async def _read_events(
    api: Management,
    cursor: str | None,
    since: datetime | None,
    queue: asyncio.Queue[_Item],
    sleep: Callable[[float], Awaitable[None]],
    on_rate_limit: RateLimited,
) -> None:
    try:
        await _read_forever(api, cursor, since, queue, sleep, on_rate_limit)
    except Exception as error:
        await queue.put(_Failed(error))


async def _read_forever(
    api: Management,
    cursor: str | None,
    since: datetime | None,
    queue: asyncio.Queue[_Item],
    sleep: Callable[[float], Awaitable[None]],
    on_rate_limit: RateLimited,
) -> None:
    what = "read the Events API"
    rate_limited = 0
    stream_errors = 0
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=None)) as http:
        while True:
            params: dict[str, str | list[str]] = {"event_type": list(USER_EVENT_TYPES)}
            if cursor is not None:
                params["from"] = cursor
            elif since is not None:
                params["from_timestamp"] = rfc3339(since)
            headers = {
                "authorization": f"Bearer {api.access_token(what, READ_EVENTS)}",
                "accept": "text/event-stream",
            }
            parser = _SseParser()
            async with http.stream(
                "GET", f"https://{api.domain}/api/v2/events", params=params, headers=headers
            ) as response:
                if response.status_code == 429 and rate_limited + 1 < MAX_ATTEMPTS:
                    rate_limited += 1
                    wait = retry_after(response.headers)
                    on_rate_limit(what, wait)
                    await sleep(wait)
                    continue
                if response.status_code == 410:
                    raise _expired(cursor, since)
                if not response.is_success:
                    await response.aread()
                    raise api.refused(response, what, READ_EVENTS)
                rate_limited = 0
                await queue.put(_Connected())
                async for line in response.aiter_lines():
                    message = parser.feed(line)
                    if message is None:
                        continue
                    if message.event == "error":
                        stream_errors += 1
                        _check_stream_error(message, cursor, since, stream_errors)
                        break
                    stream_errors = 0
                    item = _received(message)
                    if item.offset:
                        cursor = item.offset
                    if item.offset or item.body is not None:
                        await queue.put(item)
            # Auth0 closes connections every few minutes to balance load: go on from the last offset.
            await sleep(parser.retry_seconds if parser.retry_seconds is not None else RECONNECT_SECONDS)


def _received(message: _Message) -> _Received:
    data = "\n".join(message.data).encode()
    members = _members(data)
    offset = message.id or _member(members, "offset", str)
    if message.event == "offset-only":
        return _Received(offset)
    event = _event_in(members)
    if isinstance(event, str):
        return _Received(offset, data, f"Events API {message.event!r} message {event}")
    return _Received(offset, event)


def event_in_letter(body: bytes) -> bytes | NoEvent:
    """The CloudEvent to replay from a catch-up dead letter, or why it holds none.

    Catch-up keeps either the event it could not apply, or the data of a message it took no event from; the
    data is told apart by its `offset` or `event` member, which no CloudEvent has. A message that an older
    relay could not read, but this one can, gives up its event.
    """
    members = _members(body)
    if isinstance(members, str):
        return NoEvent(f"the letter {members}")
    if not members.keys() & {"offset", "event"}:
        return body
    event = _event_in(members)
    return NoEvent(f"the Events API message {event}") if isinstance(event, str) else event


def _members(data: bytes) -> dict[str, msgspec.Raw] | str:
    """A message's members, or why it could not be read."""
    try:
        return _members_decoder.decode(data)
    except RecursionError:
        return "could not be read: JSON nested too deeply"
    except UnicodeDecodeError:
        return "could not be read: a JSON string is not valid UTF-8"
    except msgspec.DecodeError as error:
        return f"could not be read: {error}"


def _event_in(members: dict[str, msgspec.Raw] | str) -> bytes | str:
    """The event of a message, or why there is none (completing "the message …")."""
    if isinstance(members, str):
        return members
    event = bytes(members["event"]) if "event" in members else b"null"
    if event == b"null":
        return "has no event"
    if not event.startswith(b"{"):
        return "holds an event that is not a JSON object"
    return event


def _member(members: dict[str, msgspec.Raw] | str, name: str, kind: type[T]) -> T | None:
    """One member of a message, if it is there and of the kind expected."""
    if isinstance(members, str) or name not in members:
        return None
    try:
        return msgspec.json.decode(members[name], type=kind)
    except _READ_ERRORS:  # a ValidationError is a DecodeError
        return None


def _check_stream_error(message: _Message, cursor: str | None, since: datetime | None, count: int) -> None:
    """Raises for a terminal `event: error`; returns when reconnecting is the cure."""
    error = _member(_members("\n".join(message.data).encode()), "error", dict[str, Any]) or {}
    code = str(error.get("code") or "unknown")
    words = f"{code}: {error.get('message') or 'no message'}"
    if code in _CURSOR_ERRORS:
        raise _expired(cursor, since, f" ({words})")
    if code in _TRANSIENT_ERRORS and count < MAX_STREAM_ERRORS:
        return
    raise CatchUpFailed(f"Auth0 ended the event stream with an error ({words}); run relay catch-up again")


def _expired(cursor: str | None, since: datetime | None, detail: str = "") -> CursorExpired:
    if cursor is not None:
        return CursorExpired(
            f"the stored cursor has expired{detail}: {EXPIRED_ADVICE}. Auth0 keeps events for a limited "
            "time; the backfill copies every user as they are now, and --since picks up events from then on"
        )
    moment = rfc3339(since) if since is not None else "the start"
    return CursorExpired(f"Auth0 no longer holds events from {moment}{detail}: {EXPIRED_ADVICE}")
