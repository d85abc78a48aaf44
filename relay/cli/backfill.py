"""`relay backfill`: progress on stderr as a status line, the counts on stdout once the load is done (and,
reconciling deletes, how many users were tombstoned, or in a dry run who would be), and on Ctrl-C what was
committed and that running it again is safe."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

from relay.auth0 import export
from relay.auth0.management import Management, ManagementError, credentials_from_env
from relay.backfill import BackfillReport, IncompleteExport, Reconciled
from relay.cli.database import migrated_database
from relay.cli.progress import StatusLine, rate_limit_notice
from relay.operations import iso_utc
from relay.settings import Settings
from relay.store import NotMigrated


def backfill(
    environ: Mapping[str, str],
    settings: Settings,
    *,
    file: Path | None = None,
    job_id: str | None = None,
    timeout: float = export.DEFAULT_TIMEOUT_SECONDS,
    poll_interval: float = export.DEFAULT_POLL_INTERVAL_SECONDS,
    reconciling: export.Reconciling | None = None,
) -> int:
    """Returns the exit status. The Auth0 credentials are checked before the database is looked at (which may
    start the embedded server), and the schema before anything is asked of Auth0."""
    status = StatusLine()
    api = None
    if file is None:
        api = Management(credentials_from_env(environ), on_rate_limit=rate_limit_notice(sys.stdout, status))
    loaded = export.LoadedSoFar()
    try:
        conninfo = migrated_database(settings)
        done = export.backfill(
            api,
            conninfo,
            settings,
            file=file,
            job_id=job_id,
            timeout=timeout,
            poll_interval=poll_interval,
            progress=status.show,
            loaded=loaded,
            reconciling=reconciling,
        )
    except KeyboardInterrupt:
        status.end()
        _interrupted(loaded.report)
        return 130
    except (export.BackfillFailed, IncompleteExport, NotMigrated, ManagementError) as error:
        status.end()
        print(f"relay backfill: {error}", file=sys.stderr, flush=True)
        return 1
    except Exception:
        status.end()
        raise
    status.end()
    if done.loaded is not None:
        print(f"backfill done: {done.loaded.describe()}", flush=True)
    if done.reconciled is not None:
        _say_reconciled(done.reconciled)
    return 0


def _say_reconciled(reconciled: Reconciled) -> None:
    started = iso_utc(reconciled.exported_at)
    count = len(reconciled.tombstoned)
    if reconciled.dry_run:
        for user_id in reconciled.tombstoned:
            print(user_id)
        print(
            f"dry run: would tombstone {count} users absent from the export started at {started}; "
            "nothing written",
            flush=True,
        )
    else:
        print(f"reconciled deletes: tombstoned {count} users absent from the export started at {started}")


def _interrupted(report: BackfillReport | None) -> None:
    if report is None:
        done = "no chunk of users was committed yet"
    else:
        committed = report.inserted + report.merged + report.stale
        done = (
            f"{committed} users committed ({report.inserted} inserted, {report.merged} merged, "
            f"{report.stale} stale), {report.rejected} rows dead-lettered; the chunk in progress was rolled "
            "back"
        )
    print(
        f"relay backfill: interrupted; {done}. Running relay backfill again is safe: a row never overwrites "
        "anything newer than itself",
        file=sys.stderr,
        flush=True,
    )
