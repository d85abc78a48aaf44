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

import sys
import urllib.parse
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from relay.auth0.management import Management, ManagementError, credentials_from_env, rfc3339

DEFAULT_STREAM_NAME = "user-sync-relay"
STREAM_ID_VARIABLE = "AUTH0_EVENT_STREAM_ID"
READ_DELIVERIES = "read:event_deliveries (or read:event_streams)"
UPDATE_DELIVERIES = "update:event_deliveries"
PAGE_SIZE = 100
MAX_PAGES = 100
_ERROR_WIDTH = 70


class DeliveriesFailed(Exception):
    """The command cannot go on; the message says why and what to do."""


def run_deliveries(
    environ: Mapping[str, str],
    *,
    stream_id: str | None = None,
    stream_name: str = DEFAULT_STREAM_NAME,
    since: datetime | None = None,
    until: datetime | None = None,
    types: Sequence[str] = (),
) -> int:
    """Runs `relay deliveries`; returns the exit status."""
    api = Management(credentials_from_env(environ))
    try:
        chosen = resolve_stream_id(api, environ, stream_id, stream_name)
        deliveries = list_deliveries(api, chosen, since=since, until=until, types=types)
    except (DeliveriesFailed, ManagementError) as error:
        print(f"relay deliveries: {error}", file=sys.stderr, flush=True)
        return 1
    if not deliveries:
        print(f"no failed deliveries for event stream {chosen}{_filters(since, until, types)}")
        return 0
    print(delivery_table(deliveries))
    print(
        f"\n{len(deliveries)} failed deliveries for event stream {chosen}{_filters(since, until, types)}. "
        "Ask Auth0 to send them again with `relay redeliver` and the same --since/--until/--types, "
        "or one of them with `relay redeliver --event-id ID`"
    )
    return 0


def run_redeliver(
    environ: Mapping[str, str],
    *,
    stream_id: str | None = None,
    stream_name: str = DEFAULT_STREAM_NAME,
    event_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    types: Sequence[str] = (),
) -> int:
    """Runs `relay redeliver`; returns the exit status."""
    api = Management(credentials_from_env(environ))
    try:
        chosen = resolve_stream_id(api, environ, stream_id, stream_name)
        if event_id is not None:
            redeliver_event(api, chosen, event_id)
            print(f"Auth0 accepted: event {event_id} will be delivered again to event stream {chosen}")
        else:
            redeliver_failed(api, chosen, since=since, until=until, types=types)
            print(
                f"Auth0 accepted: the failed deliveries of event stream {chosen}"
                f"{_filters(since, until, types)} will be delivered again"
            )
    except (DeliveriesFailed, ManagementError) as error:
        print(f"relay redeliver: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


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
) -> list[dict[str, Any]]:
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
    return list(found.values())


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


def delivery_table(deliveries: Sequence[Mapping[str, Any]]) -> str:
    """The deliveries as an aligned text table, oldest event first."""
    header = ("EVENT ID", "TYPE", "EVENT TIME", "ATTEMPTS", "LAST ATTEMPT", "LAST ERROR")
    rows = [_row(delivery) for delivery in deliveries]
    rows.sort(key=lambda row: (row[2], row[0]))
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def _row(delivery: Mapping[str, Any]) -> tuple[str, str, str, str, str, str]:
    found = delivery.get("event")
    event: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    attempts = [a for a in delivery.get("attempts") or [] if isinstance(a, Mapping)]
    last = max(attempts, key=lambda attempt: str(attempt.get("timestamp") or ""), default={})
    error = " ".join(str(last.get("error_message") or "").split())
    if len(error) > _ERROR_WIDTH:
        error = error[: _ERROR_WIDTH - 1] + "…"
    return (
        str(event.get("id") or delivery.get("id") or "?"),
        str(delivery.get("event_type") or event.get("type") or "?"),
        str(event.get("time") or ""),
        str(len(attempts)),
        str(last.get("timestamp") or ""),
        error,
    )


def _page(body: Any) -> tuple[list[dict[str, Any]], str | None]:
    if isinstance(body, list):
        return [item for item in body if isinstance(item, dict)], None
    if isinstance(body, dict) and isinstance(body.get("deliveries"), list):
        following = body.get("next")
        items = [item for item in body["deliveries"] if isinstance(item, dict)]
        return items, str(following) if following else None
    raise DeliveriesFailed(f"unexpected answer to the deliveries list: {str(body)[:200]}")


def _key(delivery: Mapping[str, Any]) -> str:
    return str(delivery.get("id") or _row(delivery)[0])


def _segment(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _filters(since: datetime | None, until: datetime | None, types: Sequence[str]) -> str:
    parts = []
    if since is not None:
        parts.append(f"from {rfc3339(since)}")
    if until is not None:
        parts.append(f"until {rfc3339(until)}")
    if types:
        parts.append(f"of type {', '.join(types)}")
    return f" ({', '.join(parts)})" if parts else ""
