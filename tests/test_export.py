"""`relay export --format auth0-import`: the live users of one database connection as Auth0's bulk user
import file, checked against Auth0's published JSON schema (tests/fixtures, with its source). The copy is
filled through a relay process and `relay backfill`; the export runs as an operator runs it."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import jsonschema

from tests.support import REPO
from tests.support.database import TYPED_COLUMNS, Database, migrated_schema
from tests.support.events import BASE_TIME, encode, export_row, ndjson, user_event
from tests.support.http import deliver, outcomes, relay_command

DATABASE_CONNECTION = "Username-Password-Authentication"
IMPORT_SCHEMA_FILE = REPO / "tests" / "fixtures" / "schemas" / "auth0-bulk-import-user.schema.json"
IMPORT_SCHEMA = json.loads(IMPORT_SCHEMA_FILE.read_text())
PASSWORD_NOTICE = "password hashes are not in the copy: imported users must reset their password"


def import_file_users(text: str) -> list[dict[str, Any]]:
    """The users of an import file, each valid under Auth0's schema (raises otherwise)."""
    users = json.loads(text)
    assert isinstance(users, list)
    validator = jsonschema.Draft7Validator(IMPORT_SCHEMA, format_checker=jsonschema.FormatChecker())
    for user in users:
        validator.validate(user)
    return users


def social(user_id: str) -> dict[str, Any]:
    return export_row(
        user_id,
        BASE_TIME,
        identities=[
            {"connection": "google-oauth2", "provider": "google-oauth2", "user_id": "1057", "isSocial": True}
        ],
    )


def backfill(database: Database, path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_bytes(ndjson(rows))
    done = relay_command(database, "backfill", "--file", str(path))
    assert done.returncode == 0, done.stderr


def test_the_import_file_holds_the_connections_live_users_in_the_fields_auth0_accepts(
    client: httpx.Client, clean_database: Database, tmp_path: Path
) -> None:
    alice = export_row(
        "auth0|alice",
        BASE_TIME,
        given_name="Alice",
        family_name="Liddell",
        nickname="al",
        picture="https://example.com/alice.png",
        username="alice",
        blocked=False,
        app_metadata={"plan": "pro", "roles": ["admin"], "email": "reserved@example.com"},
        user_metadata={"theme": "dark", "score": 1.25},
        last_login="2025-01-02T03:04:05.000Z",
        multifactor=["guardian"],
        phone_number="+12125550001",
    )
    alice["identities"].append({"connection": "google-oauth2", "provider": "google-oauth2", "user_id": "77"})
    without_email = {
        key: value for key, value in export_row("auth0|noemail", BASE_TIME).items() if key != "email"
    }
    backfill(
        clean_database,
        tmp_path / "export.json",
        [alice, export_row("auth0|bob", BASE_TIME), social("google-oauth2|1057"), without_email],
    )
    # Bob is deleted by a live event: a tombstone is not restored.
    deleted = user_event("deleted", "evt_bob", BASE_TIME + timedelta(hours=1), "auth0|bob")
    assert outcomes(deliver(client, "webhook", encode(deleted))) == ["tombstoned"]

    out = tmp_path / "import.json"
    done = relay_command(
        clean_database,
        "export",
        "--format",
        "auth0-import",
        "--connection",
        DATABASE_CONNECTION,
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    users = import_file_users(out.read_text())
    assert users == [
        {
            "user_id": "alice",  # the import prefixes auth0| again
            "email": "alice@example.com",
            "email_verified": True,
            "username": "alice",
            "given_name": "Alice",
            "family_name": "Liddell",
            "name": "User alice",
            "nickname": "al",
            "picture": "https://example.com/alice.png",
            "blocked": False,
            "app_metadata": {"plan": "pro", "roles": ["admin"]},  # `email` is Auth0's own key there
            "user_metadata": {"theme": "dark", "score": 1.25},
        }
    ]
    assert f"exported 1 live users of connection {DATABASE_CONNECTION} to {out}" in done.stdout
    assert "left out 1 users without an email: Auth0's import requires one" in done.stdout
    assert PASSWORD_NOTICE in done.stdout
    assert not (tmp_path / "import.json.partial").exists()

    # The other connection has its own users.
    google = relay_command(
        clean_database, "export", "--format", "auth0-import", "--connection", "google-oauth2"
    )
    assert google.returncode == 0, google.stderr
    assert [user["user_id"] for user in import_file_users(google.stdout)] == [
        "77",
        "1057",
    ]  # by user_id: auth0|alice first


def test_a_large_export_to_stdout_shows_progress_on_stderr(
    clean_database: Database, tmp_path: Path, client: httpx.Client
) -> None:
    rows = [export_row(f"auth0|user{number:05d}", BASE_TIME) for number in range(5000)]
    backfill(clean_database, tmp_path / "export.json", rows)

    done = relay_command(
        clean_database, "export", "--format", "auth0-import", "--connection", DATABASE_CONNECTION
    )
    assert done.returncode == 0, done.stderr
    users = import_file_users(done.stdout)
    assert [user["user_id"] for user in users] == [f"user{number:05d}" for number in range(5000)]
    progress = [line for line in done.stderr.splitlines() if line.startswith("exporting connection")]
    assert progress[0] == f"exporting connection {DATABASE_CONNECTION}: 1000 of 5000 users read"
    assert progress[-1] == f"exporting connection {DATABASE_CONNECTION}: 5000 of 5000 users read"
    # Without --out, what it did goes to stderr too, so stdout holds the file alone.
    assert PASSWORD_NOTICE in done.stderr
    assert len(done.stdout.encode()) > 500 * 1024
    assert "Auth0 takes at most 500 KB per import job: split the array over several files" in done.stderr


def test_an_unknown_format_or_an_import_without_a_connection_is_refused(clean_database: Database) -> None:
    unknown = relay_command(clean_database, "export", "--format", "csv", "--connection", "x")
    assert unknown.returncode == 2
    assert "argument --format: invalid choice: 'csv'" in unknown.stderr
    unnamed = relay_command(clean_database, "export", "--format", "auth0-import")
    assert unnamed.returncode == 2
    assert "--format auth0-import needs --connection NAME" in unnamed.stderr


def live_copy(database: Database) -> list[tuple[Any, ...]]:
    """What a reader of the copy sees of each live user: the profile and every column derived from it."""
    columns = ", ".join(("user_id", "profile", *TYPED_COLUMNS))
    return database.query(f"SELECT {columns} FROM live_users ORDER BY user_id")


def test_an_export_loaded_into_an_empty_schema_reproduces_the_live_copy(
    client: httpx.Client, clean_database: Database, tmp_path: Path
) -> None:
    exact = {"balance": "NUMBER", "ratio": 0.1}
    events = [
        user_event("created", "evt_1", 0, **export_row("auth0|ann", BASE_TIME)),
        user_event("updated", "evt_2", 1, "auth0|ann", nickname="annie", user_metadata={"theme": "dark"}),
        user_event("created", "evt_3", 2, **social("google-oauth2|1057")),
        user_event("created", "evt_4", 3, **export_row("auth0|gone", BASE_TIME)),
        user_event("deleted", "evt_5", 4, "auth0|gone"),
        user_event("created", "evt_6", 5, **export_row("auth0|exact", BASE_TIME, app_metadata=exact)),
    ]
    body = encode(events).replace(b'"NUMBER"', b"12345678901234567890.123456789012")
    assert outcomes(deliver(client, "webhook", body)) == ["applied"] * 4 + ["tombstoned", "applied"]
    export = tmp_path / "users.ndjson"
    done = relay_command(clean_database, "export", "--format", "export", "--out", str(export))
    assert done.returncode == 0, done.stderr
    assert "exported 3 live users of the copy" in done.stdout
    assert [json.loads(line)["user_id"] for line in export.read_text().splitlines()] == [
        "auth0|ann",
        "auth0|exact",
        "google-oauth2|1057",
    ]
    assert b"12345678901234567890.123456789012" in export.read_bytes()

    with migrated_schema(clean_database.conninfo) as restored:
        loaded = relay_command(restored, "backfill", "--file", str(export))
        assert loaded.returncode == 0, loaded.stderr
        assert live_copy(restored) == live_copy(clean_database)

    one_connection = relay_command(
        clean_database, "export", "--format", "export", "--connection", "google-oauth2"
    )
    assert [json.loads(line)["user_id"] for line in one_connection.stdout.splitlines()] == [
        "google-oauth2|1057"
    ]
