"""Promise 5 under hostile input: an authentic request whose body is unusable is kept in `dead_letters` and
answered 200, so one bad event can never disable the stream; it never yields a 500 and never a `users` row.

Through a real `relay serve` process (module-scoped; each test starts from empty tables) on real PostgreSQL.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import event as count_in_statistics
from hypothesis import strategies as st
from psycopg import sql

from tests.conftest import TestDatabase as Database  # aliased: pytest would try to collect Test*
from tests.support import (
    WEBHOOK_BASIC,
    WEBHOOK_HEADER,
    RelayProcess,
    encode,
    fixture,
    relay_environment,
    running_relay,
    signed_headers,
)
from tests.test_http import (
    JSON_COLUMNS,
    ROUTES,
    TEXT_COLUMNS,
    TYPED_COLUMNS,
    as_time,
    deliver,
    expected_typed_columns,
    migrated_schema,
    row_counts,
)

pytestmark = pytest.mark.integration

# Request headers that carry a credential: a dead letter must never keep them.
SECRET_HEADERS = ("authorization", "webhook-signature", WEBHOOK_HEADER[0].lower())
NOTHING_STORED = {"users": 0, "processed_events": 0, "dead_letters": 0}


@pytest.fixture(scope="module")
def shared_database(database_server: str) -> Iterator[Database]:
    with migrated_schema(database_server, prefix="test_bad_input_") as database:
        yield database


@pytest.fixture(scope="module")
def relay(shared_database: Database) -> Iterator[RelayProcess]:
    with running_relay(relay_environment(shared_database.conninfo, shared_database.schema)) as process:
        yield process


def dead_letter(database: Database, letter_id: int) -> dict[str, Any]:
    [(route, body, headers, error)] = database.query(
        "SELECT route, body, headers, error FROM dead_letters WHERE id = %s", [letter_id]
    )
    return {"route": route, "body": bytes(body), "headers": headers, "error": error}


def assert_kept_safely(letter: dict[str, Any], route: str, body: bytes) -> None:
    assert letter["route"] == route
    assert letter["body"] == body
    assert letter["error"]
    assert not set(letter["headers"]) & set(SECRET_HEADERS), letter["headers"]


def dead_lettered_answers(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    answers: list[dict[str, Any]] = response.json()["events"]
    for answer in answers:
        assert answer["outcome"] == "dead_lettered", answer
        assert isinstance(answer["dead_letter_id"], int)
        assert answer["error"]
    return answers


def event_with(name: str = "user.created", **changes: Any) -> dict[str, Any]:
    """A fixture event with top-level fields, or `data.object` fields (prefixed `object_`), changed."""
    event = fixture(name)
    for key, value in changes.items():
        if key.startswith("object_"):
            event["data"]["object"][key.removeprefix("object_")] = value
        else:
            event[key] = value
    return event


def nested_json(depth: int) -> bytes:
    """`{"a":{"a":…1…}}`, built as bytes: the standard library cannot encode what it is meant to test."""
    return b'{"a":' * depth + b"1" + b"}" * depth


def claimed_event_id(body: bytes) -> str:
    """The event id a body seems to carry, for the signature: so the action route cannot dead-letter it
    merely because webhook-id and the event id differ."""
    found = re.search(rb'"id":"([!-~]{1,255}?)"', body)
    return found[1].decode() if found else "evt_6SfwXrtm8nVcjzzNCFFH1L"


CREATED = encode(fixture("user.created"))
DEEP = 10_000  # far beyond any decoder's recursion limit, yet ~60 kB: well inside the body limit

WHOLE_BODY_FAILURES: dict[str, bytes] = {
    "random bytes": b"\x8f\x00\xfe\xffnot json at all\x01\x02",
    "an empty body": b"",
    "truncated JSON": CREATED[:-7],
    "a truncated JSON array": b"[" + CREATED,
    "invalid UTF-8 in the event id": CREATED.replace(b'"evt_', b'"evt_\xff\xfe'),
    "invalid UTF-8 in a profile string": CREATED.replace(b"jane@", b"ja\xc3\x28ne@"),
    "invalid UTF-8 in a field name": CREATED.replace(b'"nickname"', b'"nick\xffname"'),
    "an overlong UTF-8 encoding": CREATED.replace(b"jane@", b"ja\xc0\xafne@"),
    "a lone surrogate escape": CREATED.replace(b"jane@", b"ja\\ud800ne@"),
    "JSON null": b"null",
    "a JSON string": b'"user.created"',
    "a JSON number": b"42",
    "an empty JSON object": b"{}",
    "the id as a number": encode(event_with(id=42)),
    "an empty id": encode(event_with(id="")),
    "a time without a zone": encode(event_with(time="2025-02-02T17:56:01")),
    "a time that is not a date": encode(event_with(time="yesterday")),
    "the type as an object": encode(event_with(type={"name": "user.created"})),
    "data.object as a list": encode(event_with(data={"object": [1, 2]})),
    "no data.object on a user event": encode(event_with(data={})),
    "user_id as a number": encode(event_with(object_user_id=679)),
    "an empty user_id": encode(event_with(object_user_id="")),
    "email_verified as a string": encode(event_with(object_email_verified="yes")),
    "logins_count negative": encode(event_with(object_logins_count=-1)),
    "logins_count beyond bigint": encode(event_with(object_logins_count=2**63)),
    "logins_count as a fraction": encode(event_with(object_logins_count=2.5)),
    "identities as an object": encode(event_with(object_identities={"provider": "auth0"})),
    "created_at not a date": encode(event_with(object_created_at="last tuesday")),
    "app_metadata as a list": encode(event_with(object_app_metadata=["plan", "pro"])),
    "a deeply nested array body": b"[" * DEEP + b"]" * DEEP,
    "a deeply nested object body": nested_json(DEEP),
    "deep nesting inside data.object": CREATED.replace(
        b'"object":{', b'"object":{"deep":' + nested_json(DEEP) + b","
    ),
    "deep nesting beside the envelope": CREATED.replace(
        b'"data":{', b'"extension":' + nested_json(DEEP) + b',"data":{'
    ),
    "a huge event id": encode(event_with(id="evt_" + "x" * 100_000)),
    "a huge event type": encode(event_with(type="user." + "x" * 100_000)),
    "a huge user_id": encode(event_with(object_user_id="auth0|" + "x" * 100_000)),
    # Decodable, but PostgreSQL refuses it: jsonb and text cannot hold U+0000.
    "a NUL character in a profile string": encode(event_with(object_name="Jane\u0000Doe")),
    "a NUL character in a metadata key": encode(event_with(object_user_metadata={"k\u0000": 1})),
    "a NUL character in the user_id": encode(event_with(object_user_id="auth0|\u0000")),
    "a NUL character in an unhandled event type": encode(event_with(type="user.\u0000renamed")),
    "a profile time zone offset PostgreSQL refuses": encode(
        event_with(object_updated_at="2025-02-02T17:56:01+23:59")
    ),
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", sorted(WHOLE_BODY_FAILURES))
def test_unusable_body_is_dead_lettered_as_sent(
    client: httpx.Client, clean_database: Database, case: str, route: str
) -> None:
    body = WHOLE_BODY_FAILURES[case]
    response = deliver(client, route, body, claimed_event_id(body))

    [answer] = dead_lettered_answers(response)
    assert_kept_safely(dead_letter(clean_database, answer["dead_letter_id"]), route, body)
    assert row_counts(clean_database) == {"users": 0, "processed_events": 0, "dead_letters": 1}


def test_dead_letter_keeps_diagnostic_headers_but_no_credential(
    client: httpx.Client, clean_database: Database
) -> None:
    body = b"{not json"
    headers = {
        **signed_headers(body, "evt_6SfwXrtm8nVcjzzNCFFH1L"),
        "user-agent": "Auth0-Event-Streams/1.0",
        "x-request-id": "req-123",
    }
    [answer] = dead_lettered_answers(client.post("/events/action", content=body, headers=headers))

    letter = dead_letter(clean_database, answer["dead_letter_id"])
    assert letter["headers"]["user-agent"] == "Auth0-Event-Streams/1.0"
    assert letter["headers"]["x-request-id"] == "req-123"
    assert letter["headers"]["webhook-id"] == "evt_6SfwXrtm8nVcjzzNCFFH1L"
    assert "webhook-signature" not in letter["headers"]


@pytest.mark.parametrize(
    "credential",
    [
        {"authorization": "Basic " + base64.b64encode(WEBHOOK_BASIC.encode()).decode()},
        {WEBHOOK_HEADER[0]: WEBHOOK_HEADER[1]},
    ],
    ids=["basic", "custom header"],
)
def test_dead_letter_never_keeps_a_webhook_credential(
    client: httpx.Client, clean_database: Database, credential: dict[str, str]
) -> None:
    body = b"\x00\x01 garbage"
    [answer] = dead_lettered_answers(client.post("/events/webhook", content=body, headers=credential))

    letter = dead_letter(clean_database, answer["dead_letter_id"])
    assert_kept_safely(letter, "webhook", body)
    assert WEBHOOK_HEADER[1] not in json.dumps(letter["headers"])
    assert "password" not in json.dumps(letter["headers"])


# Each: (the bad event, whether it fails to decode or is refused later by PostgreSQL).
MIXED_BATCH_BAD_EVENTS = {
    "undecodable": event_with("user.updated", object_user_id=42),
    "refused by PostgreSQL": event_with("user.updated", object_name="Jane\u0000Doe"),
}


@pytest.mark.parametrize("bad_kind", sorted(MIXED_BATCH_BAD_EVENTS))
def test_array_mixing_good_and_bad_applies_the_good_and_dead_letters_the_bad(
    client: httpx.Client, clean_database: Database, bad_kind: str
) -> None:
    good = fixture("user.created")
    bad = MIXED_BATCH_BAD_EVENTS[bad_kind]
    response = deliver(client, "webhook", encode([good, bad]))

    assert response.status_code == 200, response.text
    good_answer, bad_answer = response.json()["events"]
    assert good_answer == {"id": good["id"], "outcome": "applied"}
    assert bad_answer["outcome"] == "dead_lettered"
    assert_kept_safely(dead_letter(clean_database, bad_answer["dead_letter_id"]), "webhook", encode(bad))
    assert clean_database.query("SELECT user_id, email, name FROM users") == [
        (good["data"]["object"]["user_id"], "jane@example.com", "jane@example.com")
    ]
    assert clean_database.query("SELECT event_id, outcome FROM processed_events") == [(good["id"], "applied")]


def test_signed_array_mixing_good_and_undecodable_on_the_action_route(
    client: httpx.Client, clean_database: Database
) -> None:
    good = fixture("user.created")
    bad = {"id": good["id"], "type": "user.updated", "time": "not a time"}
    response = deliver(client, "action", encode([good, bad]), good["id"])

    assert response.status_code == 200, response.text
    good_answer, bad_answer = response.json()["events"]
    assert good_answer == {"id": good["id"], "outcome": "applied"}
    assert bad_answer["outcome"] == "dead_lettered"
    assert_kept_safely(dead_letter(clean_database, bad_answer["dead_letter_id"]), "action", encode(bad))
    assert row_counts(clean_database) == {"users": 1, "processed_events": 1, "dead_letters": 1}


TEST_EVENTS_WITH_UNUSABLE_USER_ID = {
    "invalid UTF-8": encode(fixture("test-event")).replace(b"test-user", b"te\xffst"),
    "a NUL character": encode(event_with("test-event", data={"object": {"user_id": "auth0|\u0000"}})),
    "a number": encode(event_with("test-event", data={"object": {"user_id": 42}})),
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", sorted(TEST_EVENTS_WITH_UNUSABLE_USER_ID))
def test_test_event_with_an_unusable_user_id_is_acknowledged_without_a_user(
    client: httpx.Client, clean_database: Database, case: str, route: str
) -> None:
    """Its user_id only labels the ledger row, so the event may be recorded as a test or dead-lettered."""
    body = TEST_EVENTS_WITH_UNUSABLE_USER_ID[case]
    response = deliver(client, route, body, fixture("test-event")["id"])

    assert response.status_code == 200, response.text
    [answer] = response.json()["events"]
    if answer["outcome"] == "test":
        assert clean_database.query("SELECT outcome FROM processed_events") == [("test",)]
    else:
        assert answer["outcome"] == "dead_lettered"
        assert_kept_safely(dead_letter(clean_database, answer["dead_letter_id"]), route, body)
    assert row_counts(clean_database)["users"] == 0


@pytest.mark.parametrize("route", ROUTES)
def test_huge_but_well_formed_value_is_stored_intact(
    client: httpx.Client, clean_database: Database, route: str
) -> None:
    name = "Ж" * 100_000  # 200 kB of UTF-8, within the default 256 KiB limit
    event = event_with(object_name=name)
    body = json.dumps(event, ensure_ascii=False).encode()
    response = deliver(client, route, body, event["id"])

    assert response.json() == {"events": [{"id": event["id"], "outcome": "applied"}]}
    assert clean_database.query("SELECT name FROM users") == [(name,)]


@pytest.mark.parametrize("route", ROUTES)
def test_event_time_with_an_unusual_offset_is_the_same_instant(
    client: httpx.Client, clean_database: Database, route: str
) -> None:
    # RFC 3339 allows offsets PostgreSQL's own parser refuses (beyond ±15:59); the instant is still clear.
    event = event_with(time="2025-02-02T17:56:01+23:59")
    response = deliver(client, route, encode(event), event["id"])

    assert response.json() == {"events": [{"id": event["id"], "outcome": "applied"}]}
    [(last_event_processed,)] = clean_database.query("SELECT last_event_processed FROM users")
    assert last_event_processed == datetime(2025, 2, 1, 17, 57, 1, tzinfo=UTC)


# ---------------------------------------------------------------------------------------------------------
# Properties: whatever an authentic sender posts, the answer is 200 and the event applied or dead-lettered.

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=16,
)

OFFSETS = [timezone(timedelta(minutes=minutes)) for minutes in (0, 330, -480, 14 * 60, -12 * 60, 45)]
valid_times = st.datetimes(
    min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.sampled_from(OFFSETS)
).map(lambda moment: moment.isoformat().replace("+00:00", "Z"))
valid_identities = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "connection": st.text(max_size=20),
            "provider": st.text(max_size=20),
            "user_id": st.text(max_size=20) | st.integers(-(2**63), 2**63 - 1),
            "isSocial": st.booleans(),
            "profileData": st.dictionaries(st.text(max_size=8), json_values, max_size=3),
        },
    ),
    max_size=3,
)
VALID_FIELD_VALUES = {
    **{column: st.none() | st.text(max_size=30) for column in TEXT_COLUMNS},
    "email_verified": st.none() | st.booleans(),
    "phone_verified": st.none() | st.booleans(),
    "blocked": st.none() | st.booleans(),
    "created_at": st.none() | valid_times,
    "updated_at": st.none() | valid_times,
    "last_login": st.none() | valid_times,
    "deleted_at": st.none() | valid_times,
    "logins_count": st.none() | st.integers(0, 2**63 - 1),
    "identities": st.none() | valid_identities,
    "app_metadata": st.none() | st.dictionaries(st.text(max_size=8), json_values, max_size=4),
    "user_metadata": st.none() | st.dictionaries(st.text(max_size=8), json_values, max_size=4),
}
KNOWN_FIELDS = {"user_id", *VALID_FIELD_VALUES}


@st.composite
def user_objects(draw: st.DrawFn) -> tuple[Any, bool]:
    """A `data.object`, and whether every field of it was drawn from what Auth0 may send.

    Every field is absent or valid, except that a third of the objects get one field (user_id included)
    set to an arbitrary JSON value. The test prefixes a string user_id, so each example has its own user.
    """
    corrupt = draw(st.integers(0, 2)) == 0
    corrupted = draw(st.sampled_from(["user_id", *VALID_FIELD_VALUES])) if corrupt else None
    user: dict[str, Any] = {"user_id": draw(st.text(max_size=40))}
    for name, valid in VALID_FIELD_VALUES.items():
        if draw(st.booleans()):
            user[name] = draw(valid)
    if corrupted is not None:
        user[corrupted] = draw(json_values)
    extras = draw(
        st.dictionaries(
            st.text(max_size=10).filter(lambda key: key not in KNOWN_FIELDS), json_values, max_size=3
        )
    )
    return {**user, **extras}, corrupted is None


# Two parts user-shaped objects to one part arbitrary JSON, which is nearly always dead-lettered.
any_data_object = st.one_of(user_objects(), user_objects(), json_values.map(lambda value: (value, False)))


SCALAR_COLUMNS = tuple(column for column in TYPED_COLUMNS if column not in JSON_COLUMNS)
JSON_CHECKS = (*JSON_COLUMNS, "profile")


def typed_columns_mismatches(database: Database, user: dict[str, Any]) -> dict[str, Any]:
    """Columns that differ from `user`; JSON ones are compared by PostgreSQL, as jsonb, exactly."""
    statement = sql.SQL("SELECT {scalars}, {checks} FROM users WHERE user_id = %(user_id)s").format(
        scalars=sql.SQL(", ").join(map(sql.Identifier, SCALAR_COLUMNS)),
        checks=sql.SQL(", ").join(
            sql.SQL("{} IS NOT DISTINCT FROM {}::jsonb").format(sql.Identifier(name), sql.Placeholder(name))
            for name in JSON_CHECKS
        ),
    )
    sent = {name: None if user.get(name) is None else json.dumps(user[name]) for name in JSON_COLUMNS}
    [row] = database.query(statement, {"user_id": user["user_id"], "profile": json.dumps(user), **sent})
    expected = expected_typed_columns(user)
    mismatches: dict[str, Any] = {
        name: (found, expected[name])
        for name, found in zip(SCALAR_COLUMNS, row, strict=False)
        if found != expected[name]
    }
    for name, same in zip(JSON_CHECKS, row[len(SCALAR_COLUMNS) :], strict=True):
        if not same:
            mismatches[name] = "differs from what was sent"
    return mismatches


PROPERTY_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def assert_all_dead_lettered_as_sent(
    database: Database, response: httpx.Response, route: str, body: bytes
) -> None:
    answers = dead_lettered_answers(response)
    letters = [dead_letter(database, answer["dead_letter_id"]) for answer in answers]
    for letter in letters:
        assert letter["route"] == route
        assert letter["body"] in body  # the whole body, or one element of a JSON array
        assert not set(letter["headers"]) & set(SECRET_HEADERS)
    if not answers:
        assert json.loads(body) == [], "only an empty JSON array may yield no outcome"
    if len(answers) == 1 and not body.lstrip().startswith(b"["):
        assert letters[0]["body"] == body


@PROPERTY_SETTINGS
@given(body=st.binary(max_size=2_000), route=st.sampled_from(ROUTES))
def test_arbitrary_bytes_are_dead_lettered(
    client: httpx.Client, clean_database: Database, body: bytes, route: str
) -> None:
    users_before = row_counts(clean_database)["users"]
    response = deliver(client, route, body, "evt_6SfwXrtm8nVcjzzNCFFH1L")

    assert_all_dead_lettered_as_sent(clean_database, response, route, body)
    assert row_counts(clean_database)["users"] == users_before


@PROPERTY_SETTINGS
@given(value=json_values, route=st.sampled_from(ROUTES))
def test_arbitrary_json_values_are_dead_lettered(
    client: httpx.Client, clean_database: Database, value: Any, route: str
) -> None:
    body = encode(value) if isinstance(value, (dict, list)) else json.dumps(value).encode()
    users_before = row_counts(clean_database)["users"]
    response = deliver(client, route, body, "evt_6SfwXrtm8nVcjzzNCFFH1L")

    assert_all_dead_lettered_as_sent(clean_database, response, route, body)
    if isinstance(value, list):
        stored = [dead_letter(clean_database, a["dead_letter_id"])["body"] for a in response.json()["events"]]
        assert stored == [
            encode(item) if isinstance(item, (dict, list)) else json.dumps(item).encode() for item in value
        ]
    assert row_counts(clean_database)["users"] == users_before


def envelope(event_type: str, data_object: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "type": event_type,
        "source": "urn:auth0:acme.us.auth0.com",
        "id": "evt_" + secrets.token_hex(11),
        "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "data": {"object": data_object},
        "a0tenant": "acme",
        "a0stream": "est_38ANnv8pQhqsZrX2VFbftv",
    }


@PROPERTY_SETTINGS
@given(
    drawn=any_data_object,
    event_type=st.sampled_from(["user.created", "user.updated", "user.deleted"]),
    route=st.sampled_from(ROUTES),
)
def test_arbitrary_data_object_is_applied_as_sent_or_dead_lettered(
    client: httpx.Client, clean_database: Database, drawn: tuple[Any, bool], event_type: str, route: str
) -> None:
    user, surely_valid = drawn
    if isinstance(user, dict) and isinstance(user.get("user_id"), str):
        user["user_id"] = f"hypothesis|{secrets.token_hex(8)}|{user['user_id']}"
    event = envelope(event_type, user)
    body = encode(event)
    surely_valid = surely_valid and "\\u0000" not in body.decode()
    response = deliver(client, route, body, event["id"])

    assert response.status_code == 200, response.text
    [answer] = response.json()["events"]
    count_in_statistics(f"{answer['outcome']} ({'valid' if surely_valid else 'maybe invalid'} fields)")
    assert answer.get("id", event["id"]) == event["id"]
    if answer["outcome"] == "dead_lettered":
        assert not surely_valid, f"a valid event was dead-lettered: {answer['error']}"
        assert dead_letter(clean_database, answer["dead_letter_id"])["body"] == body
        user_id = user.get("user_id") if isinstance(user, dict) else None
        if isinstance(user_id, str) and "\x00" not in user_id:  # a NUL cannot even be asked about
            assert clean_database.query("SELECT 1 FROM users WHERE user_id = %s", [user_id]) == []
        return
    assert answer["outcome"] == ("tombstoned" if event_type == "user.deleted" else "applied")
    assert typed_columns_mismatches(clean_database, user) == {}
    [(deleted_at,)] = clean_database.query(
        "SELECT deleted_at FROM users WHERE user_id = %s", [user["user_id"]]
    )
    if event_type != "user.deleted":
        assert deleted_at is None
    else:
        assert deleted_at == (as_time(user.get("deleted_at")) or as_time(event["time"]))


# ---------------------------------------------------------------------------------------------------------
# The same bodies without valid credentials: 401, nothing stored.


def _unsigned(route: str, body: bytes) -> dict[str, str]:
    return {"content-type": "application/json"}


def _stale_signature(route: str, body: bytes) -> dict[str, str]:
    # On the webhook route a signature is no credential at all: "missing credentials".
    return signed_headers(body, "evt_6SfwXrtm8nVcjzzNCFFH1L", timestamp=int(time.time()) - 3600)


def _wrong_token(route: str, body: bytes) -> dict[str, str]:
    if route == "action":
        return signed_headers(body + b"tampered", "evt_6SfwXrtm8nVcjzzNCFFH1L")
    return {"authorization": "Bearer not-a-configured-token"}


BAD_CREDENTIALS = [_unsigned, _stale_signature, _wrong_token]


@PROPERTY_SETTINGS
@given(
    body=st.binary(max_size=2_000)
    | json_values.map(lambda value: json.dumps(value).encode())
    | any_data_object.map(lambda drawn: encode(envelope("user.created", drawn[0]))),
    route=st.sampled_from(ROUTES),
    make_headers=st.sampled_from(BAD_CREDENTIALS),
)
def test_any_body_without_valid_credentials_is_401_and_stores_nothing(
    client: httpx.Client, clean_database: Database, body: bytes, route: str, make_headers: Any
) -> None:
    response = client.post(f"/events/{route}", content=body, headers=make_headers(route, body))

    assert response.status_code == 401, response.text
    assert response.json()["error"]
    assert row_counts(clean_database) == NOTHING_STORED
