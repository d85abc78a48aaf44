"""`POST /events/eventbridge`, for an EventBridge API destination, through a real `relay serve` process and a
real PostgreSQL: both body shapes (the EventBridge event, and the bare CloudEvent an input transformer sends
with `<$.detail>`), the connection's credentials, and status codes chosen for EventBridge's retry rules
(2xx after the commit, 401, 403; 503 with Retry-After is shown with PostgreSQL stopped, in
test_eventbridge.py). moto cannot deliver to an API destination, so the tests post what one would."""

from __future__ import annotations

import base64
import time

import httpx
import pytest

from tests.support.aws import LOG_STREAM_SOURCE, PARTNER_SOURCE, eventbridge_event
from tests.support.database import (
    NOTHING_STORED,
    Database,
    assert_stored_as_sent,
    dead_letters,
    ledger,
    ledger_row,
    row_counts,
)
from tests.support.events import cloudevent, encode, fixture
from tests.support.http import (
    SECRET_HEADERS,
    WEBHOOK_BASIC,
    WEBHOOK_HEADER,
    WEBHOOK_TOKEN,
    deliver,
    metric,
    outcomes,
)

pytestmark = pytest.mark.integration

# EventBridge gives an API destination 5 s to answer.
API_DESTINATION_TIMEOUT_SECONDS = 5
ROUTE_200 = {"path": "/events/eventbridge", "status_code": "200"}
CONNECTION_CREDENTIALS = {
    "API key (Authorization: Bearer)": {"authorization": f"Bearer {WEBHOOK_TOKEN}"},
    "Basic": {"authorization": "Basic " + base64.b64encode(WEBHOOK_BASIC.encode()).decode()},
    "API key (custom header)": {WEBHOOK_HEADER[0]: WEBHOOK_HEADER[1]},
}


def post(client: httpx.Client, body: bytes, headers: dict[str, str]) -> httpx.Response:
    started = time.monotonic()
    response = client.post(
        "/events/eventbridge", content=body, headers={"content-type": "application/json", **headers}
    )
    assert time.monotonic() - started < API_DESTINATION_TIMEOUT_SECONDS
    return response


@pytest.mark.parametrize("shape", ["EventBridge event", "bare CloudEvent (input transformer)"])
@pytest.mark.parametrize("credential", sorted(CONNECTION_CREDENTIALS))
def test_each_shape_with_each_connection_credential_is_applied_after_the_commit(
    client: httpx.Client, clean_database: Database, shape: str, credential: str
) -> None:
    event = fixture("user.created")
    body = encode(eventbridge_event(event) if shape == "EventBridge event" else event)
    response = post(client, body, CONNECTION_CREDENTIALS[credential])

    assert response.json() == {"events": [{"id": event["id"], "outcome": "applied"}]}
    assert_stored_as_sent(clean_database, event)
    assert ledger(clean_database) == [ledger_row(event, "applied")]


def test_duplicates_stale_events_and_test_events_are_acknowledged(
    client: httpx.Client, clean_database: Database
) -> None:
    updated, created, test_event = fixture("user.updated"), fixture("user.created"), fixture("test-event")
    assert outcomes(deliver(client, "eventbridge", encode(eventbridge_event(updated)))) == ["applied"]
    assert outcomes(deliver(client, "eventbridge", encode(eventbridge_event(updated)))) == ["duplicate"]
    assert outcomes(deliver(client, "eventbridge", encode(created))) == ["stale"]
    assert outcomes(deliver(client, "eventbridge", encode(eventbridge_event(test_event)))) == ["test"]
    assert_stored_as_sent(clean_database, updated)


@pytest.mark.parametrize("shape", ["EventBridge event", "bare body"])
def test_an_authentic_undecodable_event_is_a_dead_letter_answered_200(
    client: httpx.Client, clean_database: Database, shape: str
) -> None:
    broken = cloudevent("user.created", email=["not", "a", "string"])
    body = encode(eventbridge_event(broken)) if shape == "EventBridge event" else b"not json at all"
    [answer] = deliver(client, "eventbridge", body).json()["events"]

    assert answer["outcome"] == "dead_lettered"
    [letter] = dead_letters(clean_database)
    assert letter.route == "eventbridge"
    # The CloudEvent is kept, not its envelope, so `relay dead-letters replay` reads it like any other.
    assert letter.body == (encode(broken) if shape == "EventBridge event" else body)
    assert not set(letter.headers) & set(SECRET_HEADERS)
    assert row_counts(clean_database) == {"users": 0, "processed_events": 0, "dead_letters": 1}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer wrong-token"},
        {"authorization": "Basic " + base64.b64encode(b"a:b").decode()},
        {WEBHOOK_HEADER[0]: "wrong"},
    ],
    ids=["none", "unknown bearer", "unknown basic", "wrong custom header"],
)
def test_bad_credentials_are_401_and_nothing_is_stored(
    client: httpx.Client, clean_database: Database, headers: dict[str, str]
) -> None:
    response = post(client, encode(eventbridge_event(fixture("user.created"))), headers)
    assert response.status_code == 401
    assert "error" in response.json()
    assert row_counts(clean_database) == NOTHING_STORED


@pytest.mark.parametrize(
    ("source", "detail_type", "reason"),
    [
        (LOG_STREAM_SOURCE, "Auth0 log", "Log Streams"),
        ("aws.partner/example.com/acme/events", "user.created", "not an Auth0 partner event source"),
        ("com.example.app", "user.created", "not an Auth0 partner event source"),
    ],
    ids=["Log Streams envelope", "another partner's source", "a custom source"],
)
def test_a_source_outside_the_allow_list_is_403_and_nothing_is_stored(
    client: httpx.Client, clean_database: Database, source: str, detail_type: str, reason: str
) -> None:
    body = encode(eventbridge_event(fixture("user.created"), source=source, detail_type=detail_type))
    response = post(client, body, CONNECTION_CREDENTIALS["Basic"])
    assert response.status_code == 403
    assert reason in response.json()["error"]
    assert row_counts(clean_database) == NOTHING_STORED


def test_another_tenant_than_the_schema_holds_is_403(client: httpx.Client, clean_database: Database) -> None:
    first = fixture("user.created")
    assert outcomes(deliver(client, "eventbridge", encode(eventbridge_event(first)))) == ["applied"]
    other = cloudevent(
        "user.created", id="evt_0therTenant0000000000000", a0tenant="globex", user_id="auth0|g"
    )
    response = deliver(client, "eventbridge", encode(eventbridge_event(other, source=PARTNER_SOURCE)))
    assert response.status_code == 403
    assert "globex" in response.json()["error"]
    assert ledger(clean_database) == [ledger_row(first, "applied")]


def test_the_route_counts_its_answers(client: httpx.Client, clean_database: Database) -> None:
    before = metric(client.get("/metrics").text, "relay_http_requests_total", **ROUTE_200)
    deliver(client, "eventbridge", encode(eventbridge_event(fixture("user.created"))))
    after = metric(client.get("/metrics").text, "relay_http_requests_total", **ROUTE_200)
    assert after == before + 1
    assert row_counts(clean_database)["users"] == 1
