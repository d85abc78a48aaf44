"""The SQS consumer: EventBridge events from a queue, through the one pipeline, deleted once committed.

An EventBridge rule sends each Auth0 event to an SQS queue, which keeps it (for up to 14 days) until someone
deletes it. So the rule of this module is: **a message is deleted only after its event's batch has
committed**, whatever the outcome (applied, duplicate, stale, test, ignored or dead-lettered). A relay that
dies between the commit and the delete leaves the message in the queue; it comes back once its visibility
timeout ends, and the ledger makes it a `duplicate`. Nothing is lost and nothing is applied twice.

A message that is not ours to keep (not an EventBridge event at all, a Log Streams event, a source outside
`RELAY_EVENTBRIDGE_SOURCES`, a tenant or stream outside the allow-lists) is neither applied nor deleted: it
is counted, logged, and left for the queue's redrive policy to move to its dead-letter queue after
`maxReceiveCount` receives, where a person can look at it.

When PostgreSQL cannot take the events (down, not migrated, the relay saturated), the poller keeps the
messages it holds, retries with a growing pause and receives nothing more meanwhile; their visibility is
extended for as long as their batch takes, so they are not received again (which would count toward
`maxReceiveCount`) and are applied as soon as PostgreSQL is back. On shutdown the pollers stop receiving,
finish the batch in hand (commit, then delete) and return; messages whose batch could not commit stay in
the queue.

Every worker process runs its own pollers (`RELAY_SQS_POLLERS` long polls each); SQS hands each message to
one of them at a time, and the ledger settles any redelivery, so nothing needs coordinating.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

from relay.batching import Saturated
from relay.eventbridge import decode_message
from relay.observability import SQS_DELETED, SQS_LAG_SECONDS, SQS_RECEIVED, SQS_REFUSED
from relay.pipeline import Delivery, NotAllowed, Pipeline
from relay.settings import Settings
from relay.store import StoreError

if TYPE_CHECKING:
    from types_aiobotocore_sqs.client import SQSClient
    from types_aiobotocore_sqs.type_defs import MessageTypeDef

log = logging.getLogger("relay.sqs")

ROUTE = "sqs"
"""The route a dead letter from the queue is kept under (its body is the CloudEvent, the `detail`)."""
# The longest long poll SQS allows, and the most messages one receive returns.
WAIT_SECONDS = 20
MAX_MESSAGES = 10
# Pauses between attempts while PostgreSQL (or SQS) cannot be used: short at first, then at most this.
FIRST_PAUSE_SECONDS = 0.5
MAX_PAUSE_SECONDS = 5.0


class QueueConsumer:
    """Long-polls `settings.sqs_queue_url` until `stop()`, handing each message to `pipeline`."""

    def __init__(self, pipeline: Pipeline, settings: Settings) -> None:
        assert settings.sqs_queue_url is not None
        self._pipeline = pipeline
        self._queue_url = settings.sqs_queue_url
        self._region = settings.aws_region
        self._sources = settings.eventbridge_sources
        self._visibility = settings.sqs_visibility_seconds
        self._pollers = settings.sqs_pollers
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Stop receiving; batches in hand are committed and deleted before `run` returns."""
        self._stopping.set()

    async def run(self) -> None:
        from aiobotocore.session import get_session

        # The standard AWS environment holds the credentials, and AWS_ENDPOINT_URL a local endpoint.
        async with get_session().create_client("sqs", region_name=self._region) as sqs:
            log.info("consuming the SQS queue", extra={"fields": {"queue": self._queue_url}})
            await asyncio.gather(*(self._poll(sqs) for _ in range(self._pollers)))

    async def _poll(self, sqs: SQSClient) -> None:
        while not self._stopping.is_set():
            messages = await self._receive(sqs)
            if messages:
                await self._handle(sqs, messages)

    async def _receive(self, sqs: SQSClient) -> list[MessageTypeDef]:
        """Up to ten messages, or none once stopping (a long poll in progress is abandoned: anything it
        would have received stays in the queue)."""
        receiving = asyncio.ensure_future(
            sqs.receive_message(
                QueueUrl=self._queue_url,
                MaxNumberOfMessages=MAX_MESSAGES,
                WaitTimeSeconds=WAIT_SECONDS,
                VisibilityTimeout=self._visibility,
                MessageSystemAttributeNames=["SentTimestamp"],
            )
        )
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({receiving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not receiving.done():
            receiving.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await receiving
            return []
        try:
            answer = receiving.result()
        except Exception as error:
            log.warning(
                "could not receive from the SQS queue; trying again",
                extra={"fields": {"error_class": type(error).__name__, "error": str(error)[:300]}},
            )
            await self._pause(MAX_PAUSE_SECONDS / 2)
            return []
        messages = answer.get("Messages", [])
        SQS_RECEIVED.inc(len(messages))
        return messages

    async def _handle(self, sqs: SQSClient, messages: list[MessageTypeDef]) -> None:
        """Each message's event through the pipeline (concurrently, so they share a commit); then the
        committed ones are deleted."""
        taken: list[tuple[MessageTypeDef, Delivery]] = []
        for message in messages:
            try:
                item = decode_message(message.get("Body", "").encode(), self._sources)
            except NotAllowed as refused:
                _refuse(message, refused)
                continue
            taken.append((message, Delivery(ROUTE, [item])))
        if not taken:
            return
        async with self._kept_invisible(sqs, [message for message, _ in taken]):
            committed = await asyncio.gather(
                *(self._commit(message, delivery) for message, delivery in taken)
            )
        await self._delete(
            sqs, [message for (message, _), done in zip(taken, committed, strict=True) if done]
        )

    async def _commit(self, message: MessageTypeDef, delivery: Delivery) -> bool:
        """Whether the message's event is committed; retried while PostgreSQL cannot take it, until then or
        until stopping (False: the message stays in the queue)."""
        pause = FIRST_PAUSE_SECONDS
        while True:
            try:
                await self._pipeline.deliver(delivery)
                return True
            except NotAllowed as refused:
                _refuse(message, refused)
                return False
            except (StoreError, Saturated) as error:
                if pause == FIRST_PAUSE_SECONDS:
                    log.warning(
                        "PostgreSQL cannot take the queue's events now; keeping them and trying again",
                        extra={"fields": {"message_id": message.get("MessageId"), "error": str(error)[:300]}},
                    )
            except Exception:
                # Unforeseen: nothing was committed, so the queue's redelivery (and redrive) is the safe way.
                log.exception(
                    "queued event failed", extra={"fields": {"message_id": message.get("MessageId")}}
                )
                return False
            if not await self._pause(pause):
                return False
            pause = min(pause * 2, MAX_PAUSE_SECONDS)

    async def _pause(self, seconds: float) -> bool:
        """Waits `seconds`; False when stopping cut the wait short."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return not self._stopping.is_set()

    @contextlib.asynccontextmanager
    async def _kept_invisible(
        self, sqs: SQSClient, messages: Sequence[MessageTypeDef]
    ) -> AsyncIterator[None]:
        """While the block runs, the messages' visibility is renewed every third of the timeout, so a slow
        batch (PostgreSQL down, say) is not received again by another consumer meanwhile."""

        async def extend_forever() -> None:
            entries = [
                {
                    "Id": str(index),
                    "ReceiptHandle": message["ReceiptHandle"],
                    "VisibilityTimeout": self._visibility,
                }
                for index, message in enumerate(messages)
            ]
            while True:
                await asyncio.sleep(self._visibility / 3)
                try:
                    await sqs.change_message_visibility_batch(
                        QueueUrl=self._queue_url,
                        Entries=entries,  # type: ignore[arg-type]
                    )
                except Exception as error:
                    log.warning(
                        "could not extend the visibility of messages in hand",
                        extra={"fields": {"error_class": type(error).__name__, "error": str(error)[:300]}},
                    )

        extending = asyncio.create_task(extend_forever())
        try:
            yield
        finally:
            extending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await extending

    async def _delete(self, sqs: SQSClient, messages: list[MessageTypeDef]) -> None:
        if not messages:
            return
        try:
            answer = await sqs.delete_message_batch(
                QueueUrl=self._queue_url,
                Entries=[
                    {"Id": str(index), "ReceiptHandle": message["ReceiptHandle"]}
                    for index, message in enumerate(messages)
                ],
            )
        except Exception as error:
            # Committed already: the messages come back after their visibility timeout, as duplicates.
            log.warning(
                "could not delete committed messages; they will come back as duplicates",
                extra={"fields": {"error_class": type(error).__name__, "error": str(error)[:300]}},
            )
            return
        for failed in answer.get("Failed", []):
            log.warning(
                "could not delete a committed message; it will come back as a duplicate",
                extra={
                    "fields": {
                        "message_id": messages[int(failed["Id"])].get("MessageId"),
                        "error": failed.get("Message", failed.get("Code")),
                    }
                },
            )
        now = time.time()
        for entry in answer.get("Successful", []):
            SQS_DELETED.inc()
            sent = messages[int(entry["Id"])].get("Attributes", {}).get("SentTimestamp", "")
            if sent.isdigit():
                SQS_LAG_SECONDS.observe(max(0.0, now - int(sent) / 1000))


def _refuse(message: MessageTypeDef, refused: NotAllowed) -> None:
    SQS_REFUSED.labels(refused.code).inc()
    log.warning(
        "message refused; left in the queue for its redrive policy",
        extra={
            "fields": {"message_id": message.get("MessageId"), "reason": refused.code, "detail": str(refused)}
        },
    )
