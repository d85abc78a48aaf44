"""Real PostgreSQL for every integration test: the embedded server always, and the server named by
TEST_DATABASE_URL as well when it is set (CI sets it to the machine's PostgreSQL 15), so both versions run.
Each test gets a fresh, migrated schema of its own."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from relay.embedded import start_embedded
from relay.migrations import migrate
from relay.settings import Settings
from relay.store import Connection, create_pool
from tests.support import AUTH0_ENVIRONMENT

BACKENDS = ["embedded"] + (["service"] if os.environ.get("TEST_DATABASE_URL") else [])


@pytest.fixture(scope="session", params=BACKENDS)
def database_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The conninfo of a PostgreSQL server (one session-wide per backend)."""
    if request.param == "service":
        return os.environ["TEST_DATABASE_URL"]
    server = start_embedded(tmp_path_factory.mktemp("embedded"), stop_at_exit=False)
    request.addfinalizer(server.stop)
    return server.conninfo


@dataclass(frozen=True)
class TestDatabase:
    conninfo: str
    schema: str

    @property
    def settings(self) -> Settings:
        return Settings(database_url=self.conninfo, db_schema=self.schema)

    def with_settings(self, **changes: Any) -> Settings:
        return replace(self.settings, **changes)

    def empty_tables(self) -> TestDatabase:
        """Back to no rows, for tests that share one schema (and one relay process) per module."""
        self.query("TRUNCATE users, processed_events, dead_letters RESTART IDENTITY")
        return self

    def query(self, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
        """Runs one statement in the test's schema and returns its rows."""
        with psycopg.connect(self.conninfo, autocommit=True, options=f"-c search_path={self.schema}") as conn:
            cursor = conn.execute(statement, params)  # type: ignore[arg-type]
            return cursor.fetchall() if cursor.description else []


@pytest.fixture
def database(database_server: str) -> Iterator[TestDatabase]:
    """A freshly migrated schema of its own for one test, dropped afterwards."""
    schema = "test_" + secrets.token_hex(6)
    asyncio.run(migrate(database_server, schema))
    yield TestDatabase(database_server, schema)
    with psycopg.connect(database_server, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture
def clean_database(shared_database: TestDatabase) -> TestDatabase:
    """For modules that define a module-scoped `shared_database`: its tables, emptied for this test."""
    return shared_database.empty_tables()


@pytest.fixture
def client(relay: Any, clean_database: TestDatabase) -> Iterator[Any]:
    """For modules that define a module-scoped `relay` process: an HTTP client to it, on empty tables."""
    with relay.client() as opened:
        yield opened


@pytest.fixture
def relay_env(monkeypatch: pytest.MonkeyPatch, database: TestDatabase) -> TestDatabase:
    """The environment the operator commands read: the test's schema, and Auth0 credentials for respx."""
    monkeypatch.setenv("DATABASE_URL", database.conninfo)
    monkeypatch.setenv("RELAY_DB_SCHEMA", database.schema)
    monkeypatch.setenv("RELAY_LOG_LEVEL", "WARNING")
    for name, value in AUTH0_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    return database


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def pool(database: TestDatabase) -> AsyncIterator[AsyncConnectionPool[Connection]]:
    opened = create_pool(database.conninfo, database.settings)
    await opened.open(wait=True)
    yield opened
    await opened.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "database" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
