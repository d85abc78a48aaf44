"""`relay deploy-action`: each step on stdout as it happens, then what the run came to."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping

from relay.auth0.deploy import DEFAULT_NAME, DeployFailed, ensure_deployed
from relay.auth0.management import ManagementError
from relay.cli.progress import rate_limit_notice, say


def deploy_action(
    environ: Mapping[str, str],
    *,
    name: str = DEFAULT_NAME,
    stream_name: str = DEFAULT_NAME,
    dry_run: bool = False,
    sleep: Callable[[float], None] = time.sleep,
    build_timeout: float = 60.0,
    poll_interval: float = 1.0,
) -> int:
    """Returns the exit status. Raises ConfigError for bad configuration (`main` says which variables)."""
    try:
        deployed = ensure_deployed(
            environ,
            name=name,
            stream_name=stream_name,
            dry_run=dry_run,
            progress=say,
            on_rate_limit=rate_limit_notice(sys.stdout),
            sleep=sleep,
            build_timeout=build_timeout,
            poll_interval=poll_interval,
        )
    except (ManagementError, DeployFailed) as error:
        print(f"relay deploy-action: {error}", file=sys.stderr, flush=True)
        return 1
    _say_what_it_came_to(deployed.changes, dry_run)
    return 0


def _say_what_it_came_to(changes: int, dry_run: bool) -> None:
    if dry_run:
        say("dry run: nothing was written" + ("" if changes else "; nothing to change"))
    else:
        say("done" if changes else "nothing to change")


def deploy_eventbridge(
    environ: Mapping[str, str],
    *,
    aws_account_id: str,
    aws_region: str,
    stream_name: str = DEFAULT_NAME,
    dry_run: bool = False,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Returns the exit status; prints the partner event source name and what to do with it."""
    from relay.auth0.eventbridge import ensure_eventbridge_stream

    try:
        stream = ensure_eventbridge_stream(
            environ,
            aws_account_id=aws_account_id,
            aws_region=aws_region,
            stream_name=stream_name,
            dry_run=dry_run,
            progress=say,
            on_rate_limit=rate_limit_notice(sys.stdout),
            sleep=sleep,
        )
    except (ManagementError, DeployFailed) as error:
        print(f"relay deploy-eventbridge: {error}", file=sys.stderr, flush=True)
        return 1
    _say_what_it_came_to(stream.changes, dry_run)
    if stream.partner_event_source:
        say(f"partner event source: {stream.partner_event_source}")
        say(
            "next: deploy deploy/aws/eventbridge-sqs.yaml with PartnerEventSourceName set to it "
            f"(in AWS account {aws_account_id}, {aws_region}), then run relay serve with RELAY_SQS_QUEUE_URL"
        )
    elif not dry_run:
        say("Auth0 did not report the partner event source yet; run this again in a minute to see it")
    return 0
