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
import respx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.auth0.progress import StatusLine
from relay.backfill import EXPORT_FIELDS, load_export
from relay.batching import apply_isolating
from relay.cli import main
from relay.events import decode_event
from tests.support import AUTH0_DOMAIN, REPO

DOMAIN = AUTH0_DOMAIN
API = f"https://{DOMAIN}/api/v2"
JOB_ID = "job_Tq3b7Kd2LmX9pW4v"
FIRST_URL = "https://auth0-exports.example-bucket.s3.amazonaws.com/acme.json.gz?X-Amz-Signature=first"
FRESH_URL = "https://auth0-exports.example-bucket.s3.amazonaws.com/acme.json.gz?X-Amz-Signature=fresh"
BASE_TIME = datetime(2025, 1, 1, tzinfo=UTC)
DB_EXAMPLES = 150 if os.environ.get("CI") else 40


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def export_row(user_id: str, updated: datetime, **fields: Any) -> dict[str, Any]:
    """One user as a JSON export lists it: the explicit field list, metadata objects whole."""
    local_id = user_id.split("|")[-1]
    return {
        "user_id": user_id,
        "email": f"{local_id}@example.com",
        "email_verified": True,
        "name": f"User {local_id}",
        "identities": [
            {"connection": "Username-Password-Authentication", "provider": "auth0", "user_id": local_id}
        ],
        "app_metadata": {"plan": "pro"},
        "user_metadata": {},
        "created_at": iso(BASE_TIME),
        "updated_at": iso(updated),
        "logins_count": 1,
        **fields,
    }


def ndjson(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def user_rows(count: int) -> list[dict[str, Any]]:
    return [
        export_row(f"auth0|user{number:05d}", BASE_TIME + timedelta(seconds=number))
        for number in range(count)
    ]


def cloudevent(event_id: str, kind: str, moment: datetime, user_id: str, **fields: Any) -> bytes:
    return json.dumps(
        {
            "specversion": "1.0",
            "id": event_id,
            "type": f"user.{kind}",
            "time": iso(moment),
            "data": {"object": {"user_id": user_id, **fields}},
        }
    ).encode()


@pytest.fixture
def temporary_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Where the download goes: checked afterwards for leftovers."""
    downloads = tmp_path / "tmp"
    downloads.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(downloads))
    return downloads


def mock_token(auth0: respx.MockRouter) -> None:
    auth0.post(f"https://{DOMAIN}/oauth/token").mock(
        return_value=httpx.Response(
            200, json={"access_token": "management-token", "expires_in": 86400, "token_type": "Bearer"}
        )
    )


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
    body = gzip.compress(ndjson(user_rows(2500)))
    with respx.mock(assert_all_called=True, assert_all_mocked=True) as auth0:
        mock_token(auth0)
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
    with respx.mock(assert_all_mocked=True) as auth0:
        mock_token(auth0)
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
    with respx.mock(assert_all_mocked=True) as auth0:
        mock_token(auth0)
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
    with respx.mock(assert_all_mocked=True) as auth0:
        mock_token(auth0)
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
    body = gzip.compress(ndjson(user_rows(3)))
    with respx.mock(assert_all_mocked=True) as auth0:
        mock_token(auth0)
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
    content = ndjson(user_rows(25)) + b"\n" + b"not json at all\n"
    path = tmp_path / ("acme.json.gz" if compressed else "acme.json")
    path.write_bytes(gzip.compress(content) if compressed else content)

    with respx.mock(assert_all_mocked=True):  # no Auth0 credentials or requests needed
        status = main(["backfill", "--file", str(path)])

    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert captured.out.strip() == "backfill done: 26 rows: 25 inserted, 0 merged, 0 stale, 1 rejected"
    assert relay_env.query("SELECT count(*) FROM users") == [(25,)]
    assert relay_env.query("SELECT route, body FROM dead_letters") == [("backfill", b"not json at all\n")]
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
    path.write_bytes(ndjson(user_rows(1)))
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


# relay.backfill against real PostgreSQL


async def load(pool: Any, rows: list[dict[str, Any]] | list[bytes], **options: Any) -> Any:
    lines = [row if isinstance(row, bytes) else json.dumps(row).encode() + b"\n" for row in rows]
    return await load_export(pool, iter(lines), "soft", **options)


async def apply(pool: Any, *bodies: bytes) -> list[str]:
    return [
        str(result) for result in await apply_isolating(pool, [decode_event(body) for body in bodies], "soft")
    ]


@pytest.mark.anyio
async def test_backfill_never_revives_a_deleted_user(pool: Any, database: Any) -> None:
    user_id = "auth0|deleted"
    deleted = BASE_TIME + timedelta(minutes=10)
    assert await apply(pool, cloudevent("evt_delete", "deleted", deleted, user_id)) == ["tombstoned"]

    older = await load(pool, [export_row(user_id, deleted - timedelta(minutes=5))])
    newer = await load(pool, [export_row(user_id, deleted + timedelta(minutes=5), name="Snapshot name")])

    assert (older.stale, newer.merged) == (1, 1)
    assert database.query("SELECT name, deleted_at FROM users WHERE user_id = %s", [user_id]) == [
        ("Snapshot name", deleted)
    ]
    assert database.query("SELECT count(*) FROM live_users") == [(0,)]


@pytest.mark.anyio
async def test_backfill_never_overwrites_a_newer_event(pool: Any, database: Any) -> None:
    user_id = "auth0|user00001"
    event_time = BASE_TIME + timedelta(minutes=10)
    await apply(
        pool,
        cloudevent("evt_created", "created", BASE_TIME, **export_row(user_id, BASE_TIME)),
        cloudevent("evt_renamed", "updated", event_time, user_id, name="Renamed live"),
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
async def test_a_snapshot_newer_than_the_stored_state_replaces_it(pool: Any, database: Any) -> None:
    user_id = "auth0|user00002"
    await apply(pool, cloudevent("evt_created", "created", BASE_TIME, **export_row(user_id, BASE_TIME)))
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
    await apply(pool, cloudevent("evt_same_time", "updated", later, user_id, email="event@example.com"))
    assert database.query("SELECT email FROM users WHERE user_id = %s", [user_id]) == [("event@example.com",)]


@pytest.mark.anyio
async def test_a_row_postgresql_refuses_is_dead_lettered_and_its_chunk_mates_land(
    pool: Any, database: Any
) -> None:
    rows = user_rows(5)
    rows[2]["name"] = "nul \u0000 inside"  # valid JSON, refused by jsonb
    lines = [json.dumps(row).encode() + b"\n" for row in rows]

    report = await load(pool, lines)

    assert (report.rows, report.inserted, report.rejected) == (5, 4, 1)
    assert database.query("SELECT user_id FROM users ORDER BY user_id") == [
        (row["user_id"],) for index, row in enumerate(rows) if index != 2
    ]
    [(route, body, error)] = database.query("SELECT route, body, error FROM dead_letters")
    assert (route, body) == ("backfill", lines[2].strip())
    assert error.startswith("PostgreSQL refused the row")


@pytest.mark.anyio
async def test_rows_that_are_not_auth0_users_are_dead_lettered(pool: Any, database: Any) -> None:
    bad = [
        b"{not json\n",
        json.dumps({"email": "no-user-id@example.com", "updated_at": iso(BASE_TIME)}).encode() + b"\n",
        json.dumps({"user_id": "auth0|unversioned", "email": "x@example.com"}).encode() + b"\n",
        json.dumps(export_row("auth0|typed", BASE_TIME, email_verified="yes")).encode() + b"\n",
        json.dumps(export_row("auth0|naive", BASE_TIME) | {"updated_at": "2025-01-01T00:00:00"}).encode()
        + b"\n",
    ]
    good = json.dumps(export_row("auth0|good", BASE_TIME)).encode() + b"\n"

    report = await load(pool, [*bad, b"\n", good])

    assert (report.rows, report.inserted, report.rejected) == (6, 1, 5)
    assert database.query("SELECT user_id FROM users") == [("auth0|good",)]
    letters = database.query("SELECT route, body, error FROM dead_letters ORDER BY id")
    assert [(route, body) for route, body, _ in letters] == [("backfill", line) for line in bad]
    assert "updated_at (or created_at)" in letters[2][2]


@pytest.mark.anyio
async def test_chunks_commit_one_by_one_and_the_newest_row_of_a_user_wins(pool: Any, database: Any) -> None:
    rows = user_rows(7)
    rows.append(export_row("auth0|user00003", BASE_TIME + timedelta(days=1), name="Newest"))
    rows.append(export_row("auth0|user00003", BASE_TIME + timedelta(hours=1), name="Older duplicate"))
    seen: list[int] = []

    report = await load(pool, rows, chunk_rows=3, progress=lambda progress: seen.append(progress.inserted))

    assert (report.rows, report.inserted + report.merged + report.stale) == (9, 8)
    assert seen[-1] == report.inserted and seen == sorted(seen) and len(seen) >= 3
    assert database.query("SELECT name FROM users WHERE user_id = %s", ["auth0|user00003"]) == [("Newest",)]
    assert database.query("SELECT count(*) FROM users") == [(7,)]


@pytest.mark.anyio
async def test_a_chunk_chosen_as_a_deadlock_victim_is_merged_again(pool: Any, database: Any) -> None:
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
        await wait_for_a_lock_wait(database)  # the chunk holds `first` and waits for `second`
        await other.execute("SELECT 1 FROM users WHERE user_id = %s FOR UPDATE", [first])  # the cycle
        await other.commit()
        report = await asyncio.wait_for(loading, 30)

    assert report.merged == 2
    assert database.query("SELECT name FROM users ORDER BY user_id") == [("First",), ("Second",)]


async def wait_for_a_lock_wait(database: Any, seconds: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        waiting = database.query(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
            ["%FROM backfill_rows%"],
        )
        if waiting[0][0] > 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the backfill chunk never waited for the row lock")


# Property: a backfill and live events, in any interleaving, converge to the version-ordered state.

FIELD_VALUES = {
    "email": st.sampled_from(["a@example.com", "b@example.org"]),
    "name": st.sampled_from(["Ann", "Bo", "Zoë"]),
    "nickname": st.sampled_from(["ann", "bo"]),
    "app_metadata": st.sampled_from([{}, {"plan": "pro"}]),
    "custom_field": st.sampled_from(["x", "y"]),
}


@dataclass(frozen=True)
class LiveSpec:
    kind: str  # created | updated | deleted
    user: int
    millis: int
    fields: dict[str, Any]
    snapshot: bool


@dataclass(frozen=True)
class RowSpec:
    user: int
    millis: int
    fields: dict[str, Any]


@st.composite
def live_specs(draw: st.DrawFn) -> LiveSpec:
    kind = draw(st.sampled_from(["created", "updated", "updated", "deleted"]))
    user = draw(st.integers(0, 2))
    millis = draw(st.integers(0, 8))
    chosen = draw(st.lists(st.sampled_from(sorted(FIELD_VALUES)), unique=True))
    fields = {name: draw(FIELD_VALUES[name]) for name in chosen}
    snapshot = kind != "deleted" and draw(st.booleans())
    if snapshot:
        fields |= {
            "identities": [{"provider": "auth0", "connection": "db", "user_id": str(user)}],
            "created_at": iso(BASE_TIME),
            "updated_at": iso(BASE_TIME + timedelta(milliseconds=millis)),
        }
    return LiveSpec(kind, user, millis, fields, snapshot)


@st.composite
def row_specs(draw: st.DrawFn) -> RowSpec:
    chosen = draw(st.lists(st.sampled_from(sorted(FIELD_VALUES)), unique=True))
    return RowSpec(
        draw(st.integers(0, 2)), draw(st.integers(0, 8)), {name: draw(FIELD_VALUES[name]) for name in chosen}
    )


@dataclass(frozen=True)
class Scenario:
    live: list[LiveSpec]
    rows: list[RowSpec]
    operations: list[tuple[str, list[int]]]  # ("events", indexes) or ("export", indexes), in order
    lanes: int
    chunk_rows: int


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    live = draw(st.lists(live_specs(), max_size=10))
    # One snapshot per user and instant: two different rows at the same version would have no defined winner.
    rows = draw(st.lists(row_specs(), min_size=1, max_size=6, unique_by=lambda row: (row.user, row.millis)))
    operations: list[tuple[str, list[int]]] = []
    for kind, count in (("events", len(live)), ("export", len(rows))):
        indexes = draw(st.permutations(range(count)))
        while indexes:
            size = draw(st.integers(1, len(indexes)))
            operations.append((kind, list(indexes[:size])))
            indexes = indexes[size:]
    # Deliveries repeat: live events arrive twice, and an export is loaded again.
    operations += draw(st.lists(st.sampled_from(operations), max_size=2)) if operations else []
    ordered = draw(st.permutations(operations))
    return Scenario(live, rows, list(ordered), draw(st.integers(1, 2)), draw(st.integers(1, 3)))


def user_id_of(prefix: str, user: int) -> str:
    return f"auth0|{prefix}-{user}"


def live_event(spec: LiveSpec, number: int, prefix: str) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        # Random ids, so that events at the same instant are ordered in no particular pattern.
        "id": f"evt_{prefix}{secrets.token_hex(3)}{number:03d}",
        "type": f"user.{spec.kind}",
        "time": iso(BASE_TIME + timedelta(milliseconds=spec.millis)),
        "data": {"object": {"user_id": user_id_of(prefix, spec.user), **spec.fields}},
    }


def snapshot_row(spec: RowSpec, prefix: str) -> dict[str, Any]:
    return {
        "user_id": user_id_of(prefix, spec.user),
        "identities": [{"provider": "auth0", "connection": "db", "user_id": str(spec.user)}],
        "created_at": iso(BASE_TIME),
        "updated_at": iso(BASE_TIME + timedelta(milliseconds=spec.millis)),
        **spec.fields,
    }


def expected_copy(events: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Everything once, in version order, applied as the promise reads: an export row is a `user.updated`
    full snapshot whose version is (updated_at, "backfill")."""
    versioned = [((event["time"], event["id"]), "event", event) for event in events]
    versioned += [((row["updated_at"], "backfill"), "row", row) for row in rows]
    expected: dict[str, dict[str, Any]] = {}
    for version, source, item in sorted(versioned, key=lambda entry: entry[0]):
        user_object = item["data"]["object"] if source == "event" else item
        user = expected.setdefault(user_object["user_id"], {"profile": {}, "deleted_at": None})
        kind = item["type"] if source == "event" else "user.updated"
        is_snapshot = source == "row" or all(
            name in user_object for name in ("user_id", "created_at", "updated_at", "identities")
        )
        if kind == "user.deleted":
            user["deleted_at"] = item["time"]
            user["profile"] = {**user["profile"], **user_object}
        else:
            if kind == "user.created":
                user["deleted_at"] = None
            user["profile"] = dict(user_object) if is_snapshot else {**user["profile"], **user_object}
        user["last"] = version
    return expected


def parse_time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


@pytest.mark.anyio
@settings(
    max_examples=DB_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios())
async def test_backfill_and_live_events_converge_in_any_interleaving(
    pool: Any, database: Any, scenario: Scenario
) -> None:
    prefix = secrets.token_hex(4)  # fresh users and event ids for every example in the shared schema
    events = [live_event(spec, number, prefix) for number, spec in enumerate(scenario.live)]
    rows = [snapshot_row(spec, prefix) for spec in scenario.rows]

    async def run(operations: list[tuple[str, list[int]]]) -> None:
        for kind, indexes in operations:
            if kind == "events":
                batch = [decode_event(json.dumps(events[index]).encode()) for index in indexes]
                await apply_isolating(pool, batch, "soft")
            else:
                lines = [json.dumps(rows[index]).encode() + b"\n" for index in indexes]
                await load_export(pool, iter(lines), "soft", chunk_rows=scenario.chunk_rows)

    lanes = [scenario.operations[lane :: scenario.lanes] for lane in range(scenario.lanes)]
    await asyncio.gather(*(run(lane) for lane in lanes))

    expected = expected_copy(events, rows)
    stored = database.query(
        "SELECT user_id, profile, deleted_at, last_event_processed, last_event_id, email FROM users "
        "WHERE user_id LIKE %s",
        [f"auth0|{prefix}-%"],
    )
    assert {row[0] for row in stored} == set(expected)
    for user_id, profile, deleted_at, last_time, last_id, email in stored:
        want = expected[user_id]
        assert profile == want["profile"], user_id
        assert deleted_at == parse_time(want["deleted_at"]), user_id
        assert (last_time, last_id) == (parse_time(want["last"][0]), want["last"][1]), user_id
        assert email == want["profile"].get("email")
