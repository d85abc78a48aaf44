"""`relay catch-up`: progress on stderr as a status line after each committed batch, the counts and the
stored cursor on stdout at the end, and on Ctrl-C what was done and that running it again is safe."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping
from datetime import datetime

from relay.auth0 import catch_up as events_api
from relay.auth0.management import Management, ManagementError, credentials_from_env
from relay.cli.database import migrated_database
from relay.cli.progress import StatusLine, rate_limit_notice
from relay.settings import Settings
from relay.store import NotMigrated, open_pool


def catch_up(
    environ: Mapping[str, str],
    settings: Settings,
    *,
    since: datetime | None = None,
    until_idle: bool = True,
    idle_seconds: float = events_api.DEFAULT_IDLE_SECONDS,
) -> int:
    """Returns the exit status."""
    status = StatusLine()
    # Auth0's rate-limit waits, from the Management API client and from the Events API reader alike, are
    # notices on stdout, as in every command.
    api = Management(credentials_from_env(environ), on_rate_limit=rate_limit_notice(sys.stdout, status))
    report = events_api.CatchUpReport()

    async def run(conninfo: str) -> None:
        async with open_pool(conninfo, settings) as pool:
            await events_api.catch_up(
                api,
                pool,
                settings,
                since=since,
                until_idle=until_idle,
                idle_seconds=idle_seconds,
                progress=status.show,
                on_rate_limit=rate_limit_notice(sys.stdout, status),
                report=report,
            )

    try:
        asyncio.run(run(migrated_database(settings)))
    except KeyboardInterrupt:
        status.end()
        print(
            f"relay catch-up: interrupted after {report.describe()}; the batch in progress was rolled back. "
            "Running relay catch-up again is safe: it goes on from the stored cursor",
            file=sys.stderr,
            flush=True,
        )
        return 130
    except (events_api.CatchUpFailed, NotMigrated, ManagementError) as error:
        status.end()
        print(f"relay catch-up: {error}", file=sys.stderr, flush=True)
        return 1
    status.end()
    print(f"catch-up done: {report.describe()}", flush=True)
    return 0
