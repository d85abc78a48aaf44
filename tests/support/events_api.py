"""The Auth0 Events API as `relay catch-up` reads it: a server-sent event stream, played by respx, sent in
small chunks that cut lines in two, then left open and silent as an idle stream is.

An event may be given as a dict (encoded here) or as the exact JSON bytes to send, for bodies the standard
library cannot encode (nested deeper than its recursion limit, invalid UTF-8).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from relay.auth0.management import Credentials
from tests.support.auth0 import AUTH0_CLIENT_ID, AUTH0_CLIENT_SECRET, AUTH0_DOMAIN, MANAGEMENT_API

EVENTS_URL = f"{MANAGEMENT_API}/events"
CREDENTIALS = Credentials(AUTH0_DOMAIN, AUTH0_CLIENT_ID, AUTH0_CLIENT_SECRET)


def message(
    offset: str, event: dict[str, Any] | bytes | None = None, event_type: str = "user.created"
) -> str:
    """One SSE message as the Events API sends it: the offset as `id`, and again inside `data`; with no
    event, an `offset-only` heartbeat. Bytes that are not UTF-8 are carried as surrogate escapes."""
    if event is None:
        return f"event: offset-only\nid: {offset}\ndata: {json.dumps({'offset': offset})}\n\n"
    if isinstance(event, dict):
        event_type = str(event.get("type", event_type))
        event = json.dumps(event).encode()
    data = b'{"offset": ' + json.dumps(offset).encode() + b', "event": ' + event + b"}"
    return f"event: {event_type}\nid: {offset}\ndata: {data.decode('utf-8', 'surrogateescape')}\n\n"


async def sse_body(text: str, *, chunk_size: int = 29, stay_open: bool = True) -> AsyncIterator[bytes]:
    """The stream in chunks of `chunk_size` bytes, then open and silent (or closed, without `stay_open`)."""
    data = (":connected\n\nretry: 2000\n\n" + text).encode("utf-8", "surrogateescape")
    for start in range(0, len(data), chunk_size):
        yield data[start : start + chunk_size]
        await asyncio.sleep(0)
    if stay_open:
        await asyncio.sleep(3600)


def stream_response(text: str, **options: Any) -> httpx.Response:
    """A 200 answer streaming `text` (see `sse_body` for the options)."""
    return httpx.Response(
        200, headers={"content-type": "text/event-stream"}, content=sse_body(text, **options)
    )


async def no_wait(_seconds: float) -> None:
    """The reader's sleep between reconnections, made instant."""
    await asyncio.sleep(0)
