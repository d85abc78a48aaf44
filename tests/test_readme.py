"""The README's SQL examples run against a real migrated schema, so they cannot rot: each statement executes,
finds the users it is meant to find, and is served by an index as the README says."""

from __future__ import annotations

import json
import re
from typing import Any

import psycopg
import pytest

from relay.settings import Settings
from tests.support import REPO
from tests.support.database import Database
from tests.support.events import fixture

README_SCHEMA = "auth0"


def readme_sql_statements() -> list[str]:
    readme = (REPO / "README.md").read_text()
    statements = []
    for block in re.findall(r"^```sql\n(.*?)^```", readme, flags=re.DOTALL | re.MULTILINE):
        code = "\n".join(line for line in block.splitlines() if not line.lstrip().startswith("--"))
        statements += [statement.strip() for statement in code.split(";") if statement.strip()]
    return statements


STATEMENTS = readme_sql_statements()


def in_schema(statement: str, schema: str) -> str:
    return re.sub(rf"\b{README_SCHEMA}\.(?=[a-z_])", f"{schema}.", statement)


def test_readme_has_sql_examples_written_for_the_default_schema():
    assert STATEMENTS, "README.md has no ```sql block"
    assert Settings().db_schema == README_SCHEMA
    assert all(f"{README_SCHEMA}." in statement for statement in STATEMENTS)


def profiles_the_examples_should_find() -> list[dict[str, Any]]:
    jane = fixture("user.created")["data"]["object"] | {"email": "jane@example.com"}
    google = {
        "user_id": "google-oauth2|1057",
        "email": "ada@example.com",
        "app_metadata": {"plan": "pro"},
        "user_metadata": {},
        "identities": [{"provider": "google-oauth2", "connection": "google-oauth2", "isSocial": True}],
    }
    others = [
        {
            "user_id": f"auth0|other{i}",
            "email": f"user{i}@example.com",
            "app_metadata": {"plan": "free"},
            "identities": [{"provider": "samlp", "connection": "corp-sso"}],
        }
        for i in range(100)
    ]
    return [jane, google, *others]


@pytest.fixture
def directory(database: Database) -> Database:
    database.query(
        "INSERT INTO users (user_id, profile) "
        "SELECT profile ->> 'user_id', profile FROM jsonb_array_elements(%s::jsonb) AS profile",
        [json.dumps(profiles_the_examples_should_find())],
    )
    # Jane's history, as the relay keeps it with RELAY_HISTORY=on: her user.created.
    database.query(
        "INSERT INTO user_events (user_id, event_time, event_id, event_type, replaces, object)"
        " SELECT profile ->> 'user_id', (profile ->> 'created_at')::timestamptz, 'evt_1', 'user.created',"
        " true, profile FROM jsonb_array_elements(%s::jsonb) AS profile",
        [json.dumps(profiles_the_examples_should_find()[:1])],
    )
    database.query("ANALYZE users")
    database.query("ANALYZE user_events")
    return database


@pytest.mark.parametrize("statement", STATEMENTS, ids=[f"statement{i}" for i in range(len(STATEMENTS))])
def test_readme_query_runs_and_finds_users(directory, statement):
    rows = directory.query(in_schema(statement, directory.schema))

    assert rows, statement
    assert rows not in ([(0,)], [(None,)]), statement


@pytest.mark.parametrize("statement", STATEMENTS, ids=[f"statement{i}" for i in range(len(STATEMENTS))])
def test_readme_query_is_served_by_an_index(directory, statement):
    with psycopg.connect(directory.conninfo, autocommit=True, options="-c enable_seqscan=off") as conn:
        rows = conn.execute(f"EXPLAIN {in_schema(statement, directory.schema)}").fetchall()
    plan = "\n".join(row[0] for row in rows)

    assert "Index" in plan, plan
    assert "Seq Scan" not in plan, plan


def test_readme_email_lookup_ignores_case_and_tombstones(directory):
    [email_lookup] = [statement for statement in STATEMENTS if "lower(email)" in statement]
    query = in_schema(email_lookup, directory.schema)

    assert [row[0] for row in directory.query(query)] == ["auth0|679fb1b1e809445f129bc18d"]

    directory.query("UPDATE users SET deleted_at = now() WHERE email = 'jane@example.com'")
    assert directory.query(query) == []
