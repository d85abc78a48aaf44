"""`RELAY_ALLOWED_TENANTS` and `RELAY_ALLOWED_STREAMS`: an authentic request carrying an event from another
tenant or stream is answered 403 and nothing of it is stored, not even a dead letter.

Why 403: the credentials are valid, so 401 would be a lie (promise 5 keeps 401 for bad credentials), and the
event is not ours, so neither applying it nor keeping it as a dead letter (2xx) is right: that would keep
another tenant's personal data and hide a misdirected stream for ever. A 4xx is not retried by Auth0, shows
in its delivery log, and a stream that keeps sending here is eventually disabled, which is what should
happen to it. A body that is not even a JSON object names no origin and is dead-lettered as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from relay.auth0.catch_up import catch_up
from relay.auth0.management import Management
from relay.events import decode_body
from relay.pipeline import Delivery, NotAllowed, Pipeline
from relay.settings import ConfigError, Settings
from tests.support.auth0 import management_api
from tests.support.database import (
    NOTHING_STORED,
    Database,
    assert_stored_as_sent,
    dead_letters,
    insert_dead_letter,
    row_counts,
)
from tests.support.events import cloudevent, encode, fixture
from tests.support.events_api import CREDENTIALS, EVENTS_URL, message, no_wait, stream_response
from tests.support.http import ROUTES, RelayProcess, deliver, relay_command, relay_environment, running_relay

TENANT = "acme"  # the fixtures' a0tenant and a0stream
STREAM = "est_38ANnv8pQhqsZrX2VFbftv"
OTHER_STREAM = "est_0therStream0000000000"
FOREIGN_TENANT_REFUSAL = (
    "events from tenant (a0tenant) 'acme-dev' are not accepted by this relay (RELAY_ALLOWED_TENANTS)"
)


# ---------------------------------------------------------------------------------------------------------
# Settings


def test_allow_lists_are_read_as_sets_of_names() -> None:
    settings = Settings.from_env(
        {"RELAY_ALLOWED_TENANTS": " acme, acme-staging ", "RELAY_ALLOWED_STREAMS": f"{STREAM},{OTHER_STREAM}"}
    )
    assert settings.allowed_tenants == {"acme", "acme-staging"}
    assert settings.allowed_streams == {STREAM, OTHER_STREAM}


def test_allow_lists_are_empty_when_unset_so_any_origin_is_accepted() -> None:
    settings = Settings.from_env({})
    assert (settings.allowed_tenants, settings.allowed_streams) == (frozenset(), frozenset())


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RELAY_ALLOWED_TENANTS", "acme.us.auth0.com"),
        ("RELAY_ALLOWED_TENANTS", "Acme"),
        ("RELAY_ALLOWED_STREAMS", "38ANnv8pQhqsZrX2VFbftv"),
        ("RELAY_ALLOWED_STREAMS", "est_with space"),
    ],
)
def test_a_malformed_allow_list_names_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"^{variable}: expected comma-separated values like"):
        Settings.from_env({variable: value})


# ---------------------------------------------------------------------------------------------------------
# The rule, through the pipeline on real PostgreSQL


async def deliver_body(
    pool: Any,
    database: Database,
    body: bytes,
    *,
    tenants: set[str] | frozenset[str] = frozenset(),
    streams: set[str] | frozenset[str] = frozenset(),
) -> list[Any]:
    """A body through a running pipeline whose allow-lists are set, as the webhook route hands it over."""
    settings = database.with_settings(allowed_tenants=frozenset(tenants), allowed_streams=frozenset(streams))
    pipeline = Pipeline(pool, settings)
    pipeline.start()
    try:
        return await pipeline.deliver(Delivery("webhook", decode_body(body)))
    finally:
        await pipeline.close()


@pytest.mark.anyio
async def test_an_event_from_an_allowed_tenant_and_stream_is_applied(pool: Any, database: Database) -> None:
    event = fixture("user.created")
    [result] = await deliver_body(
        pool, database, encode(event), tenants={TENANT, "acme-dev"}, streams={STREAM}
    )
    assert (result.id, result.outcome) == (event["id"], "applied")
    assert_stored_as_sent(database, event)


REFUSED_BODIES = {
    "another tenant": (encode(cloudevent(a0tenant="acme-dev")), "tenant (a0tenant) 'acme-dev'"),
    "another stream": (
        encode(cloudevent(a0stream=OTHER_STREAM)),
        f"event stream (a0stream) '{OTHER_STREAM}'",
    ),
    "no tenant": (encode(cloudevent(a0tenant=...)), "names no tenant"),
    "no stream": (encode(cloudevent(a0stream=...)), "names no event stream"),
    "a tenant that is not a string": (encode(cloudevent(a0tenant=7)), "names no tenant"),
    "a test event from another tenant": (
        encode(cloudevent("test-event", a0tenant="acme-dev")),
        "'acme-dev'",
    ),
    "an undecodable event from another tenant": (
        encode({"id": "evt_x", "type": "user.created", "a0tenant": "acme-dev", "a0stream": STREAM}),
        "'acme-dev'",
    ),
    "an array with one event from another tenant": (
        encode([fixture("user.created"), cloudevent("user.updated", a0tenant="acme-dev")]),
        "'acme-dev'",
    ),
}


@pytest.mark.anyio
@pytest.mark.parametrize("case", sorted(REFUSED_BODIES))
async def test_an_event_from_elsewhere_is_refused_and_nothing_of_the_body_is_stored(
    pool: Any, database: Database, case: str
) -> None:
    body, reason = REFUSED_BODIES[case]
    with pytest.raises(NotAllowed) as refused:
        await deliver_body(pool, database, body, tenants={TENANT}, streams={STREAM})
    assert reason in str(refused.value)
    assert row_counts(database) == NOTHING_STORED


@pytest.mark.anyio
async def test_a_refusal_never_echoes_an_absurdly_long_tenant_whole(pool: Any, database: Database) -> None:
    with pytest.raises(NotAllowed) as refused:
        await deliver_body(pool, database, encode(cloudevent(a0tenant="x" * 5000)), tenants={TENANT})
    assert str(refused.value) == (
        f"events from tenant (a0tenant) '{'x' * 64}…' are not accepted by this relay (RELAY_ALLOWED_TENANTS)"
    )


@pytest.mark.anyio
async def test_a_body_that_is_not_a_json_object_is_refused_and_not_kept(
    pool: Any, database: Database
) -> None:
    """Issue 10, item 5: it cannot say which tenant it comes from, and it may hold another tenant's data."""
    for body in (b"\x00 not json", b'[{"a0tenant": "acme", "broken":', b"[7]"):
        with pytest.raises(NotAllowed) as refused:
            await deliver_body(pool, database, body, tenants={TENANT}, streams={STREAM})
        assert str(refused.value) == (
            "the body is not a JSON object naming its origin; "
            "this relay takes only those in RELAY_ALLOWED_TENANTS"
        )
    assert row_counts(database) == {"users": 0, "processed_events": 0, "dead_letters": 0}


@pytest.mark.anyio
async def test_only_the_lists_that_are_set_are_checked(pool: Any, database: Database) -> None:
    event = cloudevent(a0stream=OTHER_STREAM)
    [result] = await deliver_body(pool, database, encode(event), tenants={TENANT})
    assert (result.id, result.outcome) == (event["id"], "applied")


def test_replaying_a_dead_letter_from_a_tenant_no_longer_allowed_fails_and_keeps_it(
    database: Database,
) -> None:
    letter_id = insert_dead_letter(database, encode(cloudevent(a0tenant="acme-dev")))

    replayed = relay_command(database, "dead-letters", "replay", RELAY_ALLOWED_TENANTS=TENANT)

    assert replayed.returncode == 1
    assert f"dead letter {letter_id}: failing: events from tenant (a0tenant) 'acme-dev'" in replayed.stdout
    [letter] = dead_letters(database)
    assert (letter.id, letter.resolved) == (letter_id, False)
    assert letter.error == FOREIGN_TENANT_REFUSAL
    assert row_counts(database) == {"users": 0, "processed_events": 0, "dead_letters": 1}


# ---------------------------------------------------------------------------------------------------------
# relay catch-up: the same judgement, event by event

# One event each, as the Events API would carry it; catch-up must judge it as a live route judges a body of
# that one event, and then store what the live route stores.
ONE_EVENT_BODIES = {
    **{case: body for case, (body, _) in REFUSED_BODIES.items() if not case.startswith("an array")},
    "not a JSON object": b"17",
    "ours": encode(fixture("user.created")),
    "ours, from another stream when only tenants are listed": encode(cloudevent(a0stream=OTHER_STREAM)),
    "a test event of ours": encode(fixture("test-event")),
    "an undecodable event of ours": encode(cloudevent("user.updated", user_id=...)),
}


@pytest.mark.anyio
@pytest.mark.parametrize("case", sorted(ONE_EVENT_BODIES))
async def test_catch_up_refuses_exactly_the_events_a_live_route_refuses_and_stores_the_same(
    pool: Any, database: Database, case: str
) -> None:
    body = ONE_EVENT_BODIES[case]
    tenants, streams = {TENANT}, (set() if "only tenants" in case else {STREAM})
    try:
        await deliver_body(pool, database, body, tenants=tenants, streams=streams)
        refused = False
    except NotAllowed:
        refused = True
    assert refused == (case in REFUSED_BODIES or case == "not a JSON object")
    stored_live = row_counts(database)
    database.empty_tables()

    settings = database.with_settings(allowed_tenants=frozenset(tenants), allowed_streams=frozenset(streams))
    with management_api() as auth0:
        auth0.get(EVENTS_URL).mock(
            side_effect=lambda request: stream_response(message("MQ", body) + message("Mg"))
        )
        report = await catch_up(
            Management(CREDENTIALS),
            pool,
            settings,
            since=datetime.fromisoformat("2025-02-01T00:00:00Z"),
            idle_seconds=0.3,
            sleep=no_wait,
        )

    assert (report.refused.total(), report.received) == ((1, 0) if refused else (0, 1))
    assert row_counts(database) == stored_live
    assert database.query("SELECT cursor FROM event_cursors") == [("Mg",)]


# ---------------------------------------------------------------------------------------------------------
# Over HTTP: 403 with the reason, through a real relay process


@pytest.fixture(scope="module")
def relay(shared_database: Database) -> Iterator[RelayProcess]:
    """The module's relay, with both allow-lists set."""
    env = relay_environment(
        shared_database.conninfo,
        shared_database.schema,
        RELAY_ALLOWED_TENANTS=TENANT,
        RELAY_ALLOWED_STREAMS=STREAM,
    )
    with running_relay(env) as process:
        yield process


@pytest.mark.parametrize("route", ROUTES)
def test_over_http_an_allowed_event_is_applied_and_another_tenants_is_403(
    client: httpx.Client, clean_database: Database, route: str
) -> None:
    ours, theirs = fixture("user.created"), cloudevent("user.updated", a0tenant="acme-dev")
    accepted = deliver(client, route, encode(ours), ours["id"])
    refused = deliver(client, route, encode(theirs), theirs["id"])

    assert accepted.status_code == 200, accepted.text
    assert refused.status_code == 403, refused.text
    assert refused.json() == {"error": FOREIGN_TENANT_REFUSAL}
    assert_stored_as_sent(clean_database, ours)
    assert row_counts(clean_database) == {"users": 1, "processed_events": 1, "dead_letters": 0}


def test_over_http_a_webhook_array_with_one_foreign_event_is_403_and_stores_nothing(
    client: httpx.Client, clean_database: Database
) -> None:
    body = encode([fixture("user.created"), cloudevent("user.updated", a0stream=OTHER_STREAM)])
    refused = deliver(client, "webhook", body)

    assert refused.status_code == 403, refused.text
    assert OTHER_STREAM in refused.json()["error"]
    assert row_counts(clean_database) == NOTHING_STORED
