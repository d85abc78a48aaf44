"""`relay backfill --reconcile-deletes`: users a complete export does not list, and that nothing has changed
since the export started, become tombstones versioned at the export's start. Run as an operator runs it (a
`relay` process, or the Management API played by respx), on real PostgreSQL, with live events through the
real pipeline."""

from __future__ import annotations

import asyncio
import gzip
import random
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.auth0.export import load_and_reconcile
from relay.cli import main
from relay.events import decode_body, to_micros
from relay.pipeline import Delivery, Pipeline
from tests.support.auth0 import MANAGEMENT_API, management_api
from tests.support.database import Database
from tests.support.events import BASE_TIME, encode, export_row, iso, ndjson, user_event
from tests.support.http import relay_command
from tests.support.properties import THROUGH_POSTGRESQL

EXPORTED_AT = BASE_TIME + timedelta(days=10)
JOB_ID = "job_R3c0nc1l3Dq8"
DOWNLOAD_URL = "https://auth0-exports.example-bucket.s3.amazonaws.com/acme.json.gz?X-Amz-Signature=s"


async def apply(pipeline: Pipeline, *events: dict[str, Any]) -> list[str]:
    """Live events, committed together as one batch; their outcomes."""
    results = await pipeline.commit([Delivery("webhook", decode_body(encode(event))) for event in events])
    return [result.outcome.value for answers in results for result in answers]


def created(user_id: str, at: datetime, event_id: str | None = None, **fields: Any) -> dict[str, Any]:
    return user_event(
        "created", event_id or f"evt_c_{secrets.token_hex(6)}", at, **export_row(user_id, at) | fields
    )


def liveness(database: Database) -> dict[str, bool]:
    return dict(database.query("SELECT user_id, deleted_at IS NULL FROM users"))  # type: ignore[arg-type]


def write_export(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_bytes(gzip.compress(ndjson(rows)))
    return path


@pytest.fixture
async def copy_before_export(pipeline: Pipeline) -> dict[str, str]:
    """A copy holding users in every situation a reconcile meets; their ids by role."""
    before, after = EXPORTED_AT - timedelta(days=1), EXPORTED_AT + timedelta(minutes=5)
    users = {
        "listed": "auth0|listed",  # in the export
        "gone": "auth0|gone",  # deleted in Auth0 while the stream was down: absent, nothing newer
        "gone_too": "auth0|gone-too",
        "created_after": "auth0|created-after",  # created after the export started: absent, but new
        "updated_after": "auth0|updated-after",  # absent, but written after the export started
        "deleted": "auth0|deleted",  # a tombstone already
    }
    outcomes = await apply(
        pipeline,
        created(users["listed"], before),
        created(users["gone"], before, name="Gone User"),
        created(users["gone_too"], BASE_TIME),
        created(users["created_after"], after),
        created(users["updated_after"], before),
        user_event("updated", "evt_after", after, users["updated_after"], name="Changed since"),
        created(users["deleted"], BASE_TIME),
        user_event("deleted", "evt_deleted", before, users["deleted"]),
    )
    assert set(outcomes) == {"applied", "tombstoned"}
    return users


@pytest.mark.anyio
async def test_users_absent_from_a_complete_file_export_become_tombstones_versioned_at_its_start(
    pipeline: Pipeline, database: Database, copy_before_export: dict[str, str], tmp_path: Path
) -> None:
    users = copy_before_export
    path = write_export(tmp_path / "users.json.gz", [export_row(users["listed"], EXPORTED_AT)])
    deleted_before = database.query("SELECT * FROM users WHERE user_id = %s", [users["deleted"]])

    done = relay_command(
        database, "backfill", "--file", str(path), "--reconcile-deletes", "--exported-at", iso(EXPORTED_AT)
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "backfill done: 1 rows: 0 inserted, 1 merged, 0 stale, 0 rejected",
        "reconciled deletes: tombstoned 2 users absent from the export started at 2025-01-11T00:00:00Z",
    ]
    assert liveness(database) == {
        users["listed"]: True,
        users["gone"]: False,
        users["gone_too"]: False,
        users["created_after"]: True,  # never touched: created after the export started
        users["updated_after"]: True,  # never touched: changed after the export started
        users["deleted"]: False,
    }
    assert database.query(
        "SELECT deleted_at, last_event_processed, last_event_id, name, merge_state -> 'lifecycle'"
        "  FROM users WHERE user_id = %s",
        [users["gone"]],
    ) == [(EXPORTED_AT, EXPORTED_AT, "backfill", "Gone User", [to_micros(EXPORTED_AT), "backfill"])]
    # An earlier tombstone is left as it was, bookkeeping included.
    assert database.query("SELECT * FROM users WHERE user_id = %s", [users["deleted"]]) == deleted_before

    # A late event older than the export cannot bring the user back; a newer user.created can.
    late = user_event("updated", "evt_late", EXPORTED_AT - timedelta(hours=1), users["gone"], name="Late")
    assert await apply(pipeline, late) == ["stale"]
    assert liveness(database)[users["gone"]] is False
    assert await apply(pipeline, created(users["gone"], EXPORTED_AT + timedelta(hours=1))) == ["applied"]
    assert liveness(database)[users["gone"]] is True

    # The same export reconciled again tombstones nobody: the revived user changed after it started.
    again = relay_command(
        database, "backfill", "--file", str(path), "--reconcile-deletes", "--exported-at", iso(EXPORTED_AT)
    )
    assert again.returncode == 0, again.stderr
    assert "reconciled deletes: tombstoned 0 users" in again.stdout
    assert liveness(database)[users["gone"]] is True


@pytest.mark.anyio
async def test_an_event_at_the_exports_very_instant_wins_over_the_reconcile(
    pipeline: Pipeline, database: Database, tmp_path: Path
) -> None:
    """The reconcile's deletion is versioned (export start, "backfill"); a live event at the same microsecond
    sorts after it, so it counts as newer and is never touched."""
    assert await apply(pipeline, created("auth0|same-instant", EXPORTED_AT), created("auth0|x", BASE_TIME))
    path = write_export(tmp_path / "users.json.gz", [export_row("auth0|x", BASE_TIME)])

    done = await load_and_reconcile(database.conninfo, database.settings, path, EXPORTED_AT, dry_run=False)

    assert done.reconciled is not None and done.reconciled.tombstoned == []
    assert liveness(database) == {"auth0|same-instant": True, "auth0|x": True}


@pytest.mark.anyio
async def test_dry_run_lists_who_would_be_tombstoned_and_writes_nothing(
    database: Database, copy_before_export: dict[str, str], tmp_path: Path
) -> None:
    users = copy_before_export
    path = write_export(
        tmp_path / "users.json.gz",
        [export_row(users["listed"], EXPORTED_AT), export_row("auth0|not-yet-copied", EXPORTED_AT)],
    )
    before = database.query("SELECT *, xmin::text FROM users ORDER BY user_id")

    done = relay_command(
        database,
        "backfill",
        "--file",
        str(path),
        "--reconcile-deletes",
        "--exported-at",
        iso(EXPORTED_AT),
        "--dry-run",
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        users["gone"],
        users["gone_too"],
        "dry run: would tombstone 2 users absent from the export started at 2025-01-11T00:00:00Z; "
        "nothing written",
    ]
    assert database.query("SELECT *, xmin::text FROM users ORDER BY user_id") == before  # nor loaded


BROKEN_EXPORTS = {
    "a line that is not JSON": (
        ndjson([export_row("auth0|listed", EXPORTED_AT)]) + b'{"user_id": "auth0|cut-sh\n',
        "not reconciling deletes: row 2 names no user (not an Auth0 user: Input data was truncated), so the "
        "export cannot say who is absent",
    ),
    "a gzip stream cut short": (
        gzip.compress(ndjson([export_row(f"auth0|u{n}", EXPORTED_AT) for n in range(50)]))[:-30],
        "users.json.gz is cut short or corrupt (Compressed file ended before the end-of-stream marker was "
        "reached); download the export again",
    ),
    "no users at all": (
        b"\n",
        "not reconciling deletes: the export lists no users, and would tombstone everyone in the copy",
    ),
}


@pytest.mark.anyio
@pytest.mark.parametrize("case", sorted(BROKEN_EXPORTS))
async def test_an_export_that_is_not_complete_is_refused_and_tombstones_nobody(
    database: Database, copy_before_export: dict[str, str], tmp_path: Path, case: str
) -> None:
    content, error = BROKEN_EXPORTS[case]
    path = tmp_path / "users.json.gz"
    path.write_bytes(content)

    done = relay_command(
        database, "backfill", "--file", str(path), "--reconcile-deletes", "--exported-at", iso(EXPORTED_AT)
    )

    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == f"relay backfill: {error}"
    assert "reconciled" not in done.stdout
    assert database.query("SELECT count(*) FROM users WHERE deleted_at IS NOT NULL") == [(1,)]


def test_a_file_export_without_its_start_time_is_refused_before_anything_is_read(
    relay_env: Database, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_export(tmp_path / "users.json.gz", [export_row("auth0|listed", EXPORTED_AT)])

    with pytest.raises(SystemExit) as exited:
        main(["backfill", "--file", str(path), "--reconcile-deletes"])

    assert exited.value.code == 2
    assert "--reconcile-deletes with --file needs --exported-at TIME" in capsys.readouterr().err
    assert relay_env.query("SELECT count(*) FROM users") == [(0,)]


def test_dry_run_alone_is_refused(relay_env: Database, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["backfill", "--file", "users.json.gz", "--dry-run"])

    assert exited.value.code == 2
    assert "--exported-at and --dry-run go with --reconcile-deletes" in capsys.readouterr().err


def export_job(status: str, **fields: Any) -> httpx.Response:
    return httpx.Response(
        200, json={"id": JOB_ID, "type": "users_export", "status": status, "format": "json", **fields}
    )


def seed(database: Database, *events: dict[str, Any]) -> None:
    """Live events through the relay's pipeline, outside any running event loop."""

    async def run() -> None:
        from relay.store import open_pool

        async with open_pool(database.conninfo, database.settings) as pool:
            await apply(Pipeline(pool, database.settings), *events)

    asyncio.run(run())


def test_a_job_the_relay_starts_is_reconciled_as_of_the_jobs_creation_time(
    relay_env: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    created_at = EXPORTED_AT
    seed(
        relay_env,
        created("auth0|listed", BASE_TIME),
        created("auth0|gone", BASE_TIME),
        created("auth0|created-after", created_at + timedelta(seconds=1)),
    )
    body = gzip.compress(ndjson([export_row("auth0|listed", BASE_TIME)]))
    with management_api(assert_all_called=True) as auth0:
        auth0.post(f"{MANAGEMENT_API}/jobs/users-exports").mock(
            return_value=httpx.Response(201, json={"id": JOB_ID, "type": "users_export", "status": "pending"})
        )
        auth0.get(f"{MANAGEMENT_API}/jobs/{JOB_ID}").mock(
            return_value=export_job("completed", location=DOWNLOAD_URL, created_at=iso(created_at))
        )
        auth0.get(DOWNLOAD_URL).mock(return_value=httpx.Response(200, content=body))

        status = main(["backfill", "--reconcile-deletes", "--poll-interval", "0.01"])

    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert (
        "reconciled deletes: tombstoned 1 users absent from the export started at 2025-01-11T00:00:00Z"
        in (captured.out)
    )
    assert relay_env.query("SELECT user_id, deleted_at FROM users WHERE deleted_at IS NOT NULL") == [
        ("auth0|gone", created_at)
    ]


@pytest.mark.parametrize(
    ("job_fields", "error"),
    [
        (
            {"limit": 5},
            f"export job {JOB_ID} was created with a limit of 5 users, so it cannot say who is absent",
        ),
        ({"connection_id": "con_Db1"}, f"export job {JOB_ID} lists only connection con_Db1"),
    ],
    ids=["limit", "one connection"],
)
def test_a_job_that_cannot_list_everyone_is_refused_before_its_file_is_downloaded(
    relay_env: Database, capsys: pytest.CaptureFixture[str], job_fields: dict[str, Any], error: str
) -> None:
    seed(relay_env, created("auth0|someone", BASE_TIME))
    with management_api() as auth0:
        auth0.get(f"{MANAGEMENT_API}/jobs/{JOB_ID}").mock(
            return_value=export_job(
                "completed", location=DOWNLOAD_URL, created_at=iso(EXPORTED_AT), **job_fields
            )
        )
        download = auth0.get(DOWNLOAD_URL).mock(return_value=httpx.Response(200, content=b""))

        status = main(["backfill", "--job-id", JOB_ID, "--reconcile-deletes"])

    assert status == 1
    assert f"relay backfill: not reconciling deletes: {error}" in capsys.readouterr().err
    assert download.call_count == 0
    assert relay_env.query("SELECT count(*) FROM users WHERE deleted_at IS NULL") == [(1,)]


@pytest.mark.anyio
async def test_in_scrub_mode_a_reconciled_deletion_keeps_what_a_live_one_keeps(
    pipeline: Pipeline, database: Database, tmp_path: Path
) -> None:
    assert await apply(pipeline, created("auth0|gone", BASE_TIME), created("auth0|x", BASE_TIME))
    path = write_export(tmp_path / "users.json.gz", [export_row("auth0|x", BASE_TIME)])

    await load_and_reconcile(
        database.conninfo, database.with_settings(delete_mode="scrub"), path, EXPORTED_AT, dry_run=False
    )

    assert database.query("SELECT profile, email, identities FROM users WHERE user_id = 'auth0|gone'") == [
        (
            {
                "user_id": "auth0|gone",
                "created_at": iso(BASE_TIME),
                "updated_at": iso(BASE_TIME),
                "deleted_at": iso(EXPORTED_AT),
            },
            None,
            None,
        )
    ]


# ---------------------------------------------------------------------------------------------------------
# Property: live events interleaved with an export and its reconcile. Users deleted before the export whose
# deletion never arrived are tombstoned; nobody who exists is, whatever the order.

EXPORT_MS = 1000  # the export starts this many milliseconds after BASE_TIME


@dataclass(frozen=True)
class History:
    """One user's life in Auth0: created, maybe updated, maybe deleted (the deletion maybe lost, when it
    happened before the export), maybe created again (a social id coming back)."""

    created: int
    updated: int | None
    deleted: int | None
    deletion_lost: bool
    recreated: int | None
    update_arrives_late: bool  # an update from before the export delivered after everything else began

    def exists(self, at: int) -> bool:
        if self.deleted is None or self.deleted >= at:
            return self.created < at
        return self.recreated is not None and self.recreated < at


@st.composite
def histories(draw: st.DrawFn) -> History:
    created = draw(st.integers(0, 2 * EXPORT_MS))
    deleted = draw(st.none() | st.integers(created + 2, 2 * EXPORT_MS + 2))
    # Auth0 updates a user only while it exists.
    updated = draw(st.none() | st.integers(created + 1, (deleted or 2 * EXPORT_MS + 2) - 1))
    recreated = None if deleted is None else draw(st.none() | st.integers(deleted + 1, 2 * EXPORT_MS + 3))
    lost = deleted is not None and deleted < EXPORT_MS and draw(st.booleans())
    late = updated is not None and updated < EXPORT_MS and draw(st.booleans())
    return History(created, updated, deleted, lost, recreated, late)


RECONCILE = "reconcile"


@pytest.mark.anyio
@THROUGH_POSTGRESQL
@given(lives=st.lists(histories(), min_size=1, max_size=6), seed=st.integers(0, 2**32))
async def test_a_reconcile_interleaved_with_live_events_tombstones_exactly_the_users_gone_unseen(
    pipeline: Pipeline, database: Database, tmp_path: Path, lives: list[History], seed: int
) -> None:
    prefix = secrets.token_hex(4)
    ids = [f"auth0|{prefix}-{number}" for number in range(len(lives))]
    on_time: list[dict[str, Any]] = []  # before the export, delivered before it is taken
    anytime: list[dict[str, Any] | str] = [RECONCILE]  # after it, in any order with the reconcile
    rows = []
    for user_id, life in zip(ids, lives, strict=True):
        events = [(life.created, created(user_id, BASE_TIME + timedelta(milliseconds=life.created)))]
        if life.updated is not None:
            events.append(
                (life.updated, user_event("updated", f"evt_u{user_id}", life.updated, user_id, name="U"))
            )
        if life.deleted is not None and not life.deletion_lost:
            events.append((life.deleted, user_event("deleted", f"evt_d{user_id}", life.deleted, user_id)))
        if life.recreated is not None:
            events.append(
                (life.recreated, created(user_id, BASE_TIME + timedelta(milliseconds=life.recreated)))
            )
        for millis, event in events:
            late = life.update_arrives_late and millis == life.updated
            (on_time if millis < EXPORT_MS and not late else anytime).append(event)
        if life.exists(EXPORT_MS):
            newest = max(millis for millis, _ in events if millis < EXPORT_MS)
            rows.append(export_row(user_id, BASE_TIME + timedelta(milliseconds=newest)))
    if not rows:
        rows.append(export_row(f"auth0|{prefix}-someone-else", BASE_TIME))
    path = write_export(tmp_path / f"{prefix}.json.gz", rows)
    order = random.Random(seed)
    order.shuffle(on_time)
    order.shuffle(anytime)

    for event in on_time:
        await apply(pipeline, event)
    tombstoned: list[str] = []
    for step in anytime:
        if step == RECONCILE:
            exported_at = BASE_TIME + timedelta(milliseconds=EXPORT_MS)
            done = await load_and_reconcile(database.conninfo, database.settings, path, exported_at, False)
            assert done.reconciled is not None
            # Users of earlier examples share the schema and are absent from this export: tombstoned too.
            tombstoned = [user_id for user_id in done.reconciled.tombstoned if user_id in ids]
        else:
            assert isinstance(step, dict)
            await apply(pipeline, step)

    gone_by_then = {
        user_id
        for user_id, life in zip(ids, lives, strict=True)
        if life.created < EXPORT_MS and not life.exists(EXPORT_MS)
    }
    assert set(tombstoned) <= gone_by_then  # never one who existed when the export started, or came later
    stored = liveness(database)
    assert {user_id: stored[user_id] for user_id in ids} == {
        user_id: life.exists(3 * EXPORT_MS) for user_id, life in zip(ids, lives, strict=True)
    }
