"""Group commit: events from concurrent requests share one transaction, and each request still gets its
answer only after that transaction has committed.

A commit costs a WAL flush whatever it carries, so one transaction per event tops out at a few thousand
events per second; the same work batched goes ten times further. Batches form by themselves: while a
flusher is committing, newly arrived events queue, and the next flusher takes them all at once
(`RELAY_BATCH_MAX_WAIT_MS` can hold a batch open a little longer under light load). The queue is bounded,
so when PostgreSQL falls behind the relay answers 503 at once rather than letting memory and latency grow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import psycopg
from psycopg_pool import AsyncConnectionPool

from relay.events import Event
from relay.handlers import Outcome
from relay.observability import BATCH_SIZE, COMMIT_SECONDS
from relay.settings import DeleteMode
from relay.store import Connection, apply_events

log = logging.getLogger("relay.batching")

DEADLOCK_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class Unstorable:
    """PostgreSQL refused this event's content; the caller keeps it as a dead letter."""

    error: str


Result = Outcome | Unstorable


class Saturated(Exception):
    """The queue is full: PostgreSQL is not keeping up, so the caller should answer 503."""


def is_unstorable(error: psycopg.Error) -> bool:
    """PostgreSQL refused the event's content itself (SQLSTATE class 22 or 54): retrying cannot help."""
    return isinstance(error, psycopg.DataError) or (error.sqlstate or "")[:2] in ("22", "54")


async def apply_isolating(
    pool: AsyncConnectionPool[Connection], events: Sequence[Event], delete_mode: DeleteMode
) -> list[Result]:
    """Applies events in one transaction; if PostgreSQL refuses one of them, finds it by applying each
    on its own, so its batch-mates are still applied."""
    try:
        for attempt in range(1, DEADLOCK_ATTEMPTS + 1):
            try:
                async with pool.connection() as conn:
                    return list(await apply_events(conn, events, delete_mode))
            except psycopg.errors.DeadlockDetected:
                # Batches lock rows in one order and cannot deadlock each other, but another writer (an
                # operator's own transaction) may lock out of order; PostgreSQL rolled this batch back, and
                # running it again is safe.
                if attempt == DEADLOCK_ATTEMPTS:
                    raise
                log.info("batch of %d events chosen as a deadlock victim; retrying", len(events))
        raise AssertionError("unreachable")
    except psycopg.Error as error:
        if not is_unstorable(error):
            raise
        if len(events) == 1:
            return [Unstorable(f"PostgreSQL refused the event: {error}")]
    results: list[Result] = []
    for event in events:
        results += await apply_isolating(pool, [event], delete_mode)
    return results


@dataclass(slots=True)
class _Waiting:
    events: Sequence[Event]
    answer: asyncio.Future[list[Result]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class GroupCommitter:
    """Applies events handed in by concurrent requests in shared transactions."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Connection],
        delete_mode: DeleteMode,
        *,
        max_events: int,
        max_wait_seconds: float,
        max_queued_events: int,
        flushers: int,
    ) -> None:
        self._pool = pool
        self._delete_mode = delete_mode
        self._max_events = max_events
        self._max_wait = max_wait_seconds
        self._max_queued = max_queued_events
        self._queue: asyncio.Queue[_Waiting] = asyncio.Queue()
        self.queued_events = 0
        self._flusher_count = flushers
        self._flushers: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._flushers = [asyncio.create_task(self._flush_forever()) for _ in range(self._flusher_count)]

    async def close(self) -> None:
        """Finishes every queued and in-flight batch, then stops the flushers."""
        await self._queue.join()
        for task in self._flushers:
            task.cancel()
        for task in self._flushers:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def apply(self, events: Sequence[Event]) -> list[Result]:
        """One result per event, once the transaction holding them has committed."""
        if not events:
            return []
        if self.queued_events + len(events) > self._max_queued:
            raise Saturated(f"{self.queued_events} events already waiting for PostgreSQL")
        waiting = _Waiting(events)
        self.queued_events += len(events)
        self._queue.put_nowait(waiting)
        return await waiting.answer

    async def _flush_forever(self) -> None:
        while True:
            batch = await self._next_batch()
            try:
                await self._flush(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _next_batch(self) -> list[_Waiting]:
        batch = [await self._queue.get()]
        size = len(batch[0].events)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._max_wait
        while size < self._max_events:
            try:
                waiting = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    waiting = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            batch.append(waiting)
            size += len(waiting.events)
        return batch

    async def _flush(self, batch: list[_Waiting]) -> None:
        events = [event for waiting in batch for event in waiting.events]
        self.queued_events -= len(events)
        BATCH_SIZE.observe(len(events))
        try:
            with COMMIT_SECONDS.time():
                results = await apply_isolating(self._pool, events, self._delete_mode)
        except Exception as error:
            for waiting in batch:
                if not waiting.answer.done():
                    waiting.answer.set_exception(error)
            return
        start = 0
        for waiting in batch:
            end = start + len(waiting.events)
            if not waiting.answer.done():
                waiting.answer.set_result(results[start:end])
            start = end
