"""`relay backfill`: copy every existing Auth0 user into PostgreSQL through a users export job.

Steps, each told to `progress`: start an export job (`POST /jobs/users-exports`, JSON, the fields the copy
keeps); poll it (`GET /jobs/{id}`) within a time budget, with its percentage and time left; stream the gzip
NDJSON from the job's download URL to a temporary file, never into memory, asking the job for a fresh URL
when the 60-second one has expired; then load the file with `relay.backfill.load_export`, one committed chunk
at a time. Without an API (`--file`), the first three steps are skipped and an export downloaded earlier is
loaded.

With `Reconciling`, the users the export does not list are then tombstoned
(`relay.backfill.reconcile_deletes`), as of the export's start: the job's creation time, or the time given
with a file. A job that cannot list everyone (one with a `limit`, or of one connection) is refused before
anything is downloaded; a dry run loads nothing and writes nothing, and lists who would be tombstoned.

The download URL is not the Management API: it gets no token, only a plain GET. An interrupted load leaves
every committed chunk in place and rolls back the one in progress; running it again is safe, because an
export row never overwrites anything newer than itself.
"""

from __future__ import annotations

import asyncio
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from auth0.management import GetJobResponseContent

from relay.auth0.management import Management
from relay.backfill import (
    EXPORT_FIELDS,
    BackfillReport,
    ExportListing,
    IncompleteExport,
    Reconciled,
    export_lines,
    list_export,
    load_export,
    reconcile_deletes,
)
from relay.settings import Settings
from relay.store import open_pool

READ_USERS = "read:users"
DEFAULT_TIMEOUT_SECONDS = 30 * 60.0
DEFAULT_POLL_INTERVAL_SECONDS = 5.0
DOWNLOAD_ATTEMPTS = 4
"""Downloads tried, each with a fresh URL after the first, before giving up."""
# What the storage behind an expired (or not yet valid) signed URL answers.
EXPIRED_DOWNLOAD_STATUSES = frozenset({403, 404, 410})
DOWNLOAD_CHUNK_BYTES = 1 << 20
_SHOW_EVERY_SECONDS = 1.0

Progress = Callable[[str], None]


class BackfillFailed(Exception):
    """The backfill cannot go on; the message says why and what to do."""


@dataclass
class LoadedSoFar:
    """What the load has committed so far, kept outside it so an interruption can still report it: None
    until the first chunk has committed."""

    report: BackfillReport | None = None


@dataclass(frozen=True, slots=True)
class Reconciling:
    """`--reconcile-deletes`: when the export started (required with a file; a job's own creation time
    otherwise), and whether only to list who would be tombstoned."""

    exported_at: datetime | None = None
    dry_run: bool = False


@dataclass(frozen=True, slots=True)
class BackfillDone:
    loaded: BackfillReport | None  # None after a dry run, which loads nothing
    reconciled: Reconciled | None


def backfill(
    api: Management | None,
    conninfo: str,
    settings: Settings,
    *,
    file: Path | None = None,
    job_id: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    poll_interval: float = DEFAULT_POLL_INTERVAL_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
    progress: Progress = lambda _line: None,
    loaded: LoadedSoFar | None = None,
    reconciling: Reconciling | None = None,
) -> BackfillDone:
    """Exports the tenant's users through `api` (or, without one, takes the export `file`), loads them, and
    with `reconciling` tombstones those the export does not list.

    Raises BackfillFailed, IncompleteExport, ManagementError, or the store's errors. The caller checks the
    schema first, so that Auth0 is asked for nothing when the database could not take the users.
    """
    with tempfile.TemporaryDirectory(prefix="relay-backfill-") as workdir:
        if api is None:
            if file is None or not file.is_file():
                raise BackfillFailed(f"{file}: no such file")
            path = file
            exported_at = reconciling.exported_at if reconciling else None
        else:
            path = Path(workdir) / "users.json.gz"
            exported_at = export_users(
                api,
                path,
                job_id=job_id,
                timeout=timeout,
                poll_interval=poll_interval,
                sleep=sleep,
                progress=progress,
                complete=reconciling is not None,
            )
        if reconciling is None:
            report = asyncio.run(load_file(conninfo, settings, path, progress=progress, loaded=loaded))
            return BackfillDone(report, None)
        if exported_at is None:
            raise BackfillFailed("reconciling deletes needs the time the export started (--exported-at)")
        return asyncio.run(
            load_and_reconcile(
                conninfo, settings, path, exported_at, reconciling.dry_run, progress=progress, loaded=loaded
            )
        )


def export_users(
    api: Management,
    destination: Path,
    *,
    job_id: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    poll_interval: float = DEFAULT_POLL_INTERVAL_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
    progress: Progress,
    complete: bool = False,
) -> datetime | None:
    """Runs (or, given `job_id`, resumes) an export job and downloads its file to `destination`; returns
    when the job was created, if Auth0 says. With `complete`, `IncompleteExport` before the download when
    the job does not list every user of the tenant."""
    if job_id is None:
        job_id = start_export_job(api)
        progress(f"export job {job_id}: started on {api.domain}")
    job = wait_for_export(
        api, job_id, timeout=timeout, poll_interval=poll_interval, sleep=sleep, progress=progress
    )
    if complete:
        require_complete_job(job_id, job)
    assert job.location is not None  # wait_for_export returns only a job that has one
    download_export(api, job_id, job.location, destination, progress=progress)
    return datetime.fromisoformat(job.created_at) if job.created_at else None


def require_complete_job(job_id: str, job: GetJobResponseContent) -> None:
    """`IncompleteExport` unless the export job lists every user of the tenant: one created with a `limit`,
    or for one connection, leaves others out, who would look deleted."""
    limit = (job.model_extra or {}).get("limit")
    if limit is not None:
        raise IncompleteExport(
            f"not reconciling deletes: export job {job_id} was created with a limit of {limit} users, so it "
            "cannot say who is absent; run relay backfill --reconcile-deletes without --job-id"
        )
    if job.connection_id:
        raise IncompleteExport(
            f"not reconciling deletes: export job {job_id} lists only connection {job.connection_id}; run "
            "relay backfill --reconcile-deletes without --job-id"
        )
    if not job.created_at:
        raise IncompleteExport(
            f"not reconciling deletes: Auth0 did not say when export job {job_id} started; download its file "
            "and run relay backfill --file PATH --exported-at TIME --reconcile-deletes"
        )


def start_export_job(api: Management) -> str:
    from auth0.management import CreateExportUsersFields

    job = api.call(
        "start a users export job",
        READ_USERS,
        lambda sdk, once: sdk.jobs.users_exports.create(
            format="json",
            fields=[CreateExportUsersFields(name=name) for name in EXPORT_FIELDS],
            request_options=once,
        ),
    )
    if not job.id:
        raise BackfillFailed("Auth0 accepted the export job but did not return its id")
    return str(job.id)


def wait_for_export(
    api: Management,
    job_id: str,
    *,
    timeout: float,
    poll_interval: float,
    sleep: Callable[[float], None],
    progress: Progress,
) -> GetJobResponseContent:
    """The job once it has completed, with its download URL; BackfillFailed if it fails or outlasts
    `timeout`.

    `poll_interval` must be positive: the budget is counted in polls, so it holds whatever `sleep` does.
    """
    polls = max(1, math.ceil(timeout / poll_interval))
    state = "unknown"
    for poll in range(polls + 1):
        if poll:
            sleep(poll_interval)
        job = api.call(
            "read the export job", READ_USERS, lambda sdk, once: sdk.jobs.get(job_id, request_options=once)
        )
        state = job.status
        if state == "failed":
            details = job.status_details or "no details given"
            raise BackfillFailed(
                f"Auth0 could not export the users (job {job_id} failed: {details}); run relay backfill again"
            )
        if state == "completed":
            if not job.location:
                raise BackfillFailed(f"export job {job_id} completed without a download URL; run it again")
            progress(f"export job {job_id}: completed")
            return job
        progress(f"export job {job_id}: {_job_progress(state, job.percentage_done, job.time_left_seconds)}")
    raise BackfillFailed(
        f"export job {job_id} did not complete within {timeout:g} s (status {state}); Auth0 keeps it for 24 "
        f"hours: run `relay backfill --job-id {job_id}` with a longer --timeout to pick it up again"
    )


def download_export(
    api: Management,
    job_id: str,
    location: str,
    destination: Path,
    *,
    progress: Progress,
    attempts: int = DOWNLOAD_ATTEMPTS,
) -> int:
    """Streams the export to `destination`; returns its size. An expired URL is replaced by a fresh one."""
    problem = ""
    for attempt in range(1, attempts + 1):
        if attempt > 1:
            progress(f"export job {job_id}: {problem}; asking Auth0 for a fresh download URL")
            location = _fresh_location(api, job_id)
        try:
            size = _download(location, destination, progress)
        except _Expired as expired:
            problem = f"the download URL answered {expired.status_code} (expired)"
            continue
        except httpx.TransportError as error:
            problem = f"the download broke off ({error or type(error).__name__})"
            continue
        progress(f"downloaded the export: {_megabytes(size)}")
        return size
    raise BackfillFailed(f"could not download export job {job_id} in {attempts} attempts: {problem}")


class _Expired(Exception):
    def __init__(self, status_code: int) -> None:
        super().__init__(status_code)
        self.status_code = status_code


def _download(location: str, destination: Path, progress: Progress) -> int:
    size = 0
    shown = 0.0
    # No token and no Management API rules: the URL points at Auth0's file storage and carries its own grant.
    with (
        httpx.Client(timeout=httpx.Timeout(60.0, connect=15.0), follow_redirects=True) as http,
        http.stream("GET", location) as response,
    ):
        if response.status_code in EXPIRED_DOWNLOAD_STATUSES:
            raise _Expired(response.status_code)
        if not response.is_success:
            raise BackfillFailed(
                f"the export's download URL answered {response.status_code}; run relay backfill again"
            )
        total = int(response.headers.get("content-length", "0") or 0)
        with destination.open("wb") as file:
            for chunk in response.iter_bytes(DOWNLOAD_CHUNK_BYTES):
                file.write(chunk)
                size += len(chunk)
                if time.monotonic() - shown >= _SHOW_EVERY_SECONDS:
                    shown = time.monotonic()
                    of_total = f" of {_megabytes(total)}" if total else ""
                    progress(f"downloading the export: {_megabytes(size)}{of_total}")
    return size


def _fresh_location(api: Management, job_id: str) -> str:
    job = api.call(
        "read the export job", READ_USERS, lambda sdk, once: sdk.jobs.get(job_id, request_options=once)
    )
    if job.status != "completed" or not job.location:
        raise BackfillFailed(
            f"export job {job_id} no longer offers a download (status {job.status}); Auth0 deletes export "
            "files after 24 hours: run relay backfill again"
        )
    return job.location


async def load_file(
    conninfo: str,
    settings: Settings,
    path: Path,
    *,
    progress: Progress = lambda _line: None,
    loaded: LoadedSoFar | None = None,
    listing: ExportListing | None = None,
) -> BackfillReport:
    """Loads an export file (gzip or plain NDJSON) into the copy, telling `progress` how it goes, and noting
    who it lists in `listing`, when given."""
    started = time.monotonic()
    shown = 0.0

    def committed(report: BackfillReport) -> None:
        nonlocal shown
        if loaded is not None:
            loaded.report = report
        if time.monotonic() - shown >= _SHOW_EVERY_SECONDS:
            shown = time.monotonic()
            progress(f"loading {path.name}: {report.describe(time.monotonic() - started)}")

    async with open_pool(conninfo, settings) as pool:
        report = await load_export(
            pool,
            export_lines(path),
            settings.delete_mode,
            progress=committed,
            listing=listing,
            keep_history=settings.history,
            change_feed=settings.change_feed_channel,
        )
    progress(f"loaded {path.name}: {report.describe(time.monotonic() - started)}")
    return report


async def load_and_reconcile(
    conninfo: str,
    settings: Settings,
    path: Path,
    exported_at: datetime,
    dry_run: bool,
    *,
    progress: Progress = lambda _line: None,
    loaded: LoadedSoFar | None = None,
) -> BackfillDone:
    """Loads an export file (unless `dry_run`), then tombstones the users it does not list, as of
    `exported_at` (or, in a dry run, finds them)."""
    report = None
    if dry_run:
        progress(f"reading {path.name}")
        listing = list_export(export_lines(path))
    else:
        listing = ExportListing()
        report = await load_file(conninfo, settings, path, progress=progress, loaded=loaded, listing=listing)
    progress(f"reconciling deletes: looking for users {path.name} does not list")
    async with open_pool(conninfo, settings) as pool:
        reconciled = await reconcile_deletes(
            pool,
            listing,
            exported_at,
            settings.delete_mode,
            dry_run=dry_run,
            keep_history=settings.history,
            change_feed=settings.change_feed_channel,
        )
    return BackfillDone(report, reconciled)


def _job_progress(state: str, percentage: int | None, seconds_left: int | None) -> str:
    parts = [state]
    if percentage is not None:
        parts.append(f"{percentage}% done")
    if seconds_left is not None:
        parts.append(f"about {_duration(seconds_left)} left")
    return ", ".join(parts)


def _duration(seconds: int) -> str:
    if seconds < 90:
        return f"{seconds} s"
    return f"{round(seconds / 60)} min"


def _megabytes(size: int) -> str:
    return f"{size / 1_000_000:.1f} MB"
