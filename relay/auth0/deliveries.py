"""`relay deliveries` and `relay redeliver`: the event stream's failed deliveries, and asking Auth0 to send
them again.

Auth0 stops retrying an event after about 7 seconds and lists it as a failed delivery of the stream
(`GET /event-streams/{id}/deliveries`). Redelivery (`POST …/redeliver/{event_id}`, or `POST …/redeliver` with
a time range and event types) sends the same event ids again, so the relay's ledger still recognises any it
has already applied. The deliveries answer is read as a bare array or as `{deliveries, next}`: Auth0's API
description and its Go SDK disagree, so both are accepted.

The stream is `--stream-id`, else `AUTH0_EVENT_STREAM_ID`, else the stream named `--stream-name` (by default
the one `relay deploy-action` creates).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from relay.auth0.management import Management, ManagementError, rfc3339

DEFAULT_STREAM_NAME = "user-sync-relay"
STREAM_ID_VARIABLE = "AUTH0_EVENT_STREAM_ID"
READ_DELIVERIES = "read:event_deliveries (or read:event_streams)"
UPDATE_DELIVERIES = "update:event_deliveries"
PAGE_SIZE = 100
MAX_PAGES = 100


class DeliveriesFailed(Exception):
    """The command cannot go on; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class FailedDelivery:
    """One failed delivery, from either of Auth0's shapes (`?` or empty where it said nothing)."""

    event_id: str
    event_type: str
    event_time: str
    attempts: int
    last_attempt: str  # the time of the latest attempt
    last_error: str  # that attempt's error message, whitespace collapsed


def resolve_stream_id(
    api: Management, environ: Mapping[str, str], stream_id: str | None, stream_name: str
) -> str:
    chosen = (stream_id or environ.get(STREAM_ID_VARIABLE, "")).strip()
    if chosen:
        return chosen
    streams = api.call(
        "list the event streams",
        "read:event_streams",
        lambda sdk, once: list(sdk.event_streams.list(take=100, request_options=once)),
    )
    named = [stream.id for stream in streams if stream.name == stream_name and stream.id]
    if not named:
        raise DeliveriesFailed(
            f"no event stream is named {stream_name!r}; pass --stream-id (or set {STREAM_ID_VARIABLE}) or "
            "--stream-name"
        )
    if len(named) > 1:
        raise DeliveriesFailed(f"{len(named)} event streams are named {stream_name!r}; pass --stream-id")
    return str(named[0])


def list_deliveries(
    api: Management,
    stream_id: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    types: Sequence[str] = (),
) -> list[FailedDelivery]:
    """Every failed delivery matching the filters, oldest page first, each once."""
    params: dict[str, str | int] = {"statuses": "failed", "take": PAGE_SIZE}
    if types:
        params["event_types"] = ",".join(types)
    if since is not None:
        params["date_from"] = rfc3339(since)
    if until is not None:
        params["date_to"] = rfc3339(until)
    found: dict[str, dict[str, Any]] = {}
    page_from: str | None = None
    for _ in range(MAX_PAGES):
        answer = api.request(
            "list the event stream's failed deliveries",
            READ_DELIVERIES,
            "GET",
            f"event-streams/{_segment(stream_id)}/deliveries",
            params=params if page_from is None else {**params, "from": page_from},
        )
        items, page_from = _page(answer.json())
        fresh = [item for item in items if _key(item) not in found]
        found.update((_key(item), item) for item in fresh)
        if page_from is None and len(items) >= PAGE_SIZE and fresh:
            # A bare array carries no cursor: go on from the last delivery seen.
            page_from = str(items[-1].get("id") or "") or None
        if page_from is None or not fresh:
            break
    return [_failed_delivery(delivery) for delivery in found.values()]


def redeliver_event(api: Management, stream_id: str, event_id: str) -> None:
    try:
        api.request(
            f"redeliver event {event_id}",
            UPDATE_DELIVERIES,
            "POST",
            f"event-streams/{_segment(stream_id)}/redeliver/{_segment(event_id)}",
        )
    except ManagementError as error:
        if error.status == 409:
            raise DeliveriesFailed(
                f"Auth0 cannot redeliver event {event_id} (409): it is not a failed delivery of event "
                f"stream {stream_id}, or a redelivery of it is already under way. `relay deliveries` lists "
                "the failed ones"
            ) from None
        if error.status == 404:
            raise DeliveriesFailed(
                f"Auth0 knows no event {event_id} on event stream {stream_id} (404); `relay deliveries` "
                "lists the failed ones"
            ) from None
        raise


def redeliver_failed(
    api: Management,
    stream_id: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    types: Sequence[str] = (),
) -> None:
    body: dict[str, Any] = {"statuses": ["failed"]}
    if since is not None:
        body["date_from"] = rfc3339(since)
    if until is not None:
        body["date_to"] = rfc3339(until)
    if types:
        body["event_types"] = list(types)
    try:
        api.request(
            "redeliver the failed events",
            UPDATE_DELIVERIES,
            "POST",
            f"event-streams/{_segment(stream_id)}/redeliver",
            json=body,
        )
    except ManagementError as error:
        if error.status == 409:
            raise DeliveriesFailed(
                "Auth0 cannot redeliver these events now (409): some are in a state that cannot be "
                "redelivered, such as a redelivery already under way. Wait a minute and run it again, or "
                "redeliver them one by one with --event-id (`relay deliveries` lists them)"
            ) from None
        raise


def _failed_delivery(delivery: Mapping[str, Any]) -> FailedDelivery:
    attempts = [a for a in delivery.get("attempts") or [] if isinstance(a, Mapping)]
    last = max(attempts, key=lambda attempt: str(attempt.get("timestamp") or ""), default={})
    return FailedDelivery(
        event_id=_event_id(delivery),
        event_type=str(delivery.get("event_type") or _event(delivery).get("type") or "?"),
        event_time=str(_event(delivery).get("time") or ""),
        attempts=len(attempts),
        last_attempt=str(last.get("timestamp") or ""),
        last_error=" ".join(str(last.get("error_message") or "").split()),
    )


def _event(delivery: Mapping[str, Any]) -> Mapping[str, Any]:
    found = delivery.get("event")
    return found if isinstance(found, Mapping) else {}


def _event_id(delivery: Mapping[str, Any]) -> str:
    return str(_event(delivery).get("id") or delivery.get("id") or "?")


def _page(body: Any) -> tuple[list[dict[str, Any]], str | None]:
    if isinstance(body, list):
        return [item for item in body if isinstance(item, dict)], None
    if isinstance(body, dict) and isinstance(body.get("deliveries"), list):
        following = body.get("next")
        items = [item for item in body["deliveries"] if isinstance(item, dict)]
        return items, str(following) if following else None
    raise DeliveriesFailed(f"unexpected answer to the deliveries list: {str(body)[:200]}")


def _key(delivery: Mapping[str, Any]) -> str:
    return str(delivery.get("id") or _event_id(delivery))


def _segment(value: str) -> str:
    return urllib.parse.quote(value, safe="")
