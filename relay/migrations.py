"""Forward-only migrations from `schema/NNNN_name.sql`, applied under an advisory lock.

Replicas that start together all call `migrate`; the lock makes one of them apply what is pending while
the others wait, then find nothing left to do. psycopg's errors come out as the store's own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import AsyncConnection, sql

from relay.store import in_drivers_words

_MIGRATION_FILE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    path: Path


def schema_dir() -> Path:
    """`schema/` beside the package in a checkout, or inside it when installed from a wheel."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "schema", package.parent / "schema"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("the relay's schema/ migrations folder is missing from this installation")


def available_migrations(directory: Path | None = None) -> list[Migration]:
    found = []
    for path in sorted((directory or schema_dir()).glob("*.sql")):
        match = _MIGRATION_FILE.fullmatch(path.name)
        if match is None:
            raise ValueError(f"{path.name}: migration files are named NNNN_lower_case_name.sql")
        found.append(Migration(int(match[1]), match[2], path))
    versions = [migration.version for migration in found]
    if versions != list(range(1, len(versions) + 1)):
        raise ValueError(f"migrations must be numbered 1, 2, 3… without gaps; found {versions}")
    return found


def latest_version() -> int:
    return len(available_migrations())


async def migrate(conninfo: str, schema: str) -> list[Migration]:
    """Applies pending migrations in one transaction; returns those it applied. `StoreUnavailable` when
    PostgreSQL cannot be reached or refuses a migration: nothing is applied then."""
    try:
        return await _apply_pending(conninfo, schema)
    except psycopg.Error as error:
        raise in_drivers_words(error) from None


async def _apply_pending(conninfo: str, schema: str) -> list[Migration]:
    pending: list[Migration] = []
    async with await AsyncConnection.connect(conninfo, autocommit=True) as conn, conn.transaction():
        # Serialises concurrent migrators of this schema; released at commit.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"relay.migrate.{schema}"])
        await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        await conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)))
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        cursor = await conn.execute("SELECT version FROM schema_migrations")
        applied = {row[0] for row in await cursor.fetchall()}
        for migration in available_migrations():
            if migration.version in applied:
                continue
            await conn.execute(migration.path.read_text())  # a trusted file of the project
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                [migration.version, migration.name],
            )
            pending.append(migration)
    return pending
