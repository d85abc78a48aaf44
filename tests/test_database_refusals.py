"""Issue 10, item 11: PostgreSQL refusing the relay's writes for reasons that are not the event's data: a
read-only database, a role without the privilege to write, a schema half migrated. None of them is the
event's fault and each may pass, so every request is answered 503 with `Retry-After` (never 500, never 200
with nothing kept), nothing at all is committed, `relay_unavailable_total` counts it under its cause, and the
relay says so in exactly one JSON log line per request, with no profile data. Once the condition is undone,
the same event is applied when Auth0 retries it.

Real relay processes on real PostgreSQL, no mocked driver; roles made as docs/least-privilege.sql makes them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import psycopg
import pytest
from psycopg import sql

from tests.support.database import NOTHING_STORED, Database, assert_stored_as_sent, row_counts
from tests.support.events import encode, fixture
from tests.support.http import (
    RelayProcess,
    deliver,
    metric,
    outcomes,
    relay_command,
    relay_environment,
    running_relay,
)
from tests.support.roles import Roles, least_privilege_roles

pytestmark = pytest.mark.integration

# How long Auth0 goes on retrying a 5xx (three retries within about 7 s), with some slack.
AUTH0_RETRY_SECONDS = 10


def refused_requests() -> list[tuple[str, bytes, str]]:
    """(route, body, signed id): a user event on each route, a webhook array, and a body that can only be a
    dead letter, which must not be answered 200 either when the dead letter cannot be written."""
    created, updated = fixture("user.created"), fixture("user.updated")
    return [
        ("action", encode(created), created["id"]),
        ("webhook", encode(updated), updated["id"]),
        ("webhook", encode([created, updated, fixture("test-event")]), created["id"]),
        ("action", b'{"not": "an event", "email": "jane@example.com"}', created["id"]),
    ]


def profile_values() -> set[str]:
    """Every text value of the fixtures' profiles: none may reach a log line."""
    values = set()
    for name in ("user.created", "user.updated"):
        for value in fixture(name)["data"]["object"].values():
            if isinstance(value, str):
                values.add(value)
    return values | {"jane@example.com"}


def assert_each_answered_503_and_logged_once(
    relay: RelayProcess, client: httpx.Client, cause: str, reason: str
) -> None:
    for route, body, event_id in refused_requests():
        logged_before = len(relay.output())
        response = deliver(client, route, body, event_id)

        assert response.status_code == 503, response.text
        assert int(response.headers["retry-after"]) > 0
        assert response.json() == {"error": reason}
        logged = relay.output()[logged_before:].splitlines()
        # One line of the relay's own; the pool may also say, at INFO, that it replaced its connections.
        lines = [line for line in logged if json.loads(line)["logger"].split(".")[0] == "relay"]
        assert len(lines) == 1, logged
        assert all(json.loads(line)["level"] == "info" for line in logged if line not in lines), logged
        record = json.loads(lines[0])
        assert {key: record[key] for key in ("level", "message", "route", "status", "reason")} == {
            "level": "warning",
            "message": "answered 503",
            "route": route,
            "status": 503,
            "reason": cause,
        }
        for value in profile_values():
            assert value not in lines[0], value
    assert metric(client.get("/metrics").text, "relay_unavailable_total", cause=cause) == len(
        refused_requests()
    )


def retried_until_answered(client: httpx.Client, route: str, body: bytes, event_id: str) -> httpx.Response:
    """Posts `body` again and again, as Auth0 retries a 5xx, until it is answered otherwise or Auth0 would
    have given up."""
    deadline = time.monotonic() + AUTH0_RETRY_SECONDS
    while True:
        response = deliver(client, route, body, event_id)
        if response.status_code != 503 or time.monotonic() > deadline:
            return response
        time.sleep(0.5)


def assert_applied_on_retry(client: httpx.Client, database: Database) -> None:
    event = fixture("user.created")
    response = retried_until_answered(client, "action", encode(event), event["id"])
    assert outcomes(response) == ["applied"]
    assert_stored_as_sent(database, event)


def admin(conninfo: str, statement: sql.Composable) -> None:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(statement)


@contextmanager
def runtime_relay(database_server: str) -> Iterator[tuple[Roles, RelayProcess, Database]]:
    """A schema migrated by its migration role, and a relay serving it as its runtime role (INFO logs)."""
    with least_privilege_roles(database_server) as roles:
        migrated = relay_command(Database(roles.migrator_conninfo, roles.schema), "migrate")
        assert migrated.returncode == 0, migrated.stderr
        env = relay_environment(roles.runtime_conninfo, roles.schema, RELAY_LOG_LEVEL="INFO")
        with running_relay(env) as relay:
            yield roles, relay, Database(database_server, roles.schema)


def read_only(roles: Roles, on: bool) -> sql.Composable:
    if on:
        return sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(
            sql.Identifier(roles.runtime)
        )
    return sql.SQL("ALTER ROLE {} RESET default_transaction_read_only").format(sql.Identifier(roles.runtime))


# ---------------------------------------------------------------------------------------------------------
# A read-only database (SQLSTATE 25006), as after a failover to a server that cannot take writes


def test_a_read_only_database_is_answered_503_and_nothing_is_committed(database_server: str) -> None:
    with least_privilege_roles(database_server) as roles:
        assert relay_command(Database(roles.migrator_conninfo, roles.schema), "migrate").returncode == 0
        admin(database_server, read_only(roles, on=True))
        env = relay_environment(roles.runtime_conninfo, roles.schema, RELAY_LOG_LEVEL="INFO")
        with running_relay(env) as relay, relay.client() as client:
            assert_each_answered_503_and_logged_once(
                relay, client, "database", "database unavailable; retry later"
            )
            assert row_counts(Database(database_server, roles.schema)) == NOTHING_STORED


def test_a_database_that_takes_writes_again_gets_the_event_on_auth0s_retry(database_server: str) -> None:
    with least_privilege_roles(database_server) as roles:
        assert relay_command(Database(roles.migrator_conninfo, roles.schema), "migrate").returncode == 0
        admin(database_server, read_only(roles, on=True))
        env = relay_environment(roles.runtime_conninfo, roles.schema)
        with running_relay(env) as relay, relay.client() as client:
            event = fixture("user.created")
            assert deliver(client, "action", encode(event), event["id"]).status_code == 503

            admin(database_server, read_only(roles, on=False))
            assert_applied_on_retry(client, Database(database_server, roles.schema))


# ---------------------------------------------------------------------------------------------------------
# A role that may read the relay's tables but not write them (SQLSTATE 42501)


def test_a_role_without_write_privileges_is_answered_503_until_they_are_granted(database_server: str) -> None:
    with runtime_relay(database_server) as (roles, relay, database), relay.client() as client:
        tables = sql.SQL("ALL TABLES IN SCHEMA {}").format(sql.Identifier(roles.schema))
        runtime = sql.Identifier(roles.runtime)
        admin(database_server, sql.SQL("REVOKE INSERT, UPDATE ON {} FROM {}").format(tables, runtime))

        assert_each_answered_503_and_logged_once(
            relay, client, "database", "database unavailable; retry later"
        )
        assert row_counts(database) == NOTHING_STORED

        admin(database_server, sql.SQL("GRANT INSERT, UPDATE ON {} TO {}").format(tables, runtime))
        assert_applied_on_retry(client, database)


# ---------------------------------------------------------------------------------------------------------
# A schema half migrated: a column the relay writes is missing (SQLSTATE 42703)

# (table, column, what else goes with it)
MISSING_COLUMNS = [
    ("processed_events", "outcome", ""),
    ("users", "merge_state", "CASCADE"),  # the live_users view goes with it
]


@pytest.fixture
def half_migrated(
    request: pytest.FixtureRequest, database: Database
) -> Iterator[tuple[RelayProcess, Database]]:
    table, column, cascade = request.param
    env = relay_environment(database.conninfo, database.schema, RELAY_LOG_LEVEL="INFO")
    with running_relay(env) as relay:
        database.query(
            sql.SQL("ALTER TABLE {} DROP COLUMN {} {}").format(
                sql.Identifier(table), sql.Identifier(column), sql.SQL(cascade)
            )
        )
        yield relay, database


@pytest.mark.parametrize("half_migrated", MISSING_COLUMNS, indirect=True, ids=lambda case: ".".join(case[:2]))
def test_a_half_migrated_schema_is_answered_503_until_it_is_migrated_afresh(
    half_migrated: tuple[RelayProcess, Database],
) -> None:
    relay, database = half_migrated
    with relay.client() as client:
        assert_each_answered_503_and_logged_once(
            relay, client, "not_migrated", "database not migrated: run `relay migrate`"
        )
        assert row_counts(database) == NOTHING_STORED

        database.query(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(database.schema)))
        migrated = relay_command(database, "migrate")
        assert migrated.returncode == 0, migrated.stderr
        assert_applied_on_retry(client, database)
        assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize("half_migrated", MISSING_COLUMNS, indirect=True, ids=lambda case: ".".join(case[:2]))
def test_readyz_says_a_half_migrated_schema_is_not_ready(
    half_migrated: tuple[RelayProcess, Database],
) -> None:
    relay, _ = half_migrated
    with relay.client() as client:
        response = client.get("/readyz")
    assert response.status_code == 503, response.text
    assert "relay migrate" in response.json()["error"]
