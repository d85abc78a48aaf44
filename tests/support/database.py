"""A migrated schema of its own for a test, and readers of what the relay stored in it.

Every reader goes through plain psycopg and SQL, never through the relay's own store module, so a test
checks what PostgreSQL holds rather than what the code under test believes it wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from relay.migrations import migrate
from relay.settings import Settings

TABLES = ("users", "processed_events", "dead_letters")
NOTHING_STORED = dict.fromkeys(TABLES, 0)

TEXT_COLUMNS = (
    "email",
    "name",
    "given_name",
    "family_name",
    "nickname",
    "picture",
    "username",
    "phone_number",
)
BOOLEAN_COLUMNS = ("email_verified", "blocked")
TIME_COLUMNS = ("created_at", "updated_at", "last_login")
JSON_COLUMNS = ("identities", "app_metadata", "user_metadata")
TYPED_COLUMNS = (*TEXT_COLUMNS, *BOOLEAN_COLUMNS, *TIME_COLUMNS, "logins_count", *JSON_COLUMNS)


@dataclass(frozen=True)
class Database:
    """One migrated schema on one PostgreSQL server."""

    conninfo: str
    schema: str

    @property
    def settings(self) -> Settings:
        return Settings(database_url=self.conninfo, db_schema=self.schema, workers=1)

    def with_settings(self, **changes: Any) -> Settings:
        return replace(self.settings, **changes)

    def empty_tables(self) -> Database:
        """Back to no rows, for tests that share one schema (and one relay process) per module."""
        self.query("TRUNCATE users, processed_events, dead_letters, event_cursors RESTART IDENTITY")
        return self

    def query(self, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
        """Runs one statement in the schema and returns its rows."""
        with psycopg.connect(self.conninfo, autocommit=True, options=f"-c search_path={self.schema}") as conn:
            cursor = conn.execute(statement, params)  # type: ignore[arg-type]
            return cursor.fetchall() if cursor.description else []


@contextlib.contextmanager
def migrated_schema(conninfo: str, prefix: str = "test_") -> Iterator[Database]:
    """A freshly migrated schema of its own, dropped afterwards."""
    schema = prefix + secrets.token_hex(6)
    asyncio.run(migrate(conninfo, schema))
    try:
        yield Database(conninfo, schema)
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def row_counts(database: Database) -> dict[str, int]:
    counts = database.query(
        "SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM processed_events),"
        " (SELECT count(*) FROM dead_letters)"
    )[0]
    return dict(zip(TABLES, counts, strict=True))


def as_time(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def user_row(database: Database, user_id: str) -> dict[str, Any] | None:
    """The typed columns, profile, tombstone, versions and merge state of one user, or None."""
    columns = (
        *TYPED_COLUMNS,
        "profile",
        "merge_state",
        "deleted_at",
        "last_event_id",
        "last_event_processed",
    )
    rows = database.query(
        sql.SQL("SELECT {} FROM users WHERE user_id = %s").format(
            sql.SQL(", ").join(map(sql.Identifier, columns))
        ),
        [user_id],
    )
    return dict(zip(columns, rows[0], strict=True)) if rows else None


def expected_typed_columns(user: dict[str, Any]) -> dict[str, Any]:
    """What the typed columns must hold for a profile (`data.object` as stored)."""
    return {
        column: as_time(user.get(column)) if column in TIME_COLUMNS else user.get(column)
        for column in TYPED_COLUMNS
    }


def assert_stored_as_sent(database: Database, event: dict[str, Any]) -> dict[str, Any]:
    """The user of a single applied event: typed columns and profile equal `data.object`."""
    user = event["data"]["object"]
    row = user_row(database, user["user_id"])
    assert row is not None, f"no users row for {user['user_id']!r}"
    assert {column: row[column] for column in TYPED_COLUMNS} == expected_typed_columns(user)
    assert row["profile"] == user
    assert row["last_event_id"] == event["id"]
    assert row["last_event_processed"] == as_time(event["time"])
    return row


def ledger(database: Database) -> list[tuple[Any, ...]]:
    """The ledger, oldest event first: (event_id, event_type, user_id, event_time, outcome)."""
    return database.query(
        "SELECT event_id, event_type, user_id, event_time, outcome FROM processed_events"
        " ORDER BY event_time, event_id"
    )


def ledger_row(event: dict[str, Any], outcome: str) -> tuple[Any, ...]:
    """The ledger row an event must leave."""
    return (event["id"], event["type"], event["data"]["object"]["user_id"], as_time(event["time"]), outcome)


def outcomes_recorded(database: Database) -> dict[str, str]:
    return dict(database.query("SELECT event_id, outcome FROM processed_events"))  # type: ignore[arg-type]


@dataclass(frozen=True)
class StoredLetter:
    id: int
    route: str
    body: bytes
    headers: dict[str, str]
    error: str
    resolved: bool


def dead_letters(database: Database) -> list[StoredLetter]:
    """Every dead letter, oldest first."""
    return [
        StoredLetter(letter_id, route, bytes(body), headers, error, resolved)
        for letter_id, route, body, headers, error, resolved in database.query(
            "SELECT id, route, body, headers, error, resolved_at IS NOT NULL FROM dead_letters ORDER BY id"
        )
    ]


def dead_letter(database: Database, letter_id: int) -> StoredLetter:
    [letter] = [letter for letter in dead_letters(database) if letter.id == letter_id]
    return letter


def insert_dead_letter(
    database: Database,
    body: bytes,
    *,
    route: str = "webhook",
    error: str = "an older relay version could not decode this",
    headers: dict[str, str] | None = None,
    received_ago: timedelta = timedelta(0),
    resolved_ago: timedelta | None = None,
) -> int:
    """A dead letter as an earlier relay version left it; its id."""
    [(letter_id,)] = database.query(
        "INSERT INTO dead_letters (route, body, headers, error, received_at, resolved_at)"
        " VALUES (%s, %s, %s, %s, now() - %s::interval, now() - %s::interval) RETURNING id",
        [route, body, Jsonb(headers or {}), error, received_ago, resolved_ago],
    )
    return int(letter_id)
