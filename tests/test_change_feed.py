"""The change feed: after each commit, the users it wrote are announced on `<schema>_users_changed`, in
notices under PostgreSQL's payload limit; and the tables stream through a logical replication publication.
A real listening connection on real PostgreSQL; the relay as a process where HTTP matters."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql

from relay.embedded import start_embedded
from relay.events import decode_body
from relay.migrations import migrate
from relay.pipeline import Delivery, Pipeline
from relay.settings import ConfigError, Settings
from relay.store import Pool, create_pool
from tests.support import REPO
from tests.support.database import Database, outcomes_recorded
from tests.support.events import BASE_TIME, encode, export_row, iso, ndjson, user_event
from tests.support.http import deliver, outcomes, relay_command, relay_environment

PAYLOAD_LIMIT = 8000  # bytes: PostgreSQL refuses a NOTIFY payload this long or longer


class Listener:
    """A session LISTENing on a schema's change feed, as an application would."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def notices(self, wait: float = 1.0) -> list[str]:
        """The payloads received so far, waiting up to `wait` seconds for each next one."""
        return [notice.payload for notice in self.conn.notifies(timeout=wait)]


@contextlib.contextmanager
def listening(database: Database) -> Iterator[Listener]:
    with psycopg.connect(database.conninfo, autocommit=True) as conn:
        channel = database.settings.change_feed_channel
        assert channel == f"{database.schema}_users_changed"
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        yield Listener(conn)


def changes(payloads: list[str]) -> list[list[tuple[str, str]]]:
    return [[(change["user_id"], change["outcome"]) for change in json.loads(p)] for p in payloads]


def created(user_id: str, event_id: str, at: int = 0) -> dict[str, Any]:
    return user_event("created", event_id, at, **export_row(user_id, BASE_TIME))


async def apply(pipeline: Pipeline, *events: dict[str, Any]) -> list[str]:
    results = await pipeline.commit([Delivery("webhook", decode_body(encode(event))) for event in events])
    return [result.outcome.value for answers in results for result in answers]


def test_a_listener_receives_each_commits_changes_once(
    client: httpx.Client, clean_database: Database
) -> None:
    with listening(clean_database) as listener:
        first = [created("auth0|a", "evt_a"), created("auth0|b", "evt_b")]
        assert outcomes(deliver(client, "webhook", encode(first))) == ["applied", "applied"]
        assert changes(listener.notices()) == [[("auth0|a", "applied"), ("auth0|b", "applied")]]

        second = [
            user_event("updated", "evt_a2", 5, "auth0|a", name="Renamed"),
            user_event("deleted", "evt_b2", 6, "auth0|b"),
        ]
        assert outcomes(deliver(client, "webhook", encode(second))) == ["applied", "tombstoned"]
        assert changes(listener.notices()) == [[("auth0|a", "applied"), ("auth0|b", "tombstoned")]]

        # Nothing written, nothing announced: a duplicate, a test event.
        test_event = created("auth0|c", "evt_test") | {"a0purpose": "test"}
        assert outcomes(deliver(client, "webhook", encode([first[0], test_event]))) == ["duplicate", "test"]
        assert listener.notices(wait=0.5) == []


@pytest.mark.anyio
async def test_a_large_commit_is_split_into_notices_under_the_payload_limit(
    pipeline: Pipeline, database: Database
) -> None:
    # User ids as long as the relay takes (512 characters), some with characters JSON escapes at six bytes.
    user_ids = [f"auth0|{number:04d}" + ("\u0001" if number % 2 else "é") * 500 for number in range(60)]
    with listening(database) as listener:
        assert set(await apply(pipeline, *(created(u, f"evt_{n}") for n, u in enumerate(user_ids)))) == {
            "applied"
        }
        payloads = listener.notices()
    assert len(payloads) > 1
    assert max(len(payload.encode()) for payload in payloads) < PAYLOAD_LIMIT
    announced = [change for notice in changes(payloads) for change in notice]
    assert announced == [(user_id, "applied") for user_id in sorted(user_ids)]


@pytest.mark.anyio
async def test_a_write_rolled_back_announces_nothing(pipeline: Pipeline, database: Database) -> None:
    # PostgreSQL refuses the second event, so the batch's first write rolls back and it is committed in
    # halves: the good user is announced once, by the commit that kept it.
    refused = user_event("created", "evt_bad", 1, "auth0|bad", name="nul \u0000")
    with listening(database) as listener:
        assert await apply(pipeline, created("auth0|good", "evt_good"), refused) == [
            "applied",
            "dead_lettered",
        ]
        assert changes(listener.notices()) == [[("auth0|good", "applied")]]


@pytest.mark.anyio
async def test_events_that_change_nothing_leave_the_row_unwritten_and_unannounced(
    pipeline: Pipeline, database: Database
) -> None:
    newer = user_event("updated", "evt_new", 10, "auth0|a", name="New")
    assert await apply(pipeline, created("auth0|a", "evt_a"), newer) == ["applied", "applied"]
    [(row_version,)] = database.query("SELECT xmin::text FROM users WHERE user_id = 'auth0|a'")

    older = user_event("updated", "evt_old", 5, "auth0|a", name="Old")
    with listening(database) as listener:
        assert await apply(pipeline, older) == ["stale"]
        assert listener.notices(wait=0.5) == []
    # Recorded in the ledger, and the row as it was: not even rewritten with the same values.
    assert outcomes_recorded(database)["evt_old"] == "stale"
    assert database.query("SELECT xmin::text, name FROM users WHERE user_id = 'auth0|a'") == [
        (row_version, "New")
    ]


@pytest.mark.anyio
async def test_with_the_change_feed_off_nothing_is_announced(pool: Pool, database: Database) -> None:
    quiet = Pipeline(pool, database.with_settings(change_feed=False))
    with listening(database) as listener:
        assert await apply(quiet, created("auth0|a", "evt_a")) == ["applied"]
        assert listener.notices(wait=0.5) == []


def test_backfill_and_reconcile_announce_the_users_they_write(
    client: httpx.Client, clean_database: Database, tmp_path: Path
) -> None:
    known = user_event("created", "evt_known", BASE_TIME, **export_row("auth0|known", BASE_TIME))
    live = [known, created("auth0|gone", "evt_gone")]
    assert outcomes(deliver(client, "webhook", encode(live))) == ["applied", "applied"]
    newer = export_row("auth0|known", BASE_TIME + timedelta(hours=1), name="Newer")
    export = tmp_path / "export.json"
    export.write_bytes(ndjson([export_row("auth0|new", BASE_TIME), newer]))
    exported_at = iso(BASE_TIME + timedelta(days=1))
    with listening(clean_database) as listener:
        done = relay_command(
            clean_database,
            "backfill",
            "--file",
            str(export),
            "--reconcile-deletes",
            "--exported-at",
            exported_at,
        )
        assert done.returncode == 0, done.stderr
        announced = [change for notice in changes(listener.notices()) for change in notice]
    assert Counter(announced) == {
        ("auth0|new", "applied"): 1,
        ("auth0|known", "applied"): 1,
        ("auth0|gone", "tombstoned"): 1,
    }


def test_the_listen_example_prints_each_change(client: httpx.Client, clean_database: Database) -> None:
    env = relay_environment(clean_database.conninfo, clean_database.schema)
    example = subprocess.Popen(
        [sys.executable, str(REPO / "docs" / "examples" / "listen.py")],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put(line.strip()) for line in example.stdout or ()], daemon=True
    ).start()

    def next_line() -> str:
        try:
            return lines.get(timeout=10)
        except queue.Empty:
            raise AssertionError("the example printed nothing more within 10 s") from None

    try:
        assert next_line() == f"listening on {clean_database.schema}_users_changed"
        first = [created("auth0|a", "evt_a"), created("auth0|b", "evt_b")]
        assert outcomes(deliver(client, "webhook", encode(first))) == ["applied", "applied"]
        deleted = user_event("deleted", "evt_a2", 5, "auth0|a")
        assert outcomes(deliver(client, "webhook", encode(deleted))) == ["tombstoned"]
        assert [next_line() for _ in range(3)] == ["applied auth0|a", "applied auth0|b", "tombstoned auth0|a"]
    finally:
        example.terminate()
        example.wait(timeout=10)


def test_a_schema_too_long_for_the_channel_is_refused_with_the_change_feed_on() -> None:
    schema = "s" * 50
    with pytest.raises(ConfigError, match="RELAY_DB_SCHEMA: at most 49 characters"):
        Settings.from_env({"RELAY_DB_SCHEMA": schema})
    assert (
        Settings.from_env({"RELAY_DB_SCHEMA": schema, "RELAY_CHANGE_FEED": "off"}).change_feed_channel is None
    )


@pytest.fixture(scope="module")
def logical_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An embedded PostgreSQL restarted with wal_level=logical, which logical replication needs."""
    data_dir = tmp_path_factory.mktemp("logical")
    server = start_embedded(data_dir, stop_at_exit=False)
    with psycopg.connect(server.conninfo, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET wal_level = logical")
    server.stop()
    server.handle.start()  # the same data directory, now with wal_level=logical
    try:
        with psycopg.connect(server.conninfo) as conn:
            row = conn.execute("SHOW wal_level").fetchone()
        if row is None or row[0] != "logical":
            pytest.skip(f"the embedded PostgreSQL did not restart with wal_level=logical (it has {row})")
        yield server.conninfo
    finally:
        server.stop()


def test_the_tables_stream_through_a_publication(logical_server: str) -> None:
    schema = "publication_" + os.urandom(4).hex()
    asyncio.run(migrate(logical_server, schema))
    database = Database(logical_server, schema)
    publication, slot = f"{schema}_users_copy", f"{schema}_slot"
    # The README's statement, on this schema.
    readme = (REPO / "README.md").read_text()
    [statement] = [line for line in readme.splitlines() if line.startswith("CREATE PUBLICATION")]
    database.query(statement.rstrip(";").replace("auth0", schema))
    database.query("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [slot])
    try:
        asyncio.run(write_one_user(database, "auth0|streamed"))
        # pgoutput's messages name each relation and carry the rows written: the new user's id is in them.
        rows = database.query(
            "SELECT data FROM pg_logical_slot_get_binary_changes(%s, NULL, NULL, 'proto_version', '1',"
            " 'publication_names', %s)",
            [slot, publication],
        )
        streamed = b"".join(bytes(row[0]) for row in rows)
        assert b"auth0|streamed" in streamed
        assert b"users" in streamed and b"processed_events" in streamed
    finally:
        database.query("SELECT pg_drop_replication_slot(%s)", [slot])
        database.query(f'DROP PUBLICATION "{publication}"')
        database.query(f'DROP SCHEMA "{schema}" CASCADE')


async def write_one_user(database: Database, user_id: str) -> None:
    pool = create_pool(database.conninfo, database.settings)
    await pool.open(wait=True)
    try:
        assert await apply(Pipeline(pool, database.settings), created(user_id, "evt_one")) == ["applied"]
    finally:
        await pool.close()
