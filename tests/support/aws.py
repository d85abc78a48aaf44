"""AWS without AWS: moto in server mode, reached over real HTTP by the relay (aiobotocore) and the tests
(boto3) alike; queues with a dead-letter queue and redrive policy, and EventBridge delivery from a custom bus
through a rule to a queue.

What moto does not emulate, and so no test here shows: associating a partner event bus with Auth0's partner
event source (rules on a partner bus fail in moto; a custom bus stands in for it, with the same rule and
target), delivery to API destinations (tests post to `/events/eventbridge` themselves), and the `account`
field of a delivered event.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import boto3
import httpx
from moto.server import ThreadedMotoServer
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

REGION = "us-east-1"
PARTNER_SOURCE = "aws.partner/auth0.com/acme-0a1b2c3d-4e5f-6789-abcd-ef0123456789/auth0.events"
LOG_STREAM_SOURCE = "aws.partner/auth0.com/acme-0a1b2c3d-4e5f-6789-abcd-ef0123456789/auth0.logs"


@dataclass(frozen=True)
class Aws:
    """A moto server: its endpoint, and the environment that points an AWS SDK at it."""

    endpoint: str

    def environment(self, endpoint: str | None = None) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
            "AWS_REGION": REGION,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",  # moto accepts any
        }

    def client(self, service: str) -> Any:
        return boto3.client(
            service,  # type: ignore[call-overload]
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )


@contextlib.contextmanager
def moto_server() -> Iterator[Aws]:
    # werkzeug logs every request moto serves at INFO; a failing test's own output matters more.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield Aws(f"http://{host}:{port}")
    finally:
        server.stop()


@dataclass(frozen=True)
class Queue:
    """An SQS queue whose redrive policy moves a message to `dead_letter_url` after `max_receives`."""

    aws: Aws
    url: str
    arn: str
    dead_letter_url: str

    def send(self, body: str | bytes) -> None:
        """A message sent straight to the queue, as anything allowed to send to it could."""
        text = body.decode() if isinstance(body, bytes) else body
        self.aws.client("sqs").send_message(QueueUrl=self.url, MessageBody=text)

    def counts(self, url: str | None = None) -> tuple[int, int]:
        """(visible, in flight) messages of the queue (or of `url`)."""
        attributes = self.aws.client("sqs").get_queue_attributes(
            QueueUrl=url or self.url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return (
            int(attributes["ApproximateNumberOfMessages"]),
            int(attributes["ApproximateNumberOfMessagesNotVisible"]),
        )

    def dead_lettered(self) -> list[str]:
        """The bodies in the dead-letter queue, read (and put back at once) without deleting them."""
        sqs = self.aws.client("sqs")
        bodies: list[str] = []
        while True:
            answer = sqs.receive_message(
                QueueUrl=self.dead_letter_url, MaxNumberOfMessages=10, VisibilityTimeout=30, WaitTimeSeconds=0
            )
            messages = answer.get("Messages", [])
            if not messages:
                break
            bodies += [message["Body"] for message in messages]
        return bodies


def make_queue(aws: Aws, *, visibility_seconds: int, max_receives: int) -> Queue:
    sqs = aws.client("sqs")
    name = "relay-" + secrets.token_hex(4)
    dead_letter_url = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
    dead_letter_arn = _queue_arn(sqs, dead_letter_url)
    redrive = {"deadLetterTargetArn": dead_letter_arn, "maxReceiveCount": str(max_receives)}
    url = sqs.create_queue(
        QueueName=name,
        Attributes={"VisibilityTimeout": str(visibility_seconds), "RedrivePolicy": json.dumps(redrive)},
    )["QueueUrl"]
    return Queue(aws, url, _queue_arn(sqs, url), dead_letter_url)


def _queue_arn(sqs: Any, url: str) -> str:
    arn: str = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    return arn


@dataclass(frozen=True)
class EventBus:
    """A custom bus standing in for the partner bus, with a rule sending `source`'s events to a queue."""

    aws: Aws
    name: str
    source: str

    def put(self, cloudevents: Sequence[dict[str, Any]], *, source: str | None = None) -> None:
        """Puts each CloudEvent on the bus as the `detail` of an EventBridge event, as Auth0 does (ten per
        call, the most PutEvents takes)."""
        events = self.aws.client("events")
        for start in range(0, len(cloudevents), 10):
            answer = events.put_events(
                Entries=[
                    {
                        "EventBusName": self.name,
                        "Source": source or self.source,
                        "DetailType": event.get("type", "event"),
                        "Detail": json.dumps(event),
                    }
                    for event in cloudevents[start : start + 10]
                ]
            )
            assert answer["FailedEntryCount"] == 0, answer


def route_to_queue(aws: Aws, queue: Queue, source: str = PARTNER_SOURCE) -> EventBus:
    """A custom bus, a rule matching `source`, and the queue as the rule's target."""
    events = aws.client("events")
    name = "auth0-" + secrets.token_hex(4)
    events.create_event_bus(Name=name)
    events.put_rule(Name=f"{name}-to-sqs", EventBusName=name, EventPattern=json.dumps({"source": [source]}))
    events.put_targets(Rule=f"{name}-to-sqs", EventBusName=name, Targets=[{"Id": "queue", "Arn": queue.arn}])
    return EventBus(aws, name, source)


def eventbridge_event(
    cloudevent: Any, *, source: str = PARTNER_SOURCE, detail_type: str | None = None
) -> dict[str, Any]:
    """An EventBridge event as a rule delivers it to SQS or an API destination: the CloudEvent as `detail`."""
    return {
        "version": "0",
        "id": "0d3b2f6e-" + secrets.token_hex(4) + "-4c1a-9e2b-" + secrets.token_hex(6),
        "detail-type": detail_type
        or (cloudevent.get("type", "event") if isinstance(cloudevent, dict) else "x"),
        "source": source,
        "account": "123456789012",
        "time": "2026-05-01T10:00:00Z",
        "region": REGION,
        "resources": [],
        "detail": cloudevent,
    }


def wait_for(condition: Callable[[], bool], timeout: float, what: str, pause: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(pause)


class HoldingProxy:
    """A plain HTTP proxy in front of moto that can hold SQS's DeleteMessageBatch requests: a relay killed
    while its delete is held has committed its events but not deleted their messages."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.holding = threading.Event()
        self.held = threading.Event()  # set once a delete has been held
        self._server = make_server("127.0.0.1", 0, self._app, threaded=True)
        self.endpoint = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> HoldingProxy:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.holding.clear()
        self._server.shutdown()
        self._thread.join(timeout=10)

    def _app(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        if self.holding.is_set() and request.headers.get("x-amz-target", "").endswith("DeleteMessageBatch"):
            self.held.set()
            while self.holding.is_set():
                time.sleep(0.05)
            return Response(status=503)(environ, start_response)
        answer = httpx.request(
            request.method,
            self.upstream + request.full_path.rstrip("?"),
            content=request.get_data(),
            headers={k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")},
            timeout=30,
        )
        headers = [
            (k, v)
            for k, v in answer.headers.items()
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding")
        ]
        return Response(answer.content, status=answer.status_code, headers=headers)(environ, start_response)
