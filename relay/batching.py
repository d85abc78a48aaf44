"""Group commit: the work handed in by concurrent requests shares one transaction, and each request still gets
its answer only after that transaction has committed.

A commit costs a WAL flush and a few round trips whatever it carries, so one transaction per event tops out
at a few thousand events per second; the same work batched goes ten times further. Batches form by
themselves: while a flusher is committing, newly arrived work queues, and the next flusher takes it all at
once (`max_wait` can hold a batch open a little longer under light load). The queue is bounded, so when
PostgreSQL falls behind the caller hears `Saturated` at once rather than letting memory and latency grow.

This module knows nothing of events: `flush` decides what a batch means.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sized
from typing import Generic, TypeVar

Work = TypeVar("Work", bound=Sized)
Answer = TypeVar("Answer")


class Saturated(Exception):
    """The queue is full: PostgreSQL is not keeping up, so the caller should answer 503."""


class _Waiting(Generic[Work, Answer]):
    __slots__ = ("answer", "work")

    def __init__(self, work: Work) -> None:
        self.work = work
        self.answer: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()


class GroupCommitter(Generic[Work, Answer]):
    """Hands batches of submitted work to `flush`, which returns one answer per submission, in order.

    The size of a submission (`len(work)`) counts toward `max_queued` and `max_batch`. A submission larger
    than `max_queued` is still taken when nothing else is waiting, so no request is refused forever.
    """

    def __init__(
        self,
        flush: Callable[[list[Work]], Awaitable[list[Answer]]],
        *,
        max_batch: int,
        max_wait_seconds: float,
        max_queued: int,
        flushers: int,
    ) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._max_wait = max_wait_seconds
        self._max_queued = max_queued
        self._queue: asyncio.Queue[_Waiting[Work, Answer]] = asyncio.Queue()
        self.queued = 0
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

    async def submit(self, work: Work) -> Answer:
        """The answer for `work`, once the transaction holding it has committed."""
        size = len(work)
        if self.queued and self.queued + size > self._max_queued:
            raise Saturated(f"{self.queued} events already waiting for PostgreSQL")
        waiting: _Waiting[Work, Answer] = _Waiting(work)
        self.queued += size
        self._queue.put_nowait(waiting)
        return await waiting.answer

    async def _flush_forever(self) -> None:
        while True:
            batch = await self._next_batch()
            try:
                await self._answer(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _next_batch(self) -> list[_Waiting[Work, Answer]]:
        batch = [await self._queue.get()]
        size = len(batch[0].work)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._max_wait
        while size < self._max_batch:
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
            size += len(waiting.work)
        self.queued -= size
        return batch

    async def _answer(self, batch: list[_Waiting[Work, Answer]]) -> None:
        try:
            answers = await self._flush([waiting.work for waiting in batch])
        except Exception as error:
            for waiting in batch:
                if not waiting.answer.done():
                    waiting.answer.set_exception(error)
            return
        for waiting, answer in zip(batch, answers, strict=True):
            if not waiting.answer.done():
                waiting.answer.set_result(answer)
