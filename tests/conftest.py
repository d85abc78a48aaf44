"""Real PostgreSQL for every integration test: the embedded server always, and the server named by
TEST_DATABASE_URL as well when it is set (CI sets it to the machine's PostgreSQL 15), so both versions run.
Each test gets a fresh, migrated schema of its own; modules that share one relay process share one schema,
emptied before each test."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from relay.embedded import start_embedded
from relay.pipeline import Pipeline
from relay.store import Pool, create_pool
from tests.support.auth0 import AUTH0_ENVIRONMENT
from tests.support.aws import Aws, moto_server
from tests.support.database import Database, migrated_schema
from tests.support.http import RelayProcess, relay_environment, running_relay

BACKENDS = ["embedded"] + (["service"] if os.environ.get("TEST_DATABASE_URL") else [])


@pytest.fixture(scope="session")
def embedded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The embedded PostgreSQL, started once per test process. Kept apart from `database_server` because
    pytest tears a parametrized session fixture down whenever the parameter changes, and a test process
    (one of `make test`'s workers) alternates between modules of both backends."""
    server = start_embedded(tmp_path_factory.mktemp("embedded"), stop_at_exit=False)
    yield server.conninfo
    server.stop()


@pytest.fixture(scope="session", params=BACKENDS)
def database_server(request: pytest.FixtureRequest) -> str:
    """The conninfo of a PostgreSQL server: the embedded one, or the one TEST_DATABASE_URL names."""
    if request.param == "service":
        return os.environ["TEST_DATABASE_URL"]
    conninfo: str = request.getfixturevalue("embedded_server")
    return conninfo


@pytest.fixture
def database(database_server: str) -> Iterator[Database]:
    """A freshly migrated schema of its own for one test, dropped afterwards."""
    with migrated_schema(database_server) as migrated:
        yield migrated


@pytest.fixture(scope="module")
def shared_database(database_server: str) -> Iterator[Database]:
    """One migrated schema for a whole module (and its relay process)."""
    with migrated_schema(database_server, prefix="test_module_") as migrated:
        yield migrated


@pytest.fixture
def clean_database(shared_database: Database) -> Database:
    """The module's schema, emptied for this test."""
    return shared_database.empty_tables()


@pytest.fixture(scope="module")
def relay(shared_database: Database) -> Iterator[RelayProcess]:
    """One `relay serve` process for a module, on the module's schema (a module may override it)."""
    with running_relay(relay_environment(shared_database.conninfo, shared_database.schema)) as process:
        yield process


@pytest.fixture
def client(relay: RelayProcess, clean_database: Database) -> Iterator[httpx.Client]:
    """An HTTP client to the module's relay process, on empty tables."""
    with relay.client() as opened:
        yield opened


@pytest.fixture
def relay_env(monkeypatch: pytest.MonkeyPatch, database: Database) -> Database:
    """The environment the operator commands read: the test's schema, and Auth0 credentials for respx."""
    monkeypatch.setenv("DATABASE_URL", database.conninfo)
    monkeypatch.setenv("RELAY_DB_SCHEMA", database.schema)
    monkeypatch.setenv("RELAY_LOG_LEVEL", "WARNING")
    for name, value in AUTH0_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    return database


@pytest.fixture(scope="session")
def aws() -> Iterator[Aws]:
    """A moto server (SQS, EventBridge) for the session, started like the embedded PostgreSQL; each test
    makes queues and buses of its own."""
    with moto_server() as server:
        yield server


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def pool(database: Database) -> AsyncIterator[Pool]:
    """The relay's own pool on the test's schema."""
    opened = create_pool(database.conninfo, database.settings)
    await opened.open(wait=True)
    yield opened
    await opened.close()


@pytest.fixture
def pipeline(pool: Pool, database: Database) -> Pipeline:
    """The relay's pipeline on the test's schema, for `commit()` (no group committer running)."""
    return Pipeline(pool, database.settings)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "database_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
