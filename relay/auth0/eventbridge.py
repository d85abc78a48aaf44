"""`relay deploy-eventbridge`: an Auth0 event stream whose destination is Amazon EventBridge.

Find the event stream by name; create it (destination type `eventbridge`, the AWS account and region, the
three user events, enabled), or bring its subscriptions and status in line. Auth0 then offers the AWS account
a partner event source, whose name (`aws.partner/auth0.com/<tenant>-<uuid>/auth0.events`) the stream reports
and this module returns: the CloudFormation stack in `deploy/aws/` takes it as a parameter.

Auth0 does not let an EventBridge stream's account or region change after creation, so a stream of that name
pointing elsewhere is reported, never replaced: deleting it is for a person to decide. A run that finds
everything right writes nothing.
"""

from __future__ import annotations

import time
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from relay.auth0.deploy import DEFAULT_NAME, EVENT_TYPES, DeployFailed, find_stream, stream_drift
from relay.auth0.management import Management, RateLimited, credentials_from_env

if TYPE_CHECKING:
    from auth0.management import EventStreamResponseContent


def aws_regions() -> tuple[str, ...]:
    """The AWS regions Auth0 can send events to, as its API lists them."""
    from auth0.management import EventStreamEventBridgeAwsRegionEnum

    return tuple(
        region
        for member in typing.get_args(EventStreamEventBridgeAwsRegionEnum)
        for region in typing.get_args(member)
    )


@dataclass(frozen=True, slots=True)
class EventBridgeStream:
    changes: int  # what was changed (or, in a dry run, would have been)
    partner_event_source: str | None  # None in a dry run that would create the stream


def ensure_eventbridge_stream(
    environ: Mapping[str, str],
    *,
    aws_account_id: str,
    aws_region: str,
    stream_name: str = DEFAULT_NAME,
    dry_run: bool = False,
    progress: Callable[[str], None] = lambda _line: None,
    on_rate_limit: RateLimited = lambda _what, _seconds: None,
    sleep: Callable[[float], None] = time.sleep,
) -> EventBridgeStream:
    """Runs `relay deploy-eventbridge`, telling `progress` each step. Raises ConfigError for bad configuration
    (before any request), DeployFailed or ManagementError when the tenant could not be brought in line."""
    api = Management(credentials_from_env(environ), sleep=sleep, on_rate_limit=on_rate_limit)
    will = "would create" if dry_run else "creating"
    target = f"EventBridge, AWS account {aws_account_id}, {aws_region}"
    progress(f"Auth0 tenant {api.domain}" + (" (dry run: nothing will be written)" if dry_run else ""))
    label = f"Event stream {stream_name!r}"
    existing = find_stream(api, stream_name)
    if existing is None or not existing.id:
        progress(f"{label}: not found; {will} it ({target}, {', '.join(EVENT_TYPES)}, enabled)")
        if dry_run:
            return EventBridgeStream(1, None)
        created = _create(api, stream_name, aws_account_id, aws_region)
        progress(f"{label}: created ({created.id}), enabled")
        return EventBridgeStream(1, _partner_event_source(created))

    label = f"Event stream {stream_name!r} ({existing.id})"
    _check_destination(existing, label, aws_account_id, aws_region)
    changes, described = stream_drift(existing)
    if not changes:
        progress(f"{label}: up to date ({target}, {', '.join(EVENT_TYPES)}, enabled)")
        return EventBridgeStream(0, _partner_event_source(existing))
    progress(f"{label}: {'would update' if dry_run else 'updating'} {'; '.join(described)}")
    if not dry_run:
        stream_id = existing.id
        api.call(
            "update the event stream",
            "update:event_streams",
            lambda sdk, once: sdk.event_streams.update(stream_id, **changes, request_options=once),
        )
        progress(f"{label}: updated")
    return EventBridgeStream(1, _partner_event_source(existing))


def _create(api: Management, name: str, account_id: str, region: str) -> EventStreamResponseContent:
    from auth0.management import (
        CreateEventStreamEventBridgeRequestContent,
        EventStreamEventBridgeConfiguration,
        EventStreamEventBridgeDestination,
        EventStreamSubscription,
    )

    request = CreateEventStreamEventBridgeRequestContent(
        name=name,
        subscriptions=[EventStreamSubscription(event_type=event_type) for event_type in EVENT_TYPES],
        destination=EventStreamEventBridgeDestination(
            type="eventbridge",
            configuration=EventStreamEventBridgeConfiguration(
                aws_account_id=account_id,
                aws_region=region,  # checked against aws_regions() by the CLI
            ),
        ),
        status="enabled",
    )
    created: EventStreamResponseContent = api.call(
        "create the event stream",
        "create:event_streams",
        lambda sdk, once: sdk.event_streams.create(request=request, request_options=once),
    )
    return created


def _check_destination(
    existing: EventStreamResponseContent, label: str, account_id: str, region: str
) -> None:
    from auth0.management import EventStreamEventBridgeResponseContent

    destination = (
        existing.destination if isinstance(existing, EventStreamEventBridgeResponseContent) else None
    )
    if destination is None:
        raise DeployFailed(
            f"{label} does not send to EventBridge; choose another --stream-name, or delete that stream"
        )
    held = destination.configuration
    if (held.aws_account_id, held.aws_region) != (account_id, region):
        raise DeployFailed(
            f"{label} sends to AWS account {held.aws_account_id} in {held.aws_region}, and Auth0 cannot "
            "change an EventBridge stream's account or region; delete that stream first, or choose another "
            "--stream-name"
        )


def _partner_event_source(stream: EventStreamResponseContent) -> str | None:
    from auth0.management import EventStreamEventBridgeResponseContent

    if isinstance(stream, EventStreamEventBridgeResponseContent) and stream.destination is not None:
        return stream.destination.configuration.aws_partner_event_source
    return None
