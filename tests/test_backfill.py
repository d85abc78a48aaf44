"""`relay backfill`: the users export job played by respx, its file streamed from a download URL that expires,
and the load itself (`relay.backfill`) against real PostgreSQL, where a snapshot row obeys the same rules as
an event: it never revives a deleted user, never overwrites anything newer, and converges with live events
whatever the interleaving."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.backfill import BACKFILL_VERSION_ID, EXPORT_FIELDS, BackfillReport, load_export
from relay.cli import main
from relay.cli.progress import StatusLine
from relay.events import EventKind, Origin, UserEvent, decode_body, to_micros
from relay.handlers import UserState, apply_event
from relay.pipeline import Delivery, Pipeline
from relay.store import Pool
from tests.support import REPO
from tests.support.auth0 import MANAGEMENT_API, management_api
from tests.support.database import Database, dead_letters, user_row
from tests.support.events import (
    BASE_TIME,
    NUMBER_POSTGRESQL_REFUSES,
    REFUSED_NUMBER_ERROR,
    encode,
    export_row,
    export_rows,
    ndjson,
    user_event,
)
from tests.support.properties import THROUGH_POSTGRESQL
from tests.support.reference import (
    RowSpec,
    Spec,
    assert_copy_matches,
    event_specs,
    parse_time,
    row_specs,
    to_cloudevents,
    to_export_rows,
)

API = MANAGEMENT_API
JOB_ID = "job_Tq3b7Kd2LmX9pW4v"
FIRST_URL = "https://auth0-exports.example-bucket.s3.amazonaws.com/acme.json.gz?X-Amz-Signature=first"
FRESH_URL = "https://auth0-exports.example-bucket.s3.amazonaws.com/acme.json.gz?X-Amz-Signature=fresh"


@pytest.fixture
def temporary_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Where the download goes: checked afterwards for leftovers."""
    downloads = tmp_path / "tmp"
    downloads.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(downloads))
    return downloads


def job(status: str, **fields: Any) -> httpx.Response:
    return httpx.Response(
        200,
        json={"id": JOB_ID, "type": "users_export", "status": status, "format": "json", **fields},
    )


def streamed(body: bytes, chunk_size: int = 4096) -> Iterator[bytes]:
    for start in range(0, len(body), chunk_size):
        yield body[start : start + chunk_size]


def test_export_job_pending_then_completed_and_an_expired_download_url_replaced(
    relay_env: Any, temporary_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = gzip.compress(ndjson(export_rows(2500)))
    with management_api(assert_all_called=True) as auth0:
        start = auth0.post(f"{API}/jobs/users-exports").mock(
            return_value=httpx.Response(201, json={"id": JOB_ID, "type": "users_export", "status": "pending"})
        )
        polls = auth0.get(f"{API}/jobs/{JOB_ID}").mock(
            side_effect=[
                job("pending", percentage_done=0),
                job("processing", percentage_done=50, time_left_seconds=30),
                job("completed", percentage_done=100, location=FIRST_URL),
                job("completed", percentage_done=100, location=FRESH_URL),
            ]
        )
        expired = auth0.get(FIRST_URL).mock(
            return_value=httpx.Response(
                403, text="<Error><Code>AccessDenied</Code>Request has expired</Error>"
            )
        )
        download = auth0.get(FRESH_URL).mock(
            side_effect=lambda request: httpx.Response(200, content=streamed(body))
        )

        status = main(["backfill", "--poll-interval", "0.01"])

    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert json.loads(start.calls[0].request.content) == {
        "format": "json",
        "fields": [{"name": name} for name in EXPORT_FIELDS],
    }
    assert {"identities", "app_metadata", "user_metadata", "created_at", "updated_at"} <= set(EXPORT_FIELDS)
    assert polls.call_count == 4
    assert expired.call_count == 1 and download.call_count == 1
    # The download host gets no Management API token.
    assert "authorization" not in download.calls[0].request.headers
    assert "authorization" not in expired.calls[0].request.headers
    assert f"export job {JOB_ID}: pending, 0% done" in captured.err
    assert f"export job {JOB_ID}: processing, 50% done, about 30 s left" in captured.err
    assert "answered 403 (expired); asking Auth0 for a fresh download URL" in captured.err
    assert "loaded users.json.gz: 2500 rows: 2500 inserted, 0 merged, 0 stale, 0 rejected" in captured.err
    assert captured.out.strip() == "backfill done: 2500 rows: 2500 inserted, 0 merged, 0 stale, 0 rejected"

    assert relay_env.query("SELECT count(*) FROM live_users") == [(2500,)]
    assert relay_env.query(
        "SELECT email, updated_at, last_event_processed, last_event_id FROM users WHERE user_id = %s",
        ["auth0|user00042"],
    ) == [
        (
            "user00042@example.com",
            BASE_TIME + timedelta(seconds=42),
            BASE_TIME + timedelta(seconds=42),
            "backfill",
        )
    ]
    assert list(temporary_dir.iterdir()) == []  # the downloaded file is gone


def test_a_download_url_that_keeps_expiring_gives_up_after_bounded_attempts(
    relay_env: Any, temporary_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with management_api() as auth0:
        polls = auth0.get(f"{API}/jobs/{JOB_ID}").mock(return_value=job("completed", location=FIRST_URL))
        downloads = auth0.get(FIRST_URL).mock(return_value=httpx.Response(410))

        status = main(["backfill", "--job-id", JOB_ID, "--poll-interval", "0.01"])

    captured = capsys.readouterr()
    assert status == 1
    assert downloads.call_count == 4
    assert polls.call_count == 4  # the first poll, then a fresh URL before each retry
    assert f"relay backfill: could not download export job {JOB_ID} in 4 attempts" in captured.err
    assert relay_env.query("SELECT count(*) FROM users") == [(0,)]
    assert list(temporary_dir.iterdir()) == []


def test_a_failed_export_job_is_a_clear_error(relay_env: Any, capsys: pytest.CaptureFixture[str]) -> None:
    with management_api() as auth0:
        auth0.post(f"{API}/jobs/users-exports").mock(
            return_value=httpx.Response(201, json={"id": JOB_ID, "type": "users_export", "status": "pending"})
        )
        auth0.get(f"{API}/jobs/{JOB_ID}").mock(
            side_effect=[job("pending"), job("failed", status_details="the export could not be written")]
        )

        status = main(["backfill", "--poll-interval", "0.01"])

    assert status == 1
    reason = "the export could not be written"
    assert f"relay backfill: Auth0 could not export the users (job {JOB_ID} failed: {reason})" in (
        capsys.readouterr().err
    )


def test_an_export_job_that_outlasts_the_timeout_says_how_to_pick_it_up_again(
    relay_env: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    with management_api() as auth0:
        auth0.post(f"{API}/jobs/users-exports").mock(
            return_value=httpx.Response(201, json={"id": JOB_ID, "type": "users_export", "status": "pending"})
        )
        polls = auth0.get(f"{API}/jobs/{JOB_ID}").mock(return_value=job("processing", percentage_done=10))

        status = main(["backfill", "--timeout", "0.05", "--poll-interval", "0.01"])

    err = capsys.readouterr().err
    assert status == 1
    assert polls.call_count == 6  # the budget is counted in polls: 0.05 s / 0.01 s, plus the first
    assert f"export job {JOB_ID} did not complete within 0.05 s (status processing)" in err
    assert f"relay backfill --job-id {JOB_ID}" in err


def test_a_rate_limited_status_check_waits_and_goes_on(
    relay_env: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    body = gzip.compress(ndjson(export_rows(3)))
    with management_api() as auth0:
        auth0.get(f"{API}/jobs/{JOB_ID}").mock(
            side_effect=[
                httpx.Response(429, headers={"Retry-After": "0"}, json={"message": "Too Many Requests"}),
                job("completed", location=FIRST_URL),
            ]
        )
        auth0.get(FIRST_URL).mock(return_value=httpx.Response(200, content=body))

        status = main(["backfill", "--job-id", JOB_ID])

    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "rate limited by Auth0 while trying to read the export job; retrying in 0 s" in captured.out
    assert relay_env.query("SELECT count(*) FROM users") == [(3,)]


@pytest.mark.parametrize("compressed", [True, False], ids=["gzip", "plain"])
def test_file_import_of_an_export_already_downloaded(
    relay_env: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], compressed: bool
) -> None:
    content = ndjson(export_rows(25)) + b"\n" + b"not json at all\n"
    path = tmp_path / ("acme.json.gz" if compressed else "acme.json")
    path.write_bytes(gzip.compress(content) if compressed else content)

    with management_api() as auth0:  # no Auth0 request is needed
        status = main(["backfill", "--file", str(path)])

    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert captured.out.strip() == "backfill done: 26 rows: 25 inserted, 0 merged, 0 stale, 1 rejected"
    assert relay_env.query("SELECT count(*) FROM users") == [(25,)]
    assert relay_env.query("SELECT route, body FROM dead_letters") == [("backfill", b"not json at all")]
    assert auth0.calls.call_count == 0  # an export already downloaded needs nothing from Auth0
    # Loading the same file again changes nothing: every row is as old as what it wrote.
    assert main(["backfill", "--file", str(path)]) == 0
    assert (
        capsys.readouterr().out.strip()
        == "backfill done: 26 rows: 0 inserted, 0 merged, 25 stale, 1 rejected"
    )
    assert relay_env.query("SELECT count(*), min(last_event_id), max(last_event_id) FROM users") == [
        (25, "backfill", "backfill")
    ]


def test_ctrl_c_keeps_committed_chunks_rolls_back_the_one_in_progress_and_says_rerunning_is_safe(
    database: Any, tmp_path: Path
) -> None:
    path = tmp_path / "big.json"
    with path.open("wb") as file:
        for start in range(0, 200_000, 10_000):
            file.write(
                ndjson(
                    [export_row(f"auth0|u{number:06d}", BASE_TIME) for number in range(start, start + 10_000)]
                )
            )
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RELAY_", "AUTH0_"))}
    env |= {
        "DATABASE_URL": database.conninfo,
        "RELAY_DB_SCHEMA": database.schema,
        "RELAY_LOG_LEVEL": "WARNING",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "relay.cli", "backfill", "--file", str(path)],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        first_progress = process.stderr.readline()  # written once the first chunk has committed
        process.send_signal(signal.SIGINT)
        out, rest = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert first_progress.startswith("loading big.json: ")
    assert process.returncode == 130, rest
    assert out == ""  # no claim that the backfill was done
    assert "relay backfill: interrupted;" in rest
    assert "the chunk in progress was rolled back. Running relay backfill again is safe" in rest
    [(count,)] = database.query("SELECT count(*) FROM users")
    assert 0 < count < 200_000
    assert count % 10_000 == 0  # whole chunks only


def test_file_import_into_an_unmigrated_schema_says_to_migrate(
    monkeypatch: pytest.MonkeyPatch, database_server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "acme.json"
    path.write_bytes(ndjson(export_rows(1)))
    monkeypatch.setenv("DATABASE_URL", database_server)
    monkeypatch.setenv("RELAY_DB_SCHEMA", "never_migrated_" + secrets.token_hex(4))

    assert main(["backfill", "--file", str(path)]) == 1
    assert "run `relay migrate` first" in capsys.readouterr().err


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_rewrites_one_line_on_a_terminal_and_writes_a_line_per_change_elsewhere() -> None:
    terminal, log = Terminal(), io.StringIO()
    for stream in (terminal, log):
        status = StatusLine(stream)
        for text in ("export job job_1: pending", "export job job_1: pending", "export job job_1: completed"):
            status.show(text)
        status.end()

    assert terminal.getvalue() == ("\rexport job job_1: pending\x1b[K\rexport job job_1: completed\x1b[K\n")
    assert log.getvalue() == "export job job_1: pending\nexport job job_1: completed\n"


# ---------------------------------------------------------------------------------------------------------
# relay.backfill against real PostgreSQL


def lines_of(rows: list[dict[str, Any]]) -> list[bytes]:
    """Export rows as `export_lines` yields them: one stripped JSON line each."""
    return [encode(row) for row in rows]


async def load(pool: Pool, rows: list[dict[str, Any]] | list[bytes], **options: Any) -> BackfillReport:
    lines = [row if isinstance(row, bytes) else encode(row) for row in rows]
    return await load_export(pool, iter(lines), "soft", **options)


async def apply(pipeline: Pipeline, *events: dict[str, Any]) -> list[str]:
    """Live events, committed together as one batch."""
    results = await pipeline.commit([Delivery("webhook", decode_body(encode(event))) for event in events])
    return [result.outcome.value for answers in results for result in answers]


def as_snapshot(row: dict[str, Any]) -> UserEvent:
    """An export row as the handlers see it: a `user.updated` full snapshot whose version is (its updated_at,
    or created_at when it has none; "backfill")."""
    moment = parse_time(row.get("updated_at") or row["created_at"])
    return UserEvent(
        id=BACKFILL_VERSION_ID,
        kind=EventKind.UPDATED,
        time=moment,
        version=(to_micros(moment), BACKFILL_VERSION_ID),
        user_id=row["user_id"],
        profile=row,
        is_snapshot=True,
        deleted_at=None,
        origin=Origin(),
        raw=b"",
    )


def stored_state(database: Database, user_id: str) -> dict[str, Any]:
    row = user_row(database, user_id)
    assert row is not None, user_id
    return {
        key: row[key]
        for key in ("profile", "merge_state", "deleted_at", "last_event_processed", "last_event_id")
    }


def handlers_state(state: UserState) -> dict[str, Any]:
    """What the store must hold for a state the handlers computed."""
    assert state.last_version is not None
    return {
        "profile": state.profile,
        "merge_state": state.to_merge_state(),
        "deleted_at": state.deleted_at,
        "last_event_processed": parse_time("1970-01-01T00:00:00Z")
        + timedelta(microseconds=state.last_version[0]),
        "last_event_id": state.last_version[1],
    }


@pytest.mark.anyio
async def test_users_inserted_in_sql_hold_exactly_what_the_handlers_would_give_them(
    pool: Pool, database: Database
) -> None:
    """New users never reach the handlers: PostgreSQL inserts them from the raw lines. Their rows, bookkeeping
    included, must be what `apply_event` makes of the row as a snapshot on a user with no state."""
    only_created = export_row("auth0|only-created", BASE_TIME)
    del only_created["updated_at"]
    rows = [
        export_row("auth0|plain", BASE_TIME + timedelta(hours=1)),
        export_row("auth0|micros", BASE_TIME, custom={"nested": [1, None]})
        | {"updated_at": "2025-01-01T00:00:00.123456Z"},
        export_row("auth0|null-updated", BASE_TIME) | {"updated_at": None},
        only_created,
        export_row("auth0|offset", BASE_TIME) | {"updated_at": "2025-03-01T10:00:00.5+05:30"},
    ]

    report = await load(pool, rows)

    assert (report.rows, report.inserted, report.merged, report.stale, report.rejected) == (5, 5, 0, 0, 0)
    for row in rows:
        state = UserState(row["user_id"])
        assert apply_event(state, as_snapshot(row), "soft").value == "applied"
        assert stored_state(database, row["user_id"]) == handlers_state(state), row["user_id"]


@pytest.mark.anyio
async def test_known_users_are_merged_by_the_handlers_with_the_same_result_as_in_memory(
    pipeline: Pipeline, pool: Pool, database: Database
) -> None:
    user_id = "auth0|known"
    created = user_event("created", "evt_created", BASE_TIME, **export_row(user_id, BASE_TIME))
    renamed = user_event("updated", "evt_renamed", BASE_TIME + timedelta(hours=2), user_id, name="Live name")
    assert await apply(pipeline, created, renamed) == ["applied", "applied"]
    row = export_row(user_id, BASE_TIME + timedelta(hours=1), nickname="from export")

    report = await load(pool, [row])

    state = UserState(user_id)
    for sent in (created, renamed):
        [event] = decode_body(encode(sent))
        assert isinstance(event, UserEvent)
        apply_event(state, event, "soft")
    assert apply_event(state, as_snapshot(row), "soft").value == "stale"  # older than the rename
    assert (report.inserted, report.merged, report.stale) == (0, 0, 1)
    assert stored_state(database, user_id) == handlers_state(state)
    assert state.profile["name"] == "Live name" and state.profile["nickname"] == "from export"


@pytest.mark.anyio
async def test_loading_the_same_export_again_changes_nothing_and_reports_every_row_stale(
    pool: Pool, database: Database
) -> None:
    rows = export_rows(30)
    first = await load(pool, rows, chunk_rows=7)
    before = database.query("SELECT *, xmin::text FROM users ORDER BY user_id")

    again = await load(pool, rows, chunk_rows=7)

    assert (first.inserted, first.merged, first.stale) == (30, 0, 0)
    assert (again.rows, again.inserted, again.merged, again.stale, again.rejected) == (30, 0, 0, 30, 0)
    assert database.query("SELECT *, xmin::text FROM users ORDER BY user_id") == before  # not even rewritten


@pytest.mark.anyio
async def test_backfill_never_revives_a_deleted_user(
    pipeline: Pipeline, pool: Pool, database: Database
) -> None:
    user_id = "auth0|deleted"
    deleted = BASE_TIME + timedelta(minutes=10)
    assert await apply(pipeline, user_event("deleted", "evt_delete", deleted, user_id)) == ["tombstoned"]

    older = await load(pool, [export_row(user_id, deleted - timedelta(minutes=5))])
    newer = await load(pool, [export_row(user_id, deleted + timedelta(minutes=5), name="Snapshot name")])

    assert (older.stale, newer.merged) == (1, 1)
    assert database.query("SELECT name, deleted_at FROM users WHERE user_id = %s", [user_id]) == [
        ("Snapshot name", deleted)
    ]
    assert database.query("SELECT count(*) FROM live_users") == [(0,)]


@pytest.mark.anyio
async def test_backfill_never_overwrites_a_newer_event(
    pipeline: Pipeline, pool: Pool, database: Database
) -> None:
    user_id = "auth0|user00001"
    event_time = BASE_TIME + timedelta(minutes=10)
    await apply(
        pipeline,
        user_event("created", "evt_created", BASE_TIME, **export_row(user_id, BASE_TIME)),
        user_event("updated", "evt_renamed", event_time, user_id, name="Renamed live"),
    )

    report = await load(
        pool, [export_row(user_id, event_time - timedelta(minutes=1), name="Older name", nickname="n")]
    )

    assert (report.inserted, report.merged, report.stale) == (0, 0, 1)
    # The newer event's field stays; a field no newer event wrote is filled from the snapshot.
    assert database.query(
        "SELECT name, nickname, last_event_processed, last_event_id FROM users WHERE user_id = %s", [user_id]
    ) == [("Renamed live", "n", event_time, "evt_renamed")]


@pytest.mark.anyio
async def test_a_snapshot_newer_than_the_stored_state_replaces_it(
    pipeline: Pipeline, pool: Pool, database: Database
) -> None:
    user_id = "auth0|user00002"
    await apply(pipeline, user_event("created", "evt_created", BASE_TIME, **export_row(user_id, BASE_TIME)))
    later = BASE_TIME + timedelta(hours=1)

    report = await load(
        pool, [export_row(user_id, later, email="changed@example.com", user_metadata={"a": 1})]
    )

    assert (report.inserted, report.merged, report.stale) == (0, 1, 0)
    assert database.query(
        "SELECT email, user_metadata, last_event_processed, last_event_id FROM users WHERE user_id = %s",
        [user_id],
    ) == [("changed@example.com", {"a": 1}, later, "backfill")]
    # A live event at the very same instant still wins the tie.
    await apply(pipeline, user_event("updated", "evt_same_time", later, user_id, email="event@example.com"))
    assert database.query("SELECT email FROM users WHERE user_id = %s", [user_id]) == [("event@example.com",)]


@pytest.mark.anyio
async def test_times_with_utc_offsets_beyond_postgresqls_own_range_are_read_as_rfc_3339_says(
    pool: Pool, database: Database
) -> None:
    """PostgreSQL's timestamptz takes offsets up to ±15:59; RFC 3339, and so the relay, up to ±23:59."""
    rows = export_rows(3)
    rows[1] |= {"updated_at": "2025-01-01T00:00:00+20:00", "last_login": "2025-01-01T00:00:00-16:30"}

    report = await load(pool, rows)

    assert (report.inserted, report.rejected) == (3, 0)
    assert database.query(
        "SELECT updated_at, last_login, last_event_processed FROM users WHERE user_id = %s",
        [rows[1]["user_id"]],
    ) == [
        (
            datetime(2024, 12, 31, 4, tzinfo=UTC),
            datetime(2025, 1, 1, 16, 30, tzinfo=UTC),
            datetime(2024, 12, 31, 4, tzinfo=UTC),
        )
    ]


# A valid JSON Auth0 user that PostgreSQL refuses as data.
REFUSED_ROWS = {
    "user_metadata": (
        {"user_metadata": {"size": NUMBER_POSTGRESQL_REFUSES}},
        f"PostgreSQL refused the row: {REFUSED_NUMBER_ERROR}",
    ),
}


@pytest.mark.anyio
@pytest.mark.parametrize("case", sorted(REFUSED_ROWS))
async def test_a_row_postgresql_refuses_is_dead_lettered_and_its_chunk_mates_land(
    pool: Pool, database: Database, case: str
) -> None:
    changes, error = REFUSED_ROWS[case]
    rows = export_rows(7)
    rows[4] |= changes
    lines = lines_of(rows)

    report = await load(pool, lines, chunk_rows=5)

    assert (report.rows, report.inserted, report.merged, report.stale, report.rejected) == (7, 6, 0, 0, 1)
    assert database.query("SELECT user_id FROM users ORDER BY user_id") == [
        (row["user_id"],) for index, row in enumerate(rows) if index != 4
    ]
    [letter] = dead_letters(database)
    assert (letter.route, letter.body, letter.headers, letter.error) == ("backfill", lines[4], {}, error)
    for other in rows[:4] + rows[5:]:
        assert other["user_id"] not in letter.error and other["email"] not in letter.error


@pytest.mark.anyio
async def test_rows_that_are_not_auth0_users_are_dead_lettered_and_their_chunk_mates_land(
    pool: Pool, database: Database
) -> None:
    bad = {
        b"{not json": "not an Auth0 user: JSON is malformed: object keys must be strings (byte 1)",
        json.dumps({"email": "no-user-id@example.com", "updated_at": "2025-01-01T00:00:00Z"}).encode(): (
            "not an Auth0 user: Object missing required field `user_id`"
        ),
        json.dumps({"user_id": "auth0|unversioned", "email": "x@example.com"}).encode(): (
            "an export row needs updated_at (or created_at) to be versioned"
        ),
        json.dumps(export_row("auth0|typed", BASE_TIME, email_verified="yes")).encode(): (
            "not an Auth0 user: Expected `bool | null`, got `str` - at `$.email_verified`"
        ),
        json.dumps(export_row("auth0|naive", BASE_TIME) | {"updated_at": "2025-01-01T00:00:00"}).encode(): (
            "not an Auth0 user: Expected `datetime` with a timezone component - at `$.updated_at`"
        ),
        json.dumps(export_row("auth0|nul", BASE_TIME, name="nul \u0000 inside")).encode(): (
            "the row holds a \\u0000 character, which PostgreSQL cannot store in text or jsonb"
        ),
    }
    good = lines_of([export_row("auth0|good", BASE_TIME), export_row("auth0|also-good", BASE_TIME)])

    report = await load(pool, [good[0], *bad, good[1]], chunk_rows=4)

    assert (report.rows, report.inserted, report.rejected) == (8, 2, 6)
    assert database.query("SELECT user_id FROM users ORDER BY user_id") == [
        ("auth0|also-good",),
        ("auth0|good",),
    ]
    # Chunks commit two at a time, so their letters may be written in either order.
    assert sorted((letter.route, letter.body, letter.error) for letter in dead_letters(database)) == sorted(
        ("backfill", line, error) for line, error in bad.items()
    )


@pytest.mark.anyio
async def test_chunks_commit_one_by_one_and_the_newest_row_of_a_user_wins(
    pool: Pool, database: Database
) -> None:
    rows = export_rows(7)
    rows.append(export_row("auth0|user00003", BASE_TIME + timedelta(days=1), name="Newest"))
    rows.append(export_row("auth0|user00003", BASE_TIME + timedelta(hours=1), name="Older duplicate"))
    seen: list[int] = []

    report = await load(
        pool,
        rows,
        chunk_rows=3,
        chunks_in_flight=1,
        progress=lambda progress: seen.append(progress.inserted),
    )

    assert (report.rows, report.inserted, report.merged, report.stale, report.rejected) == (9, 7, 1, 0, 0)
    assert seen == [3, 6, 7]  # each chunk reported once committed, then the end
    assert database.query("SELECT name FROM users WHERE user_id = %s", ["auth0|user00003"]) == [("Newest",)]
    assert database.query("SELECT count(*) FROM users") == [(7,)]


@pytest.mark.anyio
async def test_a_chunk_chosen_as_a_deadlock_victim_is_merged_again(pool: Pool, database: Database) -> None:
    """The relay takes row locks in user_id order, but another writer (an operator's own transaction, say)
    may not, and can deadlock with a chunk. PostgreSQL rolls one back; if it picks the chunk, the chunk must
    be merged again, not fail the backfill."""
    first, second = "auth0|user00000", "auth0|user00001"
    await load(pool, [export_row(first, BASE_TIME), export_row(second, BASE_TIME)])
    newer = BASE_TIME + timedelta(hours=1)

    async with await psycopg.AsyncConnection.connect(
        database.conninfo, options=f"-c search_path={database.schema}"
    ) as other:
        await other.execute("SELECT 1 FROM users WHERE user_id = %s FOR UPDATE", [second])
        loading = asyncio.create_task(
            load(pool, [export_row(first, newer, name="First"), export_row(second, newer, name="Second")])
        )
        # The chunk holds `first` and waits for `second`.
        await wait_for_a_lock_wait(database, other.info.backend_pid)
        # Closing the cycle: PostgreSQL's deadlock check runs in the chunk's backend first, since it has
        # waited longest, and rolls the chunk back; this statement then gets its lock.
        await other.execute("SELECT 1 FROM users WHERE user_id = %s FOR UPDATE", [first])
        await other.commit()
        report = await asyncio.wait_for(loading, 30)

    assert (report.inserted, report.merged, report.stale, report.rejected) == (0, 2, 0, 0)
    assert database.query("SELECT name FROM users ORDER BY user_id") == [("First",), ("Second",)]


async def wait_for_a_lock_wait(database: Database, holder_pid: int, seconds: float = 10) -> None:
    """Until a chunk's merge (`MERGE_EXPORT_LINES`, which reads `export_lines`) waits for a row lock held by
    this test's own connection (other tests, in other workers, may be waiting on locks of their own)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        waiting = database.query(
            "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid)) AND query LIKE %s",
            [holder_pid, "%FROM export_lines%"],
        )
        if waiting[0][0] > 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the backfill chunk never waited for the row lock")


# ---------------------------------------------------------------------------------------------------------
# Property: a backfill and live events, in any interleaving, converge to the version-ordered state.


@dataclass(frozen=True)
class Scenario:
    live: list[Spec]
    rows: list[RowSpec]
    operations: list[tuple[str, list[int]]]  # ("events", indexes) or ("export", indexes), in order
    lanes: int
    chunk_rows: int


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    live_events = draw(st.lists(event_specs(millis=9), max_size=10))
    # One snapshot per user and instant: two different rows at the same version would have no defined winner.
    rows = draw(st.lists(row_specs(), min_size=1, max_size=6, unique_by=lambda row: (row.user, row.millis)))
    operations: list[tuple[str, list[int]]] = []
    for kind, count in (("events", len(live_events)), ("export", len(rows))):
        indexes = draw(st.permutations(range(count)))
        while indexes:
            size = draw(st.integers(1, len(indexes)))
            operations.append((kind, list(indexes[:size])))
            indexes = indexes[size:]
    # Deliveries repeat: live events arrive twice, and an export is loaded again.
    operations += draw(st.lists(st.sampled_from(operations), max_size=2)) if operations else []
    ordered = draw(st.permutations(operations))
    return Scenario(live_events, rows, list(ordered), draw(st.integers(1, 2)), draw(st.integers(1, 3)))


@pytest.mark.anyio
@THROUGH_POSTGRESQL
@given(scenario=scenarios())
async def test_backfill_and_live_events_converge_in_any_interleaving(
    pipeline: Pipeline, pool: Pool, database: Database, scenario: Scenario
) -> None:
    prefix = secrets.token_hex(4)  # fresh users and event ids for every example in the shared schema
    events = to_cloudevents(scenario.live, prefix)
    rows = to_export_rows(scenario.rows, prefix)

    async def run(operations: list[tuple[str, list[int]]]) -> None:
        for kind, indexes in operations:
            if kind == "events":
                await apply(pipeline, *(events[index] for index in indexes))
            else:
                lines = lines_of([rows[index] for index in indexes])
                await load_export(pool, iter(lines), "soft", chunk_rows=scenario.chunk_rows)

    lanes = [scenario.operations[lane :: scenario.lanes] for lane in range(scenario.lanes)]
    await asyncio.gather(*(run(lane) for lane in lanes))

    assert_copy_matches(database, events, prefix, export_rows=rows)
