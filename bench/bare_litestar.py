"""The framework's ceiling for `make bench`: a bare Litestar app that does what every event route must, and
nothing more: check a bearer token in constant time and decode the CloudEvent with msgspec. No database.

Written the way the framework's documentation writes a handler, served by uvicorn like the relay. Started
only by `bench/run.py`.
"""

from __future__ import annotations

import hmac
import os
from typing import Any

import msgspec
from litestar import Litestar, Request, get, post
from litestar.response import Response

TOKEN = os.environ["BENCH_TOKEN"].encode()


class UserObject(msgspec.Struct, forbid_unknown_fields=False):
    user_id: str


class EventData(msgspec.Struct, forbid_unknown_fields=False):
    object: UserObject


class CloudEvent(msgspec.Struct, forbid_unknown_fields=False):
    id: str
    type: str
    time: str
    data: EventData


decoder = msgspec.json.Decoder(CloudEvent)


@post("/events/webhook", status_code=200)
async def receive(request: Request[Any, Any, Any]) -> Response[Any]:
    credential = request.headers.get("authorization", "").encode()
    if not hmac.compare_digest(credential, b"Bearer " + TOKEN):
        return Response({"error": "unknown credentials"}, status_code=401)
    event = decoder.decode(await request.body())
    return Response({"events": [{"id": event.id, "outcome": "applied"}]})


@get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


app = Litestar([receive, healthz], openapi_config=None, logging_config=None)
