"""Events in, one decision each, one committed batch out.

Every way in (the HTTP routes, catch-up, dead-letter replay) hands the pipeline a `Delivery`: the decoded
items of one body, the route they came by, and the headers worth keeping with a dead letter. Deliveries from
concurrent requests are committed together (`batching.GroupCommitter`), and `decide` is the one place an
item's outcome is settled: `applied`, `tombstoned`, `stale`, `duplicate`, `test`, `ignored` or
`dead_lettered`. The ledger rows, the users and the dead letters of a batch are written in one transaction,
so a delivery is answered only once all of it is committed.

No item can make another item's delivery fail. An exception while merging one event makes that event a dead
letter and leaves its batch-mates alone; if PostgreSQL refuses a batch's data, the batch is split until the
item it refuses is found and kept as a dead letter. Only a database that cannot be reached (or is not
migrated) fails a delivery, and then every delivery of the batch alike, with nothing committed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import msgspec

from relay import store
from relay.batching import GroupCommitter
from relay.events import EventKind, Item, OtherEvent, Undecodable, UserEvent
from relay.handlers import Outcome, UserState, apply_event
from relay.observability import BATCH_SIZE, COMMIT_SECONDS, count_events, observe_lag
from relay.settings import DeleteMode, Settings
from relay.signing import DIAGNOSTIC_HEADERS
from relay.store import BatchWrites, HistoryRow, LedgerRow, NewDeadLetter, ReplayFailure, StoredUser

log = logging.getLogger("relay.pipeline")


class Delivery(msgspec.Struct, frozen=True):
    """The items of one body, decoded, with what a dead letter keeps of where they came from."""

    route: str
    items: list[Item]
    headers: Mapping[str, str] = {}  # of the request; a dead letter keeps only `DIAGNOSTIC_HEADERS`
    replaying: int | None = None  # the dead letter this body is replayed from

    def __len__(self) -> int:
        return len(self.items)


class EventResult(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True):
    """What became of one item; also the shape of each entry in a 200 answer (`id` left out when the item's
    id could not be read)."""

    id: str | None = None
    outcome: Outcome
    dead_letter_id: int | None = None
    error: str | None = None


class NotAllowed(Exception):
    """Authentic, but not ours to keep: an item names a tenant or stream outside the allow-lists, or a tenant
    other than the one the schema holds. Nothing was stored. `code` names the reason in a word."""

    def __init__(self, reason: str, code: str = "origin_not_allowed") -> None:
        super().__init__(reason)
        self.code = code


def diagnostic_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers kept with a dead letter, so a person can tell where it came from."""
    return {name: value for name, value in headers.items() if name.lower() in DIAGNOSTIC_HEADERS}


def check_origins(
    items: Sequence[Item], allowed_tenants: Collection[str], allowed_streams: Collection[str]
) -> None:
    """Raises `NotAllowed` when an item names a tenant or stream outside the allow-lists (when set).

    A body holding such an item is refused whole: it is not ours to keep, not even as a dead letter, and the
    failures Auth0 records make the misdirected stream visible. An item that is not even a JSON object cannot
    say where it comes from, so it is refused too: with the allow-lists set, the relay keeps nothing it
    cannot place, however authentic the request.
    """
    if not (allowed_tenants or allowed_streams):
        return
    for item in items:
        origin = item.origin
        if origin is None:
            variable = "RELAY_ALLOWED_TENANTS" if allowed_tenants else "RELAY_ALLOWED_STREAMS"
            raise NotAllowed(
                f"the body is not a JSON object naming its origin; this relay takes only those in {variable}"
            )
        for allowed, name, what, variable in (
            (allowed_tenants, origin.tenant, "tenant (a0tenant)", "RELAY_ALLOWED_TENANTS"),
            (allowed_streams, origin.stream, "event stream (a0stream)", "RELAY_ALLOWED_STREAMS"),
        ):
            if not allowed or name in allowed:
                continue
            if name is None:
                raise NotAllowed(f"the event names no {what}; this relay accepts only those in {variable}")
            shown = name if len(name) <= 64 else name[:64] + "…"
            raise NotAllowed(f"events from {what} {shown!r} are not accepted by this relay ({variable})")


# ---------------------------------------------------------------------------------------------------------
# The decision

Entry = tuple[Delivery, Item]  # an item, with the delivery it came in

# The outcomes of events the handlers merged: what history keeps, whatever the order they came in.
_MERGED = frozenset({Outcome.APPLIED, Outcome.TOMBSTONED, Outcome.STALE})


@dataclass(slots=True)
class _Decided:
    """Outcomes (and errors) per entry of a batch, in the batch's order, and what to write."""

    outcomes: list[Outcome]
    errors: dict[int, str] = field(default_factory=dict)  # entry index -> why it is a dead letter
    writes: BatchWrites = field(default_factory=BatchWrites)
    # entry index -> position in writes.dead_letters
    letter_index: dict[int, int] = field(default_factory=dict)


def decide(
    entries: Sequence[Entry],
    processed: Collection[str],
    stored: Mapping[str, StoredUser],
    delete_mode: DeleteMode,
    keep_history: bool = False,
) -> _Decided:
    """Every entry's outcome, and the writes that carry them out; pure.

    `processed` are the event ids the ledger already holds; `stored` the batch's known users as they are.
    Entries are considered in version order, so outcomes read as they would had the events come one by one.
    With `keep_history`, every user event merged (applied, tombstoned or stale) is kept in `user_events`.
    """
    decided = _Decided([Outcome.DUPLICATE] * len(entries))
    first_copy: dict[str, int] = {}  # event id -> the entry that stands for it in this batch
    copies: list[tuple[int, int]] = []  # (a later copy, its first copy), both in this batch
    by_user: dict[str, list[tuple[int, UserEvent]]] = {}
    for index in sorted(range(len(entries)), key=lambda index: _version_order(entries[index][1])):
        match item := entries[index][1]:
            case Undecodable(reason=reason):
                decided.outcomes[index] = Outcome.DEAD_LETTERED
                decided.errors[index] = reason
            case OtherEvent() | UserEvent() if item.id in processed:
                decided.outcomes[index] = Outcome.DUPLICATE
            case OtherEvent() | UserEvent() if item.id in first_copy:
                copies.append((index, first_copy[item.id]))
            case OtherEvent(is_test=is_test):
                first_copy[item.id] = index
                decided.outcomes[index] = Outcome.TEST if is_test else Outcome.IGNORED
            case UserEvent(user_id=user_id):
                first_copy[item.id] = index
                by_user.setdefault(user_id, []).append((index, item))

    for user_id, events in by_user.items():
        known = stored.get(user_id)
        state = _merge(user_id, known, events, decided, delete_mode)
        if state is None:
            continue
        if known is None:
            decided.writes.new_users.append(state)
        elif not known.holds(state):
            decided.writes.changed_users.append((state, known.row_version))
        # Else the events changed nothing (stale ones, or a redelivery under a new id): the row is left as it
        # is, unlocked, and is not announced on the change feed. A batch that changes it meanwhile carries
        # everything these events would have written, since the merge keeps the newest of each field.
        if keep_history:
            decided.writes.history.extend(
                HistoryRow.of(event) for index, event in events if decided.outcomes[index] in _MERGED
            )
    for index, first in copies:
        # A copy shares its first copy's fate: a duplicate of what is recorded, else set aside alike.
        if decided.outcomes[first] is Outcome.DEAD_LETTERED:
            decided.outcomes[index] = Outcome.DEAD_LETTERED
            decided.errors[index] = decided.errors[first]

    for index, (delivery, item) in enumerate(entries):
        outcome = decided.outcomes[index]
        if outcome is Outcome.DEAD_LETTERED:
            if delivery.replaying is None:
                decided.letter_index[index] = len(decided.writes.dead_letters)
                decided.writes.dead_letters.append(
                    NewDeadLetter(
                        delivery.route, item.raw, diagnostic_headers(delivery.headers), decided.errors[index]
                    )
                )
        elif outcome is not Outcome.DUPLICATE:
            assert not isinstance(item, Undecodable)
            decided.writes.ledger.append(LedgerRow(item.id, _type_of(item), item.user_id, item.time, outcome))
    _settle_replays(entries, decided)
    return decided


def _merge(
    user_id: str,
    known: StoredUser | None,
    events: list[tuple[int, UserEvent]],
    decided: _Decided,
    delete_mode: DeleteMode,
) -> UserState | None:
    """The user's state with `events` merged in (in version order); an event whose merge raises is made a dead
    letter and the merge starts over without it, so a half-applied event never reaches the row."""
    while True:
        state = known.state(user_id) if known is not None else UserState(user_id)
        for index, event in events:
            try:
                decided.outcomes[index] = apply_event(state, event, delete_mode)
            except Exception as error:
                log.warning(
                    "event could not be merged; kept as a dead letter",
                    extra={"fields": {"event_id": event.id, "error_class": type(error).__name__}},
                )
                decided.outcomes[index] = Outcome.DEAD_LETTERED
                decided.errors[index] = f"the event could not be merged ({type(error).__name__})"
                events = [entry for entry in events if entry[0] != index]
                break
        else:
            return state if events else None


def _settle_replays(entries: Sequence[Entry], decided: _Decided) -> None:
    """A replayed dead letter keeps the errors of its items that fail again (no second copy of its body is
    made), and is resolved once all of its items went in. Its items are settled together only when all of
    them are in this batch; a batch split to isolate a refused item records that item's error and resolves
    nothing, which is right, since the letter still fails."""
    replayed: dict[int, tuple[Delivery, list[int]]] = {}
    for index, (delivery, _) in enumerate(entries):
        if delivery.replaying is not None:
            replayed.setdefault(id(delivery), (delivery, []))[1].append(index)
    for delivery, indexes in replayed.values():
        assert delivery.replaying is not None
        errors = [decided.errors[index] for index in indexes if index in decided.errors]
        if errors:
            decided.writes.replay_failures.append(ReplayFailure(delivery.replaying, "\n".join(errors)))
        elif len(indexes) == len(delivery.items):
            decided.writes.resolved_letters.append(delivery.replaying)


def _version_order(item: Item) -> tuple[int, str]:
    if isinstance(item, UserEvent):
        return item.version
    return (0, item.id if isinstance(item, OtherEvent) else "")


def _type_of(item: UserEvent | OtherEvent) -> str:
    return item.kind if isinstance(item, UserEvent) else item.type


# ---------------------------------------------------------------------------------------------------------
# Committing


class Pipeline:
    """Deliveries in, results out, each answered once its batch has committed."""

    def __init__(self, pool: store.Pool, settings: Settings) -> None:
        self._pool = pool
        self._schema = settings.db_schema
        self._tenant: str | None = None  # the tenant the schema holds, once known
        self._pinning = asyncio.Lock()
        self._delete_mode = settings.delete_mode
        self._keep_history = settings.history
        self._change_feed = settings.change_feed_channel
        self.allowed_tenants = settings.allowed_tenants
        self.allowed_streams = settings.allowed_streams
        self._committer: GroupCommitter[Delivery, list[EventResult]] = GroupCommitter(
            self.commit,
            max_batch=settings.batch_max_events,
            max_wait_seconds=settings.batch_max_wait_ms / 1000,
            max_queued=settings.queue_max_events,
            flushers=settings.batch_flushers,
        )

    @property
    def queued_events(self) -> int:
        return self._committer.queued

    def start(self) -> None:
        self._committer.start()

    async def close(self) -> None:
        """Commits every delivery already accepted."""
        await self._committer.close()

    async def deliver(self, delivery: Delivery) -> list[EventResult]:
        """The results of a delivery's items once committed. Raises `NotAllowed` (nothing stored),
        `batching.Saturated`, or a `StoreError` (nothing committed)."""
        check_origins(delivery.items, self.allowed_tenants, self.allowed_streams)
        await self.check_tenant(delivery.items)
        if not delivery.items:
            return []
        return await self._committer.submit(delivery)

    async def check_tenant(self, items: Sequence[Item]) -> None:
        """Raises `NotAllowed` when an item names a tenant other than the one this schema holds; the first
        tenant to deliver an event is pinned. Items that name no tenant are taken as the schema's."""
        named = {item.origin.tenant for item in items if item.origin is not None and item.origin.tenant}
        if not named:
            return
        if len(named) > 1:
            raise NotAllowed(f"the body mixes events of tenants {sorted(named)!r}", "other_tenant")
        [tenant] = named
        if self._tenant is None:
            # Once pinned, a schema's tenant never changes: each process asks PostgreSQL once, and requests
            # that come meanwhile wait their turn behind that one question.
            async with self._pinning:
                if self._tenant is None:
                    self._tenant = await store.pin_tenant(self._pool, tenant)
        if tenant != self._tenant:
            shown = tenant if len(tenant) <= 64 else tenant[:64] + "…"
            raise NotAllowed(
                f"schema {self._schema!r} holds the users of tenant {self._tenant!r}, not {shown!r}: "
                "give each tenant a RELAY_DB_SCHEMA of its own",
                "other_tenant",
            )

    async def commit(self, deliveries: list[Delivery]) -> list[list[EventResult]]:
        """Commits deliveries in one transaction (or, if PostgreSQL refuses some of their data, in as many as
        it takes to find the items it refuses); one list of results per delivery."""
        started = time.perf_counter()
        entries = [(delivery, item) for delivery in deliveries for item in delivery.items]
        parts = await store.commit_isolating(entries, self._commit_entries, self._set_aside, what="event")
        results = [result for part in parts for result in part]
        BATCH_SIZE.observe(len(entries))
        COMMIT_SECONDS.observe(time.perf_counter() - started)
        _report(entries, results)
        grouped, start = [], 0
        for delivery in deliveries:
            grouped.append(results[start : start + len(delivery.items)])
            start += len(delivery.items)
        return grouped

    async def _set_aside(self, entry: Entry, reason: str) -> list[EventResult]:
        """Keeps the one item PostgreSQL refused as a dead letter."""
        delivery, item = entry
        return await self._commit_entries([(delivery, Undecodable(item.raw, reason, item.origin, item.id))])

    async def _commit_entries(self, entries: Sequence[Entry]) -> list[EventResult]:
        decided: _Decided | None = None

        def decide_from(processed: frozenset[str], stored: dict[str, StoredUser]) -> BatchWrites:
            nonlocal decided
            decided = decide(entries, processed, stored, self._delete_mode, self._keep_history)
            return decided.writes

        event_ids = [item.id for _, item in entries if not isinstance(item, Undecodable)]
        user_ids = [item.user_id for _, item in entries if isinstance(item, UserEvent)]
        committed = await store.commit_batch(
            self._pool, event_ids, user_ids, decide_from, change_feed=self._change_feed
        )
        assert decided is not None
        results = []
        for index, (delivery, item) in enumerate(entries):
            outcome = decided.outcomes[index]
            event_id = item.id
            if outcome is Outcome.DEAD_LETTERED:
                position = decided.letter_index.get(index)
                letter_id = delivery.replaying
                if position is not None:
                    letter_id = committed.dead_letter_ids[position]
                results.append(
                    EventResult(
                        id=event_id, outcome=outcome, dead_letter_id=letter_id, error=decided.errors[index]
                    )
                )
            elif outcome is not Outcome.DUPLICATE and event_id not in committed.recorded:
                # Recorded by a concurrent batch between our look-up and our insert.
                results.append(EventResult(id=event_id, outcome=Outcome.DUPLICATE))
            else:
                results.append(EventResult(id=event_id, outcome=outcome))
        return results


_METRIC_TYPES = frozenset(EventKind)


def _report(entries: Sequence[Entry], results: Sequence[EventResult]) -> None:
    """Metrics for every committed item, and one log line for the batch (the ledger is the per-event
    record)."""
    counted: list[tuple[str, str]] = []
    oldest: int | None = None
    for (_, item), result in zip(entries, results, strict=True):
        event_type = "other"
        if isinstance(item, UserEvent):
            event_type = item.kind
            oldest = item.version[0] if oldest is None else min(oldest, item.version[0])
        elif isinstance(item, OtherEvent) and item.type in _METRIC_TYPES:
            event_type = item.type
        counted.append((event_type, result.outcome))
    count_events(counted)
    if oldest is not None:
        observe_lag(oldest / 1_000_000)
    if log.isEnabledFor(logging.INFO):
        log.info(
            "batch committed",
            extra={"fields": {"events": [[result.id, result.outcome] for result in results]}},
        )
