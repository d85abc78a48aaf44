"""`relay deliveries` and `relay redeliver`: the failed deliveries as a table, and what Auth0 accepted."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from datetime import datetime

from relay.auth0.deliveries import (
    DEFAULT_STREAM_NAME,
    DeliveriesFailed,
    FailedDelivery,
    list_deliveries,
    redeliver_event,
    redeliver_failed,
    resolve_stream_id,
)
from relay.auth0.management import Management, ManagementError, credentials_from_env, rfc3339
from relay.cli.progress import rate_limit_notice

_ERROR_WIDTH = 70


def deliveries(
    environ: Mapping[str, str],
    *,
    stream_id: str | None = None,
    stream_name: str = DEFAULT_STREAM_NAME,
    since: datetime | None = None,
    until: datetime | None = None,
    types: Sequence[str] = (),
) -> int:
    """Returns the exit status."""
    api = Management(credentials_from_env(environ), on_rate_limit=rate_limit_notice(sys.stdout))
    try:
        chosen = resolve_stream_id(api, environ, stream_id, stream_name)
        failed = list_deliveries(api, chosen, since=since, until=until, types=types)
    except (DeliveriesFailed, ManagementError) as error:
        print(f"relay deliveries: {error}", file=sys.stderr, flush=True)
        return 1
    if not failed:
        print(f"no failed deliveries for event stream {chosen}{_filters(since, until, types)}")
        return 0
    print(_delivery_table(failed))
    print(
        f"\n{len(failed)} failed deliveries for event stream {chosen}{_filters(since, until, types)}. "
        "Ask Auth0 to send them again with `relay redeliver` and the same --since/--until/--types, "
        "or one of them with `relay redeliver --event-id ID`"
    )
    return 0


def redeliver(
    environ: Mapping[str, str],
    *,
    stream_id: str | None = None,
    stream_name: str = DEFAULT_STREAM_NAME,
    event_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    types: Sequence[str] = (),
) -> int:
    """Returns the exit status."""
    api = Management(credentials_from_env(environ), on_rate_limit=rate_limit_notice(sys.stdout))
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


def _delivery_table(failed: Sequence[FailedDelivery]) -> str:
    """The deliveries as an aligned text table, oldest event first."""
    header = ("EVENT ID", "TYPE", "EVENT TIME", "ATTEMPTS", "LAST ATTEMPT", "LAST ERROR")
    rows = [_row(delivery) for delivery in failed]
    rows.sort(key=lambda row: (row[2], row[0]))
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def _row(delivery: FailedDelivery) -> tuple[str, str, str, str, str, str]:
    error = delivery.last_error
    if len(error) > _ERROR_WIDTH:
        error = error[: _ERROR_WIDTH - 1] + "…"
    return (
        delivery.event_id,
        delivery.event_type,
        delivery.event_time,
        str(delivery.attempts),
        delivery.last_attempt,
        error,
    )


def _filters(since: datetime | None, until: datetime | None, types: Sequence[str]) -> str:
    parts = []
    if since is not None:
        parts.append(f"from {rfc3339(since)}")
    if until is not None:
        parts.append(f"until {rfc3339(until)}")
    if types:
        parts.append(f"of type {', '.join(types)}")
    return f" ({', '.join(parts)})" if parts else ""
