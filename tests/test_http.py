"""The HTTP contract, through a real `relay serve` process on loopback and a real PostgreSQL behind it.

Relay processes are module-scoped (one per configuration and backend) because starting one costs about a
second; each test starts from empty tables instead, so the tests stay independent of each other.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import socket
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from litestar.testing import AsyncTestClient
from prometheus_client import REGISTRY

from relay.app import create_app
from relay.embedded import start_embedded
from relay.migrations import latest_version, migrate
from relay.pipeline import Delivery, EventResult, Pipeline
from tests.support import PROJECT_VERSION
from tests.support.database import (
    NOTHING_STORED,
    Database,
    as_time,
    assert_stored_as_sent,
    dead_letters,
    ledger,
    ledger_row,
    row_counts,
    user_row,
)
from tests.support.events import cloudevent, encode, fixture
from tests.support.http import (
    OTHER_SECRET,
    ROUTES,
    SECOND_WEBHOOK_TOKEN,
    SIGNING_SECRET,
    WEBHOOK_BASIC,
    WEBHOOK_HEADER,
    WEBHOOK_TOKEN,
    RelayProcess,
    credentials,
    deliver,
    outcomes,
    relay_environment,
    running_relay,
    signed_headers,
)

pytestmark = pytest.mark.integration

SMALL_BODY_LIMIT = 2048
ACTION_TIMEOUT_SECONDS = 8  # how long the Action waits for an answer, by default


def padded_event(size: int) -> bytes:
    """A valid user.created event of exactly `size` bytes, padded with an extra profile field."""
    padding = size - len(encode(cloudevent(padding="")))
    assert padding >= 0, f"{size} bytes is smaller than the bare event"
    body = encode(cloudevent(padding="x" * padding))
    assert len(body) == size
    return body


# ---------------------------------------------------------------------------------------------------------
# A relay whose body limit is small (the module's `relay`, in conftest, has the defaults)


@pytest.fixture(scope="module")
def small_body_relay(shared_database: Database) -> Iterator[RelayProcess]:
    env = relay_environment(
        shared_database.conninfo, shared_database.schema, RELAY_MAX_BODY_BYTES=str(SMALL_BODY_LIMIT)
    )
    with running_relay(env) as process:
        yield process


# ---------------------------------------------------------------------------------------------------------
# Every fixture through both routes

SINGLE_EVENT_OUTCOMES = {
    "user.created": "applied",
    "user.updated": "applied",
    "user.deleted": "tombstoned",
    "user.deleted.minimal": "tombstoned",
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", sorted(SINGLE_EVENT_OUTCOMES))
def test_each_user_event_fixture_is_applied_through_each_route(
    client: httpx.Client, clean_database: Database, route: str, name: str
) -> None:
    event = fixture(name)
    response = deliver(client, route, encode(event), event["id"])

    assert response.json() == {"events": [{"id": event["id"], "outcome": SINGLE_EVENT_OUTCOMES[name]}]}
    row = assert_stored_as_sent(clean_database, event)
    user = event["data"]["object"]
    assert row["deleted_at"] == (as_time(user["deleted_at"]) if "deleted_at" in user else None)
    assert ledger(clean_database) == [ledger_row(event, SINGLE_EVENT_OUTCOMES[name])]
    assert dead_letters(clean_database) == []


@pytest.mark.parametrize("route", ROUTES)
def test_test_event_is_recorded_but_never_touches_users(
    client: httpx.Client, clean_database: Database, route: str
) -> None:
    event = fixture("test-event")
    response = deliver(client, route, encode(event), event["id"])

    assert response.json() == {"events": [{"id": event["id"], "outcome": "test"}]}
    assert ledger(clean_database) == [ledger_row(event, "test")]
    assert row_counts(clean_database) == {"users": 0, "processed_events": 1, "dead_letters": 0}


@pytest.mark.parametrize("route", ROUTES)
def test_created_updated_deleted_leave_one_soft_deleted_row(
    client: httpx.Client, clean_database: Database, route: str
) -> None:
    created, updated, deleted = fixture("user.created"), fixture("user.updated"), fixture("user.deleted")
    answers = [outcomes(deliver(client, route, encode(e), e["id"])) for e in (created, updated, deleted)]

    assert answers == [["applied"], ["applied"], ["tombstoned"]]
    user_id = created["data"]["object"]["user_id"]
    assert clean_database.query("SELECT user_id FROM users") == [(user_id,)]
    row = user_row(clean_database, user_id)
    assert row is not None
    assert row["email"] == "Jane.Doe@Example.com"
    assert row["deleted_at"] == as_time(deleted["data"]["object"]["deleted_at"])
    # Soft mode keeps the profile beside the tombstone, fields only the update carried included.
    assert row["phone_number"] == "+15555550100"
    assert row["app_metadata"] == {"plan": "pro"}
    assert row["profile"]["last_ip"] == "203.0.113.7"
    assert row["last_event_id"] == deleted["id"]
    assert ledger(clean_database) == [
        ledger_row(created, "applied"),
        ledger_row(updated, "applied"),
        ledger_row(deleted, "tombstoned"),
    ]


@pytest.mark.parametrize("route", ROUTES)
def test_duplicate_delivery_is_answered_duplicate_and_recorded_once(
    client: httpx.Client, clean_database: Database, route: str
) -> None:
    event = fixture("user.updated")
    body = encode(event)

    assert outcomes(deliver(client, route, body, event["id"])) == ["applied"]
    assert outcomes(deliver(client, route, body, event["id"])) == ["duplicate"]
    assert ledger(clean_database) == [ledger_row(event, "applied")]
    assert row_counts(clean_database) == {"users": 1, "processed_events": 1, "dead_letters": 0}


def test_the_same_event_from_both_routes_is_applied_once(
    client: httpx.Client, clean_database: Database
) -> None:
    event = fixture("user.created")
    body = encode(event)

    assert outcomes(deliver(client, "action", body, event["id"])) == ["applied"]
    assert outcomes(deliver(client, "webhook", body)) == ["duplicate"]
    assert ledger(clean_database) == [ledger_row(event, "applied")]


# ---------------------------------------------------------------------------------------------------------
# Webhook route: credentials and batches


def basic(pair: str) -> str:
    return "Basic " + base64.b64encode(pair.encode()).decode()


WEBHOOK_CREDENTIALS = {
    "bearer": {"authorization": f"Bearer {WEBHOOK_TOKEN}"},
    "second bearer token (rotation)": {"authorization": f"Bearer {SECOND_WEBHOOK_TOKEN}"},
    "basic": {"authorization": basic(WEBHOOK_BASIC)},
    "custom header": {WEBHOOK_HEADER[0]: WEBHOOK_HEADER[1]},
}


@pytest.mark.parametrize("method", sorted(WEBHOOK_CREDENTIALS))
def test_webhook_accepts_each_configured_credential(
    client: httpx.Client, clean_database: Database, method: str
) -> None:
    event = fixture("user.created")
    response = client.post("/events/webhook", content=encode(event), headers=WEBHOOK_CREDENTIALS[method])

    assert outcomes(response) == ["applied"]
    assert_stored_as_sent(clean_database, event)


def test_webhook_array_body_gets_one_outcome_per_event_in_order(
    client: httpx.Client, clean_database: Database
) -> None:
    created, updated, deleted = fixture("user.created"), fixture("user.updated"), fixture("user.deleted")
    test_event = fixture("test-event")
    # Sent newest first: outcomes still read as if the events had come one by one in version order.
    response = deliver(client, "webhook", encode([deleted, test_event, updated, created]))

    assert response.json() == {
        "events": [
            {"id": deleted["id"], "outcome": "tombstoned"},
            {"id": test_event["id"], "outcome": "test"},
            {"id": updated["id"], "outcome": "applied"},
            {"id": created["id"], "outcome": "applied"},
        ]
    }
    row = user_row(clean_database, created["data"]["object"]["user_id"])
    assert row is not None
    assert row["email"] == "Jane.Doe@Example.com"
    assert row["deleted_at"] == as_time(deleted["data"]["object"]["deleted_at"])
    assert row_counts(clean_database) == {"users": 1, "processed_events": 4, "dead_letters": 0}


def test_webhook_array_holding_the_same_event_twice_applies_it_once(
    client: httpx.Client, clean_database: Database
) -> None:
    event = fixture("user.created")
    assert outcomes(deliver(client, "webhook", encode([event, event]))) == ["applied", "duplicate"]
    assert ledger(clean_database) == [ledger_row(event, "applied")]


# ---------------------------------------------------------------------------------------------------------
# Action route: rotation and the webhook-id check


@pytest.mark.parametrize("secret", [SIGNING_SECRET, OTHER_SECRET], ids=["current secret", "other secret"])
def test_action_accepts_either_configured_secret(
    client: httpx.Client, clean_database: Database, secret: str
) -> None:
    event = fixture("user.created")
    body = encode(event)
    headers = signed_headers(body, event["id"], secret=secret)

    assert outcomes(client.post("/events/action", content=body, headers=headers)) == ["applied"]
    assert_stored_as_sent(clean_database, event)


def test_action_accepts_a_header_listing_an_unknown_and_a_valid_signature(
    client: httpx.Client, clean_database: Database
) -> None:
    event = fixture("user.created")
    body = encode(event)
    headers = signed_headers(body, event["id"])
    retired = "v1," + base64.b64encode(b"\x00" * 32).decode()
    headers["webhook-signature"] = f"{retired} {headers['webhook-signature']}"

    assert outcomes(client.post("/events/action", content=body, headers=headers)) == ["applied"]
    assert row_counts(clean_database)["users"] == 1


def test_action_applies_an_event_whose_id_differs_from_its_webhook_id(
    client: httpx.Client, clean_database: Database
) -> None:
    """Standard Webhooks makes `webhook-id` the message id; the relay dedupes on the event's own id."""
    created = fixture("user.created")
    body = encode(created)
    response = client.post(
        "/events/action", content=body, headers=signed_headers(body, "msg_SomeOtherId0000000001")
    )

    assert response.json() == {"events": [{"id": created["id"], "outcome": "applied"}]}
    assert_stored_as_sent(clean_database, created)
    assert ledger(clean_database) == [ledger_row(created, "applied")]
    assert dead_letters(clean_database) == []

    # The same event under yet another message id is still the same event.
    again = client.post("/events/action", content=body, headers=signed_headers(body, "msg_Third000000000001"))
    assert outcomes(again) == ["duplicate"]


# ---------------------------------------------------------------------------------------------------------
# 401: not authentic, nothing stored


def _action_headers_without(header: str) -> dict[str, str]:
    event = fixture("user.created")
    headers = signed_headers(encode(event), event["id"])
    del headers[header]
    return headers


def _action_headers(**changes: Any) -> dict[str, str]:
    event = fixture("user.created")
    return signed_headers(encode(event), event["id"], **changes)


def _signed_over_other_bytes() -> dict[str, str]:
    event = fixture("user.created")
    return signed_headers(encode(event) + b" ", event["id"])


def _stranger_secret() -> dict[str, str]:
    stranger = "whsec_" + base64.b64encode(b"a-secret-the-relay-has-never-seen!!").decode()
    return _action_headers(secret=stranger)


UNAUTHENTIC_REQUESTS: dict[str, tuple[str, Any, str]] = {
    # name: (route, headers factory, reason the 401 body must give)
    "action without webhook-id": (
        "action",
        lambda: _action_headers_without("webhook-id"),
        "missing webhook-id",
    ),
    "action without webhook-timestamp": (
        "action",
        lambda: _action_headers_without("webhook-timestamp"),
        "missing webhook-timestamp",
    ),
    "action without webhook-signature": (
        "action",
        lambda: _action_headers_without("webhook-signature"),
        "missing webhook-signature",
    ),
    "action with no headers at all": ("action", lambda: {}, "missing webhook-id"),
    "action signed over other bytes": (
        "action",
        _signed_over_other_bytes,
        "no webhook-signature entry matches",
    ),
    "action signed with an unknown secret": (
        "action",
        _stranger_secret,
        "no webhook-signature entry matches",
    ),
    "action timestamp too old": (
        "action",
        # Well past the tolerance: the request takes a moment to arrive, and int() drops a fraction of a
        # second.
        lambda: _action_headers(timestamp=int(time.time()) - 330),
        "outside the 300 s tolerance",
    ),
    "action timestamp in the future": (
        "action",
        lambda: _action_headers(timestamp=int(time.time()) + 330),
        "outside the 300 s tolerance",
    ),
    "action timestamp not a number": (
        "action",
        lambda: {**_action_headers(), "webhook-timestamp": "yesterday"},
        "not a Unix time",
    ),
    "webhook with an unknown bearer token": (
        "webhook",
        lambda: {"authorization": "Bearer not-a-configured-token"},
        "unknown credentials",
    ),
    "webhook with a wrong Basic password": (
        "webhook",
        lambda: {"authorization": basic(WEBHOOK_BASIC.split(":")[0] + ":wrong-password")},
        "unknown credentials",
    ),
    "webhook with a wrong custom header value": (
        "webhook",
        lambda: {WEBHOOK_HEADER[0]: "not-the-value"},
        "unknown credentials",
    ),
    "webhook with no credentials": ("webhook", lambda: {}, "missing credentials"),
    "webhook with the action's signature only": (
        "webhook",
        lambda: _action_headers(),
        "missing credentials",
    ),
}


@pytest.mark.parametrize("case", sorted(UNAUTHENTIC_REQUESTS))
def test_unauthentic_request_is_401_with_reason_and_stores_nothing(
    client: httpx.Client, clean_database: Database, case: str
) -> None:
    route, make_headers, reason = UNAUTHENTIC_REQUESTS[case]
    response = client.post(
        f"/events/{route}", content=encode(fixture("user.created")), headers=make_headers()
    )

    assert response.status_code == 401
    assert reason in response.json()["error"]
    assert row_counts(clean_database) == NOTHING_STORED


def test_401_body_never_echoes_the_presented_credential(
    client: httpx.Client, clean_database: Database
) -> None:
    presented = "Bearer near-miss-" + WEBHOOK_TOKEN
    response = client.post("/events/webhook", content=b"{}", headers={"authorization": presented})

    assert response.status_code == 401
    assert "near-miss" not in response.text
    assert WEBHOOK_TOKEN not in response.text


# ---------------------------------------------------------------------------------------------------------
# 413: oversized bodies


@pytest.fixture
def small_client(small_body_relay: RelayProcess, clean_database: Database) -> Iterator[httpx.Client]:
    with small_body_relay.client() as opened:
        yield opened


@pytest.mark.parametrize("route", ROUTES)
def test_body_over_the_limit_is_413_and_stores_nothing(
    small_client: httpx.Client, clean_database: Database, route: str
) -> None:
    body = padded_event(SMALL_BODY_LIMIT + 1)
    response = deliver(small_client, route, body, json.loads(body)["id"])

    assert response.status_code == 413
    assert response.json()["error"]
    assert row_counts(clean_database) == NOTHING_STORED


@pytest.mark.parametrize("route", ROUTES)
def test_chunked_body_over_the_limit_is_413_and_stores_nothing(
    small_client: httpx.Client, clean_database: Database, route: str
) -> None:
    """Without a Content-Length the limit must hold while the body streams in."""
    body = padded_event(4 * SMALL_BODY_LIMIT)
    headers = credentials(route, body, json.loads(body)["id"])
    chunks = (body[start : start + 512] for start in range(0, len(body), 512))
    response = small_client.post(f"/events/{route}", content=chunks, headers=headers)

    assert response.status_code == 413
    assert row_counts(clean_database) == NOTHING_STORED


@pytest.mark.parametrize("size", [SMALL_BODY_LIMIT - 1, SMALL_BODY_LIMIT])
@pytest.mark.parametrize("route", ROUTES)
def test_body_up_to_the_limit_is_accepted(
    small_client: httpx.Client, clean_database: Database, route: str, size: int
) -> None:
    body = padded_event(size)
    event = json.loads(body)

    assert outcomes(deliver(small_client, route, body, event["id"])) == ["applied"]
    assert_stored_as_sent(clean_database, event)


# ---------------------------------------------------------------------------------------------------------
# 405, 408, and 503 for the unforeseen


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_only_post_is_allowed_on_the_event_routes(
    client: httpx.Client, clean_database: Database, route: str, method: str
) -> None:
    response = client.request(method, f"/events/{route}", headers=credentials(route, b"", "evt_1"))

    assert (response.status_code, response.headers["allow"], response.json()) == (
        405,
        "POST",
        {"error": "use POST"},
    )
    assert row_counts(clean_database) == NOTHING_STORED


def test_a_body_that_does_not_arrive_is_answered_408() -> None:
    """A sender that announces a body and stalls is cut off (after 10 s), not left to hold the connection.
    No database is needed to hear it: the body is read before anything is stored."""
    env = relay_environment("postgresql://relay@127.0.0.1:9/nowhere", "auth0")
    with running_relay(env) as relay:
        address = urlsplit(relay.url)
        with socket.create_connection((address.hostname, address.port), timeout=30) as stalled:
            stalled.sendall(
                b"POST /events/webhook HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {WEBHOOK_TOKEN}\r\nContent-Length: 1000\r\n\r\n".encode()
                + b'{"id": "evt_'
            )
            answer = b""
            while b"}" not in answer.partition(b"\r\n\r\n")[2]:
                chunk = stalled.recv(4096)
                assert chunk, f"connection closed without an answer: {answer!r}"
                answer += chunk

    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ")
    assert json.loads(body) == {"error": "body not received within 10 s"}


@pytest.mark.anyio
async def test_an_unforeseen_error_is_answered_503_and_counted_never_500(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the relay's own code (injected here) leaves nothing committed: Auth0 may retry, and a 500
    would only count toward disabling the stream."""

    async def broken(self: Pipeline, delivery: Delivery) -> list[EventResult]:
        raise RuntimeError("a bug in the relay's own code")

    monkeypatch.setattr(Pipeline, "deliver", broken)
    internal = {"cause": "internal"}
    before = REGISTRY.get_sample_value("relay_unavailable_total", internal) or 0
    app = create_app(database.with_settings(webhook_tokens=(WEBHOOK_TOKEN,)), database.conninfo)
    async with AsyncTestClient(app) as client:
        response = await client.post(
            "/events/webhook",
            content=encode(fixture("user.created")),
            headers=credentials("webhook", b"", ""),
        )

    assert response.status_code == 503
    assert int(response.headers["retry-after"]) > 0
    assert response.json() == {"error": "the relay could not take the events; retry later"}
    assert (REGISTRY.get_sample_value("relay_unavailable_total", internal) or 0) == before + 1
    assert row_counts(database) == NOTHING_STORED


# ---------------------------------------------------------------------------------------------------------
# Health and readiness


def test_healthz_answers_200(client: httpx.Client) -> None:
    response = client.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


def test_readyz_answers_200_on_a_migrated_schema(client: httpx.Client) -> None:
    response = client.get("/readyz")
    assert (response.status_code, response.json()) == (
        200,
        {"status": "ready", "migration": latest_version(), "version": PROJECT_VERSION},
    )


def test_readyz_answers_503_when_the_schema_is_not_migrated(database_server: str) -> None:
    missing_schema = "never_migrated_" + secrets.token_hex(6)
    with (
        running_relay(relay_environment(database_server, missing_schema)) as unmigrated,
        unmigrated.client() as client,
    ):
        response = client.get("/readyz")
        assert response.status_code == 503
        assert "relay migrate" in response.json()["error"]
        assert int(response.headers["retry-after"]) > 0
        assert client.get("/healthz").status_code == 200  # alive, just not ready

        event = fixture("user.created")
        for route in ROUTES:
            delivered = deliver(client, route, encode(event), event["id"])
            assert delivered.status_code == 503, delivered.text
            assert "relay migrate" in delivered.json()["error"]
            assert int(delivered.headers["retry-after"]) > 0


# ---------------------------------------------------------------------------------------------------------
# A real database outage


def _post_until_not_503(client: httpx.Client, body: bytes, event_id: str, seconds: float) -> httpx.Response:
    deadline = time.monotonic() + seconds
    while True:
        response = deliver(client, "action", body, event_id)
        if response.status_code != 503 or time.monotonic() > deadline:
            return response
        time.sleep(0.2)


def test_database_outage_answers_503_then_the_retry_is_applied(tmp_path: Any) -> None:
    server = start_embedded(tmp_path / "outage", stop_at_exit=False)
    try:
        asyncio.run(migrate(server.conninfo, "outage"))
        database = Database(server.conninfo, "outage")
        with running_relay(relay_environment(server.conninfo, "outage")) as relay, relay.client() as client:
            assert client.get("/readyz").status_code == 200

            server.handle.stop()
            event = fixture("user.created")
            body = encode(event)
            # A sender that waits no longer than the Action does (RELAY_TIMEOUT_MS' default, 8 s) still hears
            # the 503: the relay answers, it does not hang on the missing database.
            with httpx.Client(base_url=relay.url, timeout=ACTION_TIMEOUT_SECONDS) as impatient:
                for route in ROUTES:
                    response = deliver(impatient, route, body, event["id"])
                    assert response.status_code == 503, response.text
                    assert int(response.headers["retry-after"]) > 0
                    assert response.json() == {"error": "database unavailable; retry later"}
            assert client.get("/readyz").status_code == 503

            server.handle.start()
            response = _post_until_not_503(client, body, event["id"], seconds=15)
            assert outcomes(response) == ["applied"]
            assert_stored_as_sent(database, event)
            assert client.get("/readyz").status_code == 200
    finally:
        server.handle.stop()
