"""Amazon EventBridge events around Auth0's CloudEvents: which ones to take, and the CloudEvent inside.

An Auth0 event stream of destination type `eventbridge` puts each CloudEvent, whole, in the `detail` of an
EventBridge event whose `source` is the stream's partner event source, named like
`aws.partner/auth0.com/<tenant-domain>-<uuid>/auth0.events`. Auth0 does not document `detail-type`, so
nothing here depends on it. Auth0's older Log Streams reach EventBridge too (a source ending `/auth0.logs`,
`detail-type` "Auth0 log", `detail` a tenant log line): they are not user events and are refused, never
applied, whatever the allow-list says.

The items come out of `relay.events`, the one decoder, so an EventBridge-carried event meets the same
pipeline as any other: ledger, merge, dead letters, allow-lists and test events. Nothing here raises but
`NotAllowed`, for an event that is not ours to keep.
"""

from __future__ import annotations

from collections.abc import Collection

import msgspec

from relay.events import Item, decode_body, decode_event
from relay.pipeline import NotAllowed

PARTNER_SOURCE_PREFIX = "aws.partner/auth0.com/"
LOG_STREAM_SOURCE_SUFFIX = "/auth0.logs"
LOG_STREAM_DETAIL_TYPE = "Auth0 log"


class _EventBridgeEvent(msgspec.Struct, forbid_unknown_fields=False, rename={"detail_type": "detail-type"}):
    """The fields of an EventBridge event the relay reads; `detail` is kept as bytes for the one decoder."""

    source: str
    detail: msgspec.Raw
    detail_type: str | None = None


_envelope_decoder = msgspec.json.Decoder(_EventBridgeEvent)
# msgspec reports invalid UTF-8 as UnicodeDecodeError and nesting beyond the stack as RecursionError.
_DECODE_ERRORS = (msgspec.DecodeError, RecursionError, UnicodeDecodeError)


def decode_message(body: bytes, allowed_sources: Collection[str]) -> Item:
    """The CloudEvent of an SQS message an EventBridge rule sent. Raises `NotAllowed` for a message that is
    not an EventBridge event at all (the queue is the only credential, so it is nobody's to keep), or whose
    source is not accepted."""
    envelope = _envelope(body)
    if envelope is None:
        raise NotAllowed("the message is not an EventBridge event (no source and detail)", "not_eventbridge")
    check_source(envelope, allowed_sources)
    return decode_event(bytes(envelope.detail))


def decode_request(body: bytes, allowed_sources: Collection[str]) -> list[Item]:
    """The items of a POST from an EventBridge API destination: an EventBridge event, or, with an input
    transformer sending `<$.detail>`, the bare CloudEvent (or anything else an authentic sender posts, which
    the one decoder turns into a dead letter). Raises `NotAllowed` for a source that is not accepted."""
    envelope = _envelope(body)
    if envelope is None:
        return decode_body(body)
    check_source(envelope, allowed_sources)
    return [decode_event(bytes(envelope.detail))]


def check_source(envelope: _EventBridgeEvent, allowed_sources: Collection[str]) -> None:
    """Raises `NotAllowed` for a Log Streams event, or a source outside `RELAY_EVENTBRIDGE_SOURCES` (when
    set; otherwise any Auth0 partner event source is accepted)."""
    source = envelope.source
    shown = source if len(source) <= 128 else source[:128] + "…"
    if source.endswith(LOG_STREAM_SOURCE_SUFFIX) or envelope.detail_type == LOG_STREAM_DETAIL_TYPE:
        raise NotAllowed(
            f"source {shown!r} carries Auth0 Log Streams events (tenant logs), not user events; route only "
            "the event stream's partner source (…/auth0.events) to this relay",
            "log_stream_event",
        )
    if allowed_sources:
        if source not in allowed_sources:
            raise NotAllowed(
                f"events from source {shown!r} are not accepted by this relay (RELAY_EVENTBRIDGE_SOURCES)",
                "source_not_allowed",
            )
    elif not source.startswith(PARTNER_SOURCE_PREFIX):
        raise NotAllowed(
            f"source {shown!r} is not an Auth0 partner event source ({PARTNER_SOURCE_PREFIX}…); name it in "
            "RELAY_EVENTBRIDGE_SOURCES to accept it",
            "source_not_allowed",
        )


def _envelope(body: bytes) -> _EventBridgeEvent | None:
    """The EventBridge event `body` holds, or None when it is not one."""
    try:
        return _envelope_decoder.decode(body)
    except _DECODE_ERRORS:
        return None
