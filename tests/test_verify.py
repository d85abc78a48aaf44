"""`relay verify` end to end: respx plays the Management API, and each of its answers first delivers the
matching Auth0 event through the real Action (node) into a real relay process and real PostgreSQL.

`relay verify` runs in this process (respx only intercepts httpx here); node and the relay are real processes.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import respx

from relay.cli import main
from tests.support import REPO
from tests.support.auth0 import (
    AUTH0_CLIENT_SECRET,
    AUTH0_DOMAIN,
    AUTH0_ENVIRONMENT,
    MANAGEMENT_API,
    management_api,
)
from tests.support.database import Database
from tests.support.events import fixture
from tests.support.http import SIGNING_SECRET, relay_environment, running_relay

NODE = shutil.which("node")
pytestmark = [pytest.mark.integration, pytest.mark.skipif(NODE is None, reason="node runs the Action")]

DOMAIN = AUTH0_DOMAIN
API = MANAGEMENT_API
CONNECTION = "Username-Password-Authentication"
USER_URL = re.compile(rf"{re.escape(API)}/users/(?P<quoted_id>[^/?]+)")


class FakeTenant:
    """Answers the Management API's user requests as Auth0 would, after delivering the event Auth0 would
    emit through the real Action to the relay (so the event is in PostgreSQL before the answer arrives)."""

    def __init__(self, relay_url: str, *, deliver_updates: bool = True) -> None:
        self.secrets = {"RELAY_URL": relay_url, "RELAY_SIGNING_SECRET": SIGNING_SECRET}
        self.deliver_updates = deliver_updates
        self.users: dict[str, dict[str, Any]] = {}
        self.delivered: list[str] = []
        self._last_time = datetime.now(UTC) - timedelta(seconds=1)

    def create_user(self, request: httpx.Request) -> httpx.Response:
        sent = json.loads(request.content)
        local_id = secrets.token_hex(12)
        now = self._now()
        user = {
            "user_id": f"auth0|{local_id}",
            "email": sent["email"],
            "email_verified": False,
            "name": sent["name"],
            "nickname": sent["email"].split("@")[0],
            "picture": "https://s.gravatar.com/avatar/0?s=480&r=pg&d=mp",
            "identities": [
                {
                    "connection": sent["connection"],
                    "provider": "auth0",
                    "isSocial": False,
                    "user_id": local_id,
                }
            ],
            "user_metadata": {},
            "app_metadata": {},
            "created_at": now,
            "updated_at": now,
        }
        self.users[user["user_id"]] = user
        event = self._event("user.created", now, user)
        event["data"]["context"]["connection"]["name"] = sent["connection"]
        self._deliver(event)
        return httpx.Response(201, json=user)

    def update_user(self, request: httpx.Request, quoted_id: str) -> httpx.Response:
        user_id = urllib.parse.unquote(quoted_id)
        previous = self.users[user_id]
        now = self._now()
        user = {**previous, **json.loads(request.content), "updated_at": now}
        self.users[user_id] = user
        if self.deliver_updates:
            event = self._event("user.updated", now, user)
            event["data"]["previous_object"] = previous
            self._deliver(event)
        return httpx.Response(200, json=user)

    def delete_user(self, request: httpx.Request, quoted_id: str) -> httpx.Response:
        user = self.users.pop(urllib.parse.unquote(quoted_id))
        now = self._now()
        self._deliver(self._event("user.deleted", now, {**user, "deleted_at": now}))
        return httpx.Response(204)

    def _event(self, event_type: str, time: str, user: dict[str, Any]) -> dict[str, Any]:
        """An event shaped like tests/fixtures/<type>.json, about `user`."""
        event = copy.deepcopy(fixture(event_type))
        event["id"] = "evt_" + secrets.token_hex(11)
        event["time"] = time
        event["data"]["object"] = user
        return event

    def _deliver(self, event: dict[str, Any]) -> None:
        assert NODE is not None
        result = subprocess.run(
            [NODE, str(REPO / "action" / "harness.js")],
            input=json.dumps({"message": event, "secrets": self.secrets}),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert (result.returncode, result.stdout.strip()) == (0, "ok"), result.stderr
        self.delivered.append(event["type"])

    def _now(self) -> str:
        """Auth0-style millisecond times, strictly increasing so each event is newer than the last."""
        self._last_time = max(datetime.now(UTC), self._last_time + timedelta(milliseconds=1))
        return self._last_time.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@pytest.fixture
def relay_url(database: Database) -> Iterator[str]:
    # Started before respx is switched on: its readiness check uses httpx too.
    with running_relay(relay_environment(database.conninfo, database.schema)) as relay:
        yield relay.url


@pytest.fixture
def verify_environment(database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """What an operator sets for `relay verify`: the relay's database and the Management API credentials."""
    monkeypatch.setenv("DATABASE_URL", database.conninfo)
    monkeypatch.setenv("RELAY_DB_SCHEMA", database.schema)
    for name, value in AUTH0_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)


def play_management_api(mock: respx.MockRouter, tenant: FakeTenant) -> dict[str, respx.Route]:
    """The user routes of the tenant, on a router whose token endpoint answers already."""
    return {
        "create": mock.post(f"{API}/users").mock(side_effect=tenant.create_user),
        "update": mock.patch(url__regex=USER_URL).mock(side_effect=tenant.update_user),
        "delete": mock.delete(url__regex=USER_URL).mock(side_effect=tenant.delete_user),
    }


def test_verify_sees_created_updated_and_deleted_in_postgresql(
    relay_url, database, verify_environment, capsys
):
    tenant = FakeTenant(relay_url)
    with management_api(assert_all_called=True) as auth0:
        routes = play_management_api(auth0, tenant)

        status = main(["verify", "--connection", CONNECTION, "--timeout", "20"])

        created = json.loads(routes["create"].calls.last.request.content)
        renamed = json.loads(routes["update"].calls.last.request.content)
        [user_id] = {
            urllib.parse.unquote(call.request.url.path.rsplit("/", 1)[1]) for call in routes["delete"].calls
        }
        assert routes["delete"].call_count == 1

    assert status == 0
    assert created == {
        "connection": CONNECTION,
        "email": created["email"],
        "password": created["password"],
        "name": created["name"],
        "verify_email": False,
    }
    suffix = re.fullmatch(r"relay-verify-([0-9a-f]{12})@example\.com", created["email"]).group(1)
    assert created["name"] == f"Relay Verify {suffix}"
    assert renamed == {"name": f"Relay Verify {suffix} (renamed)"}
    assert tenant.delivered == ["user.created", "user.updated", "user.deleted"]

    [(name, deleted_at)] = database.query("SELECT name, deleted_at FROM users WHERE user_id = %s", [user_id])
    assert name == renamed["name"]
    assert deleted_at is not None

    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == f"Auth0 tenant {DOMAIN}, connection '{CONNECTION}'; schema {database.schema}"
    assert lines[1] == f"created {user_id} ({created['email']}) in Auth0"
    assert re.fullmatch(rf"user\.created: row in {database.schema}\.users after \d+\.\d s", lines[2])
    assert re.fullmatch(rf"user\.updated: new name in {database.schema}\.users after \d+\.\d s", lines[3])
    assert re.fullmatch(rf"user\.deleted: tombstone in {database.schema}\.users after \d+\.\d s", lines[4])
    assert lines[5].startswith("synchronization verified")
    assert created["password"] not in captured.out + captured.err
    assert AUTH0_CLIENT_SECRET not in captured.out + captured.err


def test_a_change_that_never_arrives_times_out_naming_the_step_and_deletes_the_user(
    relay_url, database, verify_environment, capsys
):
    tenant = FakeTenant(relay_url, deliver_updates=False)
    with management_api(assert_all_called=True) as auth0:
        routes = play_management_api(auth0, tenant)

        status = main(["verify", "--connection", CONNECTION, "--timeout", "1.5"])

        assert routes["update"].call_count == 1
        # The clean-up: the throw-away user is deleted from Auth0 although verification failed.
        assert routes["delete"].call_count == 1
        user_id = urllib.parse.unquote(routes["delete"].calls.last.request.url.path.rsplit("/", 1)[1])

    assert status == 1
    assert tenant.users == {}
    captured = capsys.readouterr()
    assert captured.err.startswith(
        f"relay verify: timed out after 1.5 s waiting for user.updated: the new name of {user_id} did not "
        f"reach {database.schema}.users."
    )
    assert captured.out.splitlines()[-1] == f"clean-up: deleted {user_id} from Auth0"
    # The clean-up's own user.deleted still reaches the copy, carrying Auth0's last state (the rename too).
    [(name, deleted_at)] = database.query("SELECT name, deleted_at FROM users WHERE user_id = %s", [user_id])
    assert name.endswith(" (renamed)")
    assert deleted_at is not None


def test_a_refused_user_creation_names_the_scope_and_leaves_nothing_to_clean_up(
    database, verify_environment, capsys
):
    with management_api(assert_all_called=True) as auth0:
        auth0.post(f"{API}/users").respond(
            403,
            json={
                "statusCode": 403,
                "error": "Forbidden",
                "message": "Insufficient scope, expected any of: create:users",
                "errorCode": "insufficient_scope",
            },
        )

        status = main(["verify", "--connection", CONNECTION])

    assert status == 1
    err = capsys.readouterr().err
    assert err.startswith(f"relay verify: Auth0 refused to create a user in connection '{CONNECTION}' (403 ")
    assert "the application needs the scope create:users" in err


def test_a_database_without_the_relays_tables_is_reported_before_anything_is_created(
    database, verify_environment, monkeypatch, capsys
):
    monkeypatch.setenv("RELAY_DB_SCHEMA", "no_such_schema")
    with management_api() as auth0:
        status = main(["verify", "--connection", CONNECTION])
        assert not auth0.calls

    assert status == 1
    assert capsys.readouterr().err.startswith("relay verify: no users table in schema 'no_such_schema'")
