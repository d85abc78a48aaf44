"""The real Action under node, posting to a real relay process, writing to real PostgreSQL."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import REPO
from tests.support.events import fixture
from tests.support.http import OTHER_SECRET, SIGNING_SECRET, relay_environment, running_relay

NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node is needed to run the Action")


def run_action(message: dict[str, Any], secrets: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Runs `onExecuteEventStream` once, as Auth0 would, through action/harness.js."""
    assert NODE is not None
    return subprocess.run(
        [NODE, str(REPO / "action" / "harness.js")],
        input=json.dumps({"message": message, "secrets": secrets}),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture
def relay_url(database: Any) -> Iterator[str]:
    with running_relay(relay_environment(database.conninfo, database.schema)) as relay:
        yield relay.url


def test_created_updated_deleted_and_test_events_reach_the_copy(relay_url: str, database: Any) -> None:
    secrets = {"RELAY_URL": relay_url, "RELAY_SIGNING_SECRET": SIGNING_SECRET}
    for name in ("user.created", "user.updated", "test-event"):
        result = run_action(fixture(name), secrets)
        assert (result.returncode, result.stdout.strip()) == (0, "ok"), result.stderr

    [(email, name, deleted_at)] = database.query("SELECT email, name, deleted_at FROM users")
    assert (email, name, deleted_at) == ("Jane.Doe@Example.com", "Jane Doe", None)

    result = run_action(fixture("user.deleted"), secrets)
    assert result.returncode == 0, result.stderr
    assert database.query("SELECT count(*) FROM users WHERE deleted_at IS NOT NULL") == [(1,)]
    outcomes = dict(database.query("SELECT event_id, outcome FROM processed_events"))
    assert outcomes == {
        fixture("user.created")["id"]: "applied",
        fixture("user.updated")["id"]: "applied",
        fixture("test-event")["id"]: "test",
        fixture("user.deleted")["id"]: "tombstoned",
    }


def test_secret_rotation_without_a_refused_event(database: Any) -> None:
    old, new = SIGNING_SECRET, OTHER_SECRET
    created, updated = fixture("user.created"), fixture("user.updated")

    # 1. The relay accepts both secrets; the Action still signs with the old one only.
    both = relay_environment(database.conninfo, database.schema, RELAY_SIGNING_SECRETS=f"{new},{old}")
    with running_relay(both) as relay:
        assert run_action(created, {"RELAY_URL": relay.url, "RELAY_SIGNING_SECRET": old}).returncode == 0
        # 2. The Action moves to the new secret and keeps signing with the old one too.
        moving = {"RELAY_URL": relay.url, "RELAY_SIGNING_SECRET": new, "RELAY_SIGNING_SECRET_PREVIOUS": old}
        assert run_action(updated, moving).returncode == 0

    # 3. The relay drops the old secret: the Action's new signature is enough, an old-only sender is refused.
    new_only = relay_environment(database.conninfo, database.schema, RELAY_SIGNING_SECRETS=new)
    with running_relay(new_only) as relay:
        deleted = fixture("user.deleted")
        refused = run_action(deleted, {"RELAY_URL": relay.url, "RELAY_SIGNING_SECRET": old})
        assert refused.returncode == 1
        assert "401" in refused.stderr and "signature" in refused.stderr
        assert old not in refused.stderr
        accepted = run_action(deleted, {"RELAY_URL": relay.url, "RELAY_SIGNING_SECRET": new})
        assert accepted.returncode == 0, accepted.stderr

    rows = database.query("SELECT event_id FROM processed_events ORDER BY event_time")
    assert [row[0] for row in rows] == [created["id"], updated["id"], fixture("user.deleted")["id"]]


def test_the_action_throws_when_the_relay_cannot_commit(database: Any) -> None:
    """A relay whose database is missing answers 503, and the Action turns that into a retry (a throw)."""
    env = relay_environment(database.conninfo, "schema_that_does_not_exist")
    with running_relay(env) as relay:
        secrets = {"RELAY_URL": relay.url, "RELAY_SIGNING_SECRET": SIGNING_SECRET}
        result = run_action(fixture("user.created"), secrets)
    assert result.returncode == 1
    assert "503" in result.stderr and "not migrated" in result.stderr
