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
    if dry_run:
        say("dry run: nothing was written" + ("" if deployed.changes else "; nothing to change"))
    elif deployed.changes:
        say("done")
    else:
        say("nothing to change")
    return 0
