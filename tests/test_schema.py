"""The PostgreSQL side of the contract: `relay migrate` as operators run it, and the tables, types, trigger,
view and indexes that readers of the copy rely on (DESIGN.md, "PostgreSQL")."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from relay.migrations import available_migrations
from tests.support import REPO
from tests.support.database import Database
from tests.support.http import relay_environment

RELAY_TABLES = ("users", "processed_events", "dead_letters", "schema_migrations", "live_users")

TIMESTAMPTZ = "timestamp with time zone"


@dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: str
    stderr: str


def start_migrate(env: Mapping[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "relay.cli", "migrate"],
        env=dict(env),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str], timeout: float = 60) -> Finished:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        raise AssertionError(f"relay migrate did not finish in {timeout} s:\n{stdout}\n{stderr}") from None
    return Finished(process.returncode, stdout, stderr)


def run_migrate(env: Mapping[str, str]) -> Finished:
    return finish(start_migrate(env))


def tables_in(conninfo: str, schema: str) -> set[str]:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", [schema]
        ).fetchall()
    return {row[0] for row in rows}


def applied_versions(conninfo: str, schema: str) -> list[tuple[int, str]]:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        rows = conn.execute(
            sql.SQL("SELECT version, name FROM {}.schema_migrations ORDER BY version").format(
                sql.Identifier(schema)
            )
        ).fetchall()
    return [(row[0], row[1]) for row in rows]


def expected_migration_lines() -> list[str]:
    return [f"applied {migration.version:04d}_{migration.name}" for migration in available_migrations()]


def expected_versions() -> list[tuple[int, str]]:
    return [(migration.version, migration.name) for migration in available_migrations()]


@pytest.fixture
def fresh_schema(database_server: str) -> Iterator[str]:
    """The name of a schema that does not exist yet; dropped afterwards if a test created it."""
    schema = "relay_" + secrets.token_hex(6)
    yield schema
    with psycopg.connect(database_server, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def test_migrate_applies_0001_once_then_nothing(database_server, fresh_schema):
    env = relay_environment(database_server, fresh_schema)

    first = run_migrate(env)
    assert first.returncode == 0, first.stderr
    assert expected_migration_lines()[0] == "applied 0001_users"
    assert first.stdout.splitlines() == [
        *expected_migration_lines(),
        f"schema {fresh_schema!r} is up to date",
    ]
    assert applied_versions(database_server, fresh_schema) == expected_versions()

    second = run_migrate(env)
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines() == [f"schema {fresh_schema!r} is up to date"]
    assert applied_versions(database_server, fresh_schema)[0] == (1, "users")
    assert applied_versions(database_server, fresh_schema) == expected_versions()


def wait_until_all_wait_on_a_lock(
    conninfo: str, application_name: str, processes: list[subprocess.Popen[str]], seconds: float = 30
) -> None:
    deadline = time.monotonic() + seconds
    with psycopg.connect(conninfo, autocommit=True) as observer:
        while time.monotonic() < deadline and all(process.poll() is None for process in processes):
            row = observer.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE application_name = %s AND wait_event_type = 'Lock'",
                [application_name],
            ).fetchone()
            if row == (len(processes),):
                return
            time.sleep(0.02)


def test_concurrent_migrators_apply_each_migration_exactly_once(database_server, fresh_schema):
    """Left to process start-up timing the migrators rarely overlap, so an uncommitted CREATE SCHEMA of
    the same name holds all four at their first step; rolling it back releases them together."""
    application_name = f"migrator_{fresh_schema}"
    migrator_conninfo = make_conninfo(database_server, application_name=application_name)
    env = relay_environment(migrator_conninfo, fresh_schema)

    processes: list[subprocess.Popen[str]] = []
    try:
        with psycopg.connect(database_server) as gate:
            gate.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(fresh_schema)))
            processes = [start_migrate(env) for _ in range(4)]
            wait_until_all_wait_on_a_lock(database_server, application_name, processes)
            gate.rollback()
        results = [finish(process) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()

    assert [result.returncode for result in results] == [0] * 4, [result.stderr for result in results]
    assert [result.stderr for result in results] == [""] * 4
    applied_lines = [
        line for result in results for line in result.stdout.splitlines() if line.startswith("applied ")
    ]
    assert applied_lines == expected_migration_lines()
    assert applied_versions(database_server, fresh_schema) == expected_versions()


def test_schema_name_is_configurable_and_nothing_lands_in_public(database_server, fresh_schema):
    before_public = tables_in(database_server, "public")
    before_default = tables_in(database_server, "auth0")

    result = run_migrate(relay_environment(database_server, fresh_schema))

    assert result.returncode == 0, result.stderr
    assert set(RELAY_TABLES) <= tables_in(database_server, fresh_schema)
    assert tables_in(database_server, "public") == before_public
    assert tables_in(database_server, "auth0") == before_default


def test_malformed_schema_name_is_one_line_naming_the_variable(database_server):
    result = run_migrate(relay_environment(database_server, "Bad-Name"))

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "RELAY_DB_SCHEMA" in lines[0]
    assert "Bad-Name" in lines[0]
    with psycopg.connect(database_server, autocommit=True) as conn:
        found = conn.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname IN ('Bad-Name', 'bad-name')"
        ).fetchone()
    assert found == (0,)


def test_unreachable_database_is_a_short_clear_error_without_traceback():
    password = "not-to-be-printed-7f3a"
    env = relay_environment(f"postgresql://postgres:{password}@127.0.0.1:1/x", "relay_unreachable")

    result = run_migrate(env)

    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 3, result.stderr
    assert lines[0].startswith("relay:"), result.stderr
    assert "127.0.0.1" in result.stderr
    assert password not in result.stderr + result.stdout


def column_types(database: Database, table: str) -> dict[str, str]:
    rows = database.query(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = %s AND table_name = %s",
        [database.schema, table],
    )
    return {name: data_type for name, data_type in rows}


def primary_key(database: Database, table: str) -> list[str]:
    rows = database.query(
        "SELECT kcu.column_name FROM information_schema.table_constraints tc "
        "JOIN information_schema.key_column_usage kcu USING (constraint_schema, constraint_name) "
        "WHERE tc.constraint_type = 'PRIMARY KEY' AND tc.table_schema = %s AND tc.table_name = %s "
        "ORDER BY kcu.ordinal_position",
        [database.schema, table],
    )
    return [row[0] for row in rows]


def test_users_has_every_typed_column_of_the_contract(database):
    expected = {
        "user_id": "text",
        "email": "text",
        "email_verified": "boolean",
        "name": "text",
        "given_name": "text",
        "family_name": "text",
        "nickname": "text",
        "picture": "text",
        "username": "text",
        "phone_number": "text",
        "blocked": "boolean",
        "created_at": TIMESTAMPTZ,
        "updated_at": TIMESTAMPTZ,
        "last_login": TIMESTAMPTZ,
        "logins_count": "bigint",
        "identities": "jsonb",
        "app_metadata": "jsonb",
        "user_metadata": "jsonb",
        "profile": "jsonb",
        "last_event_processed": TIMESTAMPTZ,
        "last_event_id": "text",
        "deleted_at": TIMESTAMPTZ,
    }
    actual = column_types(database, "users")
    assert {name: actual.get(name) for name in expected} == expected
    assert primary_key(database, "users") == ["user_id"]


def test_processed_events_and_dead_letters_have_the_contract_columns(database):
    processed = column_types(database, "processed_events")
    assert {name: processed.get(name) for name in ("event_id", "event_type", "user_id", "outcome")} == {
        "event_id": "text",
        "event_type": "text",
        "user_id": "text",
        "outcome": "text",
    }
    assert processed.get("event_time") == TIMESTAMPTZ
    assert processed.get("received_at") == TIMESTAMPTZ
    assert primary_key(database, "processed_events") == ["event_id"]

    dead = column_types(database, "dead_letters")
    assert {name: dead.get(name) for name in ("body", "headers", "error", "received_at", "resolved_at")} == {
        "body": "bytea",
        "headers": "jsonb",
        "error": "text",
        "received_at": TIMESTAMPTZ,
        "resolved_at": TIMESTAMPTZ,
    }


def test_live_users_view_excludes_tombstones(database):
    database.query(
        "INSERT INTO users (user_id, profile) VALUES (%s, %s), (%s, %s)",
        [
            "auth0|alive",
            json.dumps({"user_id": "auth0|alive", "email": "alive@example.com"}),
            "auth0|gone",
            json.dumps({"user_id": "auth0|gone", "email": "gone@example.com"}),
        ],
    )
    database.query("UPDATE users SET deleted_at = now() WHERE user_id = 'auth0|gone'")

    assert database.query(
        "SELECT table_name FROM information_schema.views WHERE table_schema = %s ORDER BY 1",
        [database.schema],
    ) == [("live_users",), ("user_history",)]
    assert database.query("SELECT user_id, email FROM live_users ORDER BY user_id") == [
        ("auth0|alive", "alive@example.com")
    ]
    assert database.query("SELECT count(*) FROM users") == [(2,)]


FULL_PROFILE: dict[str, Any] = {
    "user_id": "google-oauth2|1057",
    "email": "Ada@Example.com",
    "email_verified": True,
    "name": "Ada Lovelace",
    "given_name": "Ada",
    "family_name": "Lovelace",
    "nickname": "ada",
    "picture": "https://example.com/ada.png",
    "username": "ada_l",
    "phone_number": "+15555550100",
    "blocked": False,
    "created_at": "2025-02-02T17:56:01.566Z",
    "updated_at": "2025-03-04T08:00:00.000Z",
    "last_login": "2025-03-04T07:59:00.000Z",
    "logins_count": 42,
    "identities": [{"provider": "google-oauth2", "connection": "google-oauth2", "isSocial": True}],
    "app_metadata": {"plan": "pro"},
    "user_metadata": {"theme": "dark"},
    "an_unknown_field": {"kept": True},
}

TYPED_COLUMNS = (
    "email, email_verified, name, given_name, family_name, nickname, picture, username, phone_number, "
    "blocked, created_at, updated_at, last_login, logins_count, identities, app_metadata, user_metadata"
)


def test_trigger_derives_typed_columns_from_profile_on_insert(database):
    database.query(
        "INSERT INTO users (user_id, profile) VALUES (%s, %s)",
        [FULL_PROFILE["user_id"], json.dumps(FULL_PROFILE)],
    )

    [row] = database.query(f"SELECT {TYPED_COLUMNS} FROM users")
    assert row == (
        "Ada@Example.com",
        True,
        "Ada Lovelace",
        "Ada",
        "Lovelace",
        "ada",
        "https://example.com/ada.png",
        "ada_l",
        "+15555550100",
        False,
        datetime(2025, 2, 2, 17, 56, 1, 566000, tzinfo=UTC),
        datetime(2025, 3, 4, 8, 0, tzinfo=UTC),
        datetime(2025, 3, 4, 7, 59, tzinfo=UTC),
        42,
        FULL_PROFILE["identities"],
        {"plan": "pro"},
        {"theme": "dark"},
    )
    assert database.query("SELECT profile -> 'an_unknown_field' FROM users") == [({"kept": True},)]


def test_trigger_rederives_typed_columns_when_profile_is_updated(database):
    database.query(
        "INSERT INTO users (user_id, profile) VALUES (%s, %s)",
        [FULL_PROFILE["user_id"], json.dumps(FULL_PROFILE)],
    )
    changed = {
        key: value
        for key, value in FULL_PROFILE.items()
        if key not in ("phone_number", "last_login", "user_metadata")
    }
    changed |= {
        "email": "ada@new.example.com",
        "email_verified": False,
        "blocked": True,
        "logins_count": 43,
        "app_metadata": {"plan": "enterprise"},
        "identities": [{"provider": "auth0", "connection": "Username-Password-Authentication"}],
    }

    database.query(
        "UPDATE users SET profile = %s WHERE user_id = %s", [json.dumps(changed), changed["user_id"]]
    )

    assert database.query(
        "SELECT email, email_verified, blocked, logins_count, app_metadata, identities, "
        "phone_number, last_login, user_metadata, name FROM users"
    ) == [
        (
            "ada@new.example.com",
            False,
            True,
            43,
            {"plan": "enterprise"},
            [{"provider": "auth0", "connection": "Username-Password-Authentication"}],
            None,
            None,
            None,
            "Ada Lovelace",
        )
    ]


def plan_of(database: Database, query: str) -> str:
    """EXPLAIN output with sequential scans priced out, so any usable index is chosen."""
    with psycopg.connect(
        database.conninfo, autocommit=True, options=f"-c search_path={database.schema} -c enable_seqscan=off"
    ) as conn:
        return "\n".join(row[0] for row in conn.execute(f"EXPLAIN {query}").fetchall())


def user_ids(database: Database, query: str) -> list[str]:
    return [row[0] for row in database.query(query.replace("SELECT *", "SELECT user_id") + " ORDER BY 1")]


@pytest.fixture
def directory(database: Database) -> Database:
    """A few users with differing emails, metadata and identities, analysed so the planner knows them."""
    people = [
        ("auth0|1", "Ada@Example.com", {"plan": "pro"}, {"theme": "dark"}, "auth0", "Username-Password"),
        ("google-oauth2|2", "grace@example.com", {"plan": "free"}, {"theme": "light"}, "google-oauth2", "g"),
        ("samlp|3", "linus@example.com", {"plan": "pro", "seats": 5}, {}, "samlp", "corp-sso"),
    ]
    people += [
        (f"auth0|bulk{i}", f"user{i}@example.com", {"plan": "free"}, {}, "auth0", "Username-Password")
        for i in range(200)
    ]
    profiles = [
        {
            "user_id": user_id,
            "email": email,
            "app_metadata": app_metadata,
            "user_metadata": user_metadata,
            "identities": [{"provider": provider, "connection": connection, "user_id": user_id}],
        }
        for user_id, email, app_metadata, user_metadata, provider, connection in people
    ]
    database.query(
        "INSERT INTO users (user_id, profile) "
        "SELECT profile ->> 'user_id', profile FROM jsonb_array_elements(%s::jsonb) AS profile",
        [json.dumps(profiles)],
    )
    database.query("ANALYZE users")
    return database


@pytest.mark.parametrize(
    ("where", "index", "expected_ids"),
    [
        ("lower(email) = lower('ADA@example.COM')", "users_email_lower_idx", ["auth0|1"]),
        ("""app_metadata @> '{"plan":"pro"}'""", "users_app_metadata_idx", ["auth0|1", "samlp|3"]),
        ("""user_metadata @> '{"theme":"light"}'""", "users_user_metadata_idx", ["google-oauth2|2"]),
        ("""identities @> '[{"provider":"google-oauth2"}]'""", "users_identities_idx", ["google-oauth2|2"]),
        ("""identities @> '[{"connection":"corp-sso"}]'""", "users_identities_idx", ["samlp|3"]),
    ],
)
def test_lookups_are_served_by_an_index_not_a_table_scan(directory, where, index, expected_ids):
    query = f"SELECT * FROM users WHERE {where}"

    plan = plan_of(directory, query)

    assert index in plan, plan
    assert "Seq Scan" not in plan, plan
    assert user_ids(directory, query) == expected_ids
