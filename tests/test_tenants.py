"""One schema holds one tenant's users (issue 10, item 14).

A user id is unique only within a tenant (a social login is `google-oauth2|<sub>` in every tenant that
uses it), so the first tenant to deliver an event is pinned to the schema, and events naming any other tenant
are refused with 403, stored nowhere, counted and logged. Events that name no tenant are taken as the
schema's.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

import httpx
import pytest

from relay.events import decode_body
from relay.pipeline import Delivery, NotAllowed, Pipeline
from relay.store import Pool, create_pool
from tests.support.database import Database, outcomes_recorded, row_counts
from tests.support.events import cloudevent, encode
from tests.support.http import deliver, metric, relay_environment, running_relay

pytestmark = pytest.mark.integration


def from_tenant(tenant: str | None, **changes: Any) -> dict[str, Any]:
    """A new user's event, naming `tenant` (or no tenant at all)."""
    event = cloudevent(id=f"evt_{secrets.token_hex(8)}", user_id=f"auth0|{secrets.token_hex(8)}", **changes)
    if tenant is None:
        del event["a0tenant"]
    else:
        event["a0tenant"] = tenant
    return event


def post(client: httpx.Client, event: dict[str, Any] | list[dict[str, Any]]) -> httpx.Response:
    first = event[0] if isinstance(event, list) else event
    return deliver(client, "webhook", encode(event), first["id"])


def log_records(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_the_first_tenant_is_pinned_and_another_tenants_events_are_refused_and_kept_nowhere(
    database: Database,
) -> None:
    ours, theirs, unnamed = from_tenant("acme"), from_tenant("globex"), from_tenant(None)
    env = relay_environment(database.conninfo, database.schema)
    with running_relay(env) as relay, relay.client() as client:
        first = post(client, ours)
        refused = post(client, theirs)
        accepted = post(client, unnamed)
        scrape = client.get("/metrics").text
    output = relay.output()

    assert first.json() == {"events": [{"id": ours["id"], "outcome": "applied"}]}
    assert refused.status_code == 403
    assert refused.json() == {
        "error": f"schema {database.schema!r} holds the users of tenant 'acme', not 'globex': "
        "give each tenant a RELAY_DB_SCHEMA of its own"
    }
    assert accepted.json() == {"events": [{"id": unnamed["id"], "outcome": "applied"}]}
    assert database.query("SELECT name FROM tenant") == [("acme",)]
    assert outcomes_recorded(database) == {ours["id"]: "applied", unnamed["id"]: "applied"}
    assert row_counts(database) == {"users": 2, "processed_events": 2, "dead_letters": 0}
    assert metric(scrape, "relay_auth_failures_total", route="webhook", reason="other_tenant") == 1
    [line] = [record for record in log_records(output) if record.get("reason") == "other_tenant"]
    assert (line["message"], line["status"], line["route"]) == ("request refused", 403, "webhook")


def test_the_pinned_tenant_outlives_the_process(database: Database) -> None:
    env = relay_environment(database.conninfo, database.schema)
    with running_relay(env) as relay, relay.client() as client:
        assert post(client, from_tenant("acme")).status_code == 200
    with running_relay(env) as relay, relay.client() as client:
        refused = post(client, from_tenant("globex"))
        accepted = post(client, from_tenant("acme"))

    assert (refused.status_code, accepted.status_code) == (403, 200)


def test_a_body_mixing_two_tenants_is_refused_whole(database: Database) -> None:
    env = relay_environment(database.conninfo, database.schema)
    with running_relay(env) as relay, relay.client() as client:
        refused = post(client, [from_tenant("acme"), from_tenant("globex")])

    assert refused.status_code == 403
    assert refused.json() == {"error": "the body mixes events of tenants ['acme', 'globex']"}
    assert row_counts(database) == {"users": 0, "processed_events": 0, "dead_letters": 0}
    assert database.query("SELECT name FROM tenant") == []


@pytest.mark.anyio
async def test_replicas_racing_to_pin_different_tenants_agree_on_one(database: Database) -> None:
    """Two relays against one schema, each first hearing from a different tenant at the same moment: one
    tenant is pinned, both relays refuse the other's events from then on."""
    pools: list[Pool] = [create_pool(database.conninfo, database.settings) for _ in range(2)]
    for opened in pools:
        await opened.open(wait=True)
    try:
        replicas = [Pipeline(opened, database.settings) for opened in pools]
        for replica in replicas:
            replica.start()

        async def first_event(replica: Pipeline, tenant: str) -> str:
            try:
                await replica.deliver(Delivery("webhook", decode_body(encode(from_tenant(tenant)))))
            except NotAllowed:
                return "refused"
            return "applied"

        answers = await asyncio.gather(first_event(replicas[0], "acme"), first_event(replicas[1], "globex"))
        [(pinned,)] = database.query("SELECT name FROM tenant")
        later = [await first_event(replica, tenant) for replica in replicas for tenant in ("acme", "globex")]
        for replica in replicas:
            await replica.close()
    finally:
        for opened in pools:
            await opened.close()

    assert sorted(answers) == ["applied", "refused"]
    expected = ["applied" if tenant == pinned else "refused" for tenant in ("acme", "globex")]
    assert later == expected * 2
