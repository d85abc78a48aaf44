"""Promise 5 under hostile input: an authentic request whose body is unusable is kept in `dead_letters` and
answered 200, so one bad event can never disable the stream; it never yields a 500 and never a `users` row.

Through a real `relay serve` process (module-scoped; each test starts from empty tables) on real PostgreSQL.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from hypothesis import event as count_in_statistics
from hypothesis import given
from hypothesis import strategies as st
from psycopg import sql

from tests.support.database import (
    JSON_COLUMNS,
    NOTHING_STORED,
    TEXT_COLUMNS,
    TYPED_COLUMNS,
    Database,
    StoredLetter,
    as_time,
    dead_letter,
    dead_letters,
    expected_typed_columns,
    row_counts,
)
from tests.support.events import NUMBER_POSTGRESQL_REFUSES, REFUSED_NUMBER_ERROR, cloudevent, encode, fixture
from tests.support.http import (
    ROUTES,
    SECRET_HEADERS,
    WEBHOOK_BASIC,
    WEBHOOK_HEADER,
    deliver,
    signed_headers,
)
from tests.support.properties import OVER_HTTP

pytestmark = pytest.mark.integration


def assert_kept_safely(letter: StoredLetter, route: str, body: bytes) -> None:
    assert (letter.route, letter.body, letter.resolved) == (route, body, False)
    assert letter.error
    assert not set(letter.headers) & set(SECRET_HEADERS), letter.headers


def dead_lettered_answers(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    answers: list[dict[str, Any]] = response.json()["events"]
    for answer in answers:
        assert answer["outcome"] == "dead_lettered", answer
        assert isinstance(answer["dead_letter_id"], int)
        assert answer["error"]
    return answers


def nested_json(depth: int) -> bytes:
    """`{"a":{"a":…1…}}`, built as bytes: the standard library cannot encode what it is meant to test."""
    return b'{"a":' * depth + b"1" + b"}" * depth


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
    "the id as a number": encode(cloudevent(id=42)),
    "an empty id": encode(cloudevent(id="")),
    "a time without a zone": encode(cloudevent(time="2025-02-02T17:56:01")),
    "a time that is not a date": encode(cloudevent(time="yesterday")),
    "the type as an object": encode(cloudevent(type={"name": "user.created"})),
    "data.object as a list": encode(cloudevent(data={"object": [1, 2]})),
    "no data.object on a user event": encode(cloudevent(data={})),
    "user_id as a number": encode(cloudevent(user_id=679)),
    "an empty user_id": encode(cloudevent(user_id="")),
    "email_verified as a string": encode(cloudevent(email_verified="yes")),
    "logins_count negative": encode(cloudevent(logins_count=-1)),
    "logins_count beyond bigint": encode(cloudevent(logins_count=2**63)),
    "logins_count as a fraction": encode(cloudevent(logins_count=2.5)),
    "identities as an object": encode(cloudevent(identities={"provider": "auth0"})),
    "created_at not a date": encode(cloudevent(created_at="last tuesday")),
    "app_metadata as a list": encode(cloudevent(app_metadata=["plan", "pro"])),
    # (A well-formed one is split into its items, each set aside alone: see test_deep_nesting.py.)
    "a deeply nested array body left unclosed": b"[" * DEEP + b"]" * (DEEP - 1),
    "a deeply nested object body": nested_json(DEEP),
    "deep nesting inside data.object": CREATED.replace(
        b'"object":{', b'"object":{"deep":' + nested_json(DEEP) + b","
    ),
    "deep nesting beside the envelope": CREATED.replace(
        b'"data":{', b'"extension":' + nested_json(DEEP) + b',"data":{'
    ),
    "a huge event id": encode(cloudevent(id="evt_" + "x" * 100_000)),
    "a huge event type": encode(cloudevent(type="user." + "x" * 100_000)),
    "a huge user_id": encode(cloudevent(user_id="auth0|" + "x" * 100_000)),
    # JSON allows U+0000; PostgreSQL's jsonb and text cannot hold it, so the decoder refuses it.
    "a NUL character in a profile string": encode(cloudevent(name="Jane\u0000Doe")),
    "a NUL character in a metadata key": encode(cloudevent(user_metadata={"k\u0000": 1})),
    "a NUL character in the user_id": encode(cloudevent(user_id="auth0|\u0000")),
    "a NUL character in an unhandled event type": encode(cloudevent(type="user.\u0000renamed")),
    # Valid RFC 3339, but outside what a datetime holds once converted to UTC.
    "a time out of range in UTC": encode(cloudevent(time="9999-12-31T23:59:59-01:00")),
    "a deleted_at out of range in UTC": encode(
        cloudevent("user.deleted", deleted_at="0001-01-01T00:00:00+01:00")
    ),
    # Decodable, but PostgreSQL refuses it: a number beyond what its numeric type holds.
    "a metadata number PostgreSQL refuses": encode(
        cloudevent(user_metadata={"size": NUMBER_POSTGRESQL_REFUSES})
    ),
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", sorted(WHOLE_BODY_FAILURES))
def test_unusable_body_is_dead_lettered_as_sent(
    client: httpx.Client, clean_database: Database, case: str, route: str
) -> None:
    body = WHOLE_BODY_FAILURES[case]
    response = deliver(client, route, body)

    [answer] = dead_lettered_answers(response)
    assert_kept_safely(dead_letter(clean_database, answer["dead_letter_id"]), route, body)
    assert row_counts(clean_database) == {"users": 0, "processed_events": 0, "dead_letters": 1}


@pytest.mark.parametrize("route", ROUTES)
def test_an_event_whose_time_leaves_the_calendar_once_in_utc_is_a_dead_letter_not_a_500(
    client: httpx.Client, clean_database: Database, route: str
) -> None:
    """9999-12-31T23:59:59-01:00 is valid RFC 3339, and one second into the year 10000 in UTC."""
    event = cloudevent(time="9999-12-31T23:59:59-01:00")
    body = encode(event)
    response = deliver(client, route, body, event["id"])

    assert response.status_code == 200, response.text
    [answer] = response.json()["events"]
    assert {key: answer[key] for key in ("id", "outcome", "dead_letter_id", "error")} == {
        "id": event["id"],
        "outcome": "dead_lettered",
        "dead_letter_id": 1,
        "error": "user.created time or deleted_at is out of range once converted to UTC",
    }
    assert dead_letters(clean_database) == [
        StoredLetter(1, route, body, dead_letter(clean_database, 1).headers, answer["error"], False)
    ]
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
    assert letter.headers == {
        "content-type": "application/json",
        "content-length": str(len(body)),
        "user-agent": "Auth0-Event-Streams/1.0",
        "x-request-id": "req-123",
        "webhook-id": "evt_6SfwXrtm8nVcjzzNCFFH1L",
        "webhook-timestamp": headers["webhook-timestamp"],
    }


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
    assert WEBHOOK_HEADER[1] not in json.dumps(letter.headers)
    assert "password" not in json.dumps(letter.headers)


# The bad event beside a good one, and the dead letter's error: each fails at a different stage.
MIXED_BATCH_BAD_EVENTS = {
    "undecodable": (
        cloudevent("user.updated", user_id=42),
        "user.updated data.object is not an Auth0 user: Expected `str`, got `int` - at `$.user_id`",
    ),
    "holding a NUL": (
        cloudevent("user.updated", name="Jane\u0000Doe"),
        "the event holds a \\u0000 character, which PostgreSQL cannot store in text or jsonb",
    ),
    "refused by PostgreSQL": (
        cloudevent("user.updated", user_metadata={"size": NUMBER_POSTGRESQL_REFUSES}),
        f"PostgreSQL refused the event: {REFUSED_NUMBER_ERROR}",
    ),
}


@pytest.mark.parametrize("bad_kind", sorted(MIXED_BATCH_BAD_EVENTS))
def test_array_mixing_good_and_bad_applies_the_good_and_dead_letters_the_bad(
    client: httpx.Client, clean_database: Database, bad_kind: str
) -> None:
    good = fixture("user.created")
    bad, error = MIXED_BATCH_BAD_EVENTS[bad_kind]
    response = deliver(client, "webhook", encode([good, bad]))

    assert response.status_code == 200, response.text
    good_answer, bad_answer = response.json()["events"]
    assert good_answer == {"id": good["id"], "outcome": "applied"}
    assert (bad_answer["outcome"], bad_answer["error"]) == ("dead_lettered", error)
    letter = dead_letter(clean_database, bad_answer["dead_letter_id"])
    assert_kept_safely(letter, "webhook", encode(bad))
    assert letter.error == error
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


# A test event's user_id only labels its ledger row: (body, its outcome).
TEST_EVENTS_WITH_UNUSABLE_USER_ID = {
    "invalid UTF-8": (encode(fixture("test-event")).replace(b"test-user", b"te\xffst"), "test"),
    "a NUL character": (
        encode(cloudevent("test-event", data={"object": {"user_id": "auth0|\u0000"}})),
        "dead_lettered",
    ),
    "a number": (encode(cloudevent("test-event", data={"object": {"user_id": 42}})), "test"),
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("case", sorted(TEST_EVENTS_WITH_UNUSABLE_USER_ID))
def test_test_event_with_an_unusable_user_id_is_acknowledged_without_a_user(
    client: httpx.Client, clean_database: Database, case: str, route: str
) -> None:
    body, outcome = TEST_EVENTS_WITH_UNUSABLE_USER_ID[case]
    response = deliver(client, route, body)

    assert response.status_code == 200, response.text
    [answer] = response.json()["events"]
    assert answer["outcome"] == outcome
    if outcome == "test":
        # Recorded, with no user named: the user_id it carried is not one PostgreSQL can index.
        assert clean_database.query("SELECT event_id, user_id, outcome FROM processed_events") == [
            (fixture("test-event")["id"], None, "test")
        ]
        assert row_counts(clean_database) == {"users": 0, "processed_events": 1, "dead_letters": 0}
    else:
        assert_kept_safely(dead_letter(clean_database, answer["dead_letter_id"]), route, body)
        assert row_counts(clean_database) == {"users": 0, "processed_events": 0, "dead_letters": 1}


@pytest.mark.parametrize("route", ROUTES)
def test_huge_but_well_formed_value_is_stored_intact(
    client: httpx.Client, clean_database: Database, route: str
) -> None:
    name = "Ж" * 100_000  # 200 kB of UTF-8, within the default 256 KiB limit
    event = cloudevent(name=name)
    body = json.dumps(event, ensure_ascii=False).encode()
    response = deliver(client, route, body, event["id"])

    assert response.json() == {"events": [{"id": event["id"], "outcome": "applied"}]}
    assert clean_database.query("SELECT name FROM users") == [(name,)]


@pytest.mark.parametrize("route", ROUTES)
def test_event_time_with_an_unusual_offset_is_the_same_instant(
    client: httpx.Client, clean_database: Database, route: str
) -> None:
    # RFC 3339 allows offsets PostgreSQL's own parser refuses (beyond ±15:59); the instant is still clear,
    # in the event's time and in the profile's.
    event = cloudevent(
        time="2025-02-02T17:56:01+23:59",
        created_at="2025-01-01T00:00:00+16:00",
        updated_at="2025-02-02T17:56:01-20:30",
        last_login="2025-02-02T17:56:01+23:59",
    )
    response = deliver(client, route, encode(event), event["id"])

    assert response.json() == {"events": [{"id": event["id"], "outcome": "applied"}]}
    assert clean_database.query(
        "SELECT last_event_processed, created_at, updated_at, last_login FROM users"
    ) == [
        (
            datetime(2025, 2, 1, 17, 57, 1, tzinfo=UTC),
            datetime(2024, 12, 31, 8, tzinfo=UTC),
            datetime(2025, 2, 3, 14, 26, 1, tzinfo=UTC),
            datetime(2025, 2, 1, 17, 57, 1, tzinfo=UTC),
        )
    ]
    assert clean_database.query("SELECT profile ->> 'updated_at' FROM users") == [
        ("2025-02-02T17:56:01-20:30",)
    ]


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


JSON_WHITESPACE = b" \t\n\r"


def is_json_array_of(body: bytes, items: list[bytes]) -> bool:
    """Whether `body` is exactly a JSON array of `items`, byte for byte, whitespace aside."""
    inner = body.strip(JSON_WHITESPACE)
    if not (inner.startswith(b"[") and inner.endswith(b"]")):
        return False
    inner = inner[1:-1].strip(JSON_WHITESPACE)
    for number, item in enumerate(items):
        if number:
            if not inner.startswith(b","):
                return False
            inner = inner[1:].lstrip(JSON_WHITESPACE)
        if not inner.startswith(item):
            return False
        inner = inner[len(item) :].lstrip(JSON_WHITESPACE)
    return inner == b""


def assert_all_dead_lettered_as_sent(
    database: Database, response: httpx.Response, route: str, body: bytes
) -> None:
    """Every item is a dead letter holding exactly its bytes: the whole body as one letter, or, when the body
    is a JSON array, one letter per element, each exactly as it stands in the body, in order."""
    answers = dead_lettered_answers(response)
    letters = [dead_letter(database, answer["dead_letter_id"]) for answer in answers]
    for letter in letters:
        assert (letter.route, letter.resolved) == (route, False)
        assert not set(letter.headers) & set(SECRET_HEADERS)
    stored = [letter.body for letter in letters]
    assert stored == [body] or is_json_array_of(body, stored), stored


@OVER_HTTP
@given(body=st.binary(max_size=2_000), route=st.sampled_from(ROUTES))
def test_arbitrary_bytes_are_dead_lettered(
    client: httpx.Client, clean_database: Database, body: bytes, route: str
) -> None:
    users_before = row_counts(clean_database)["users"]
    response = deliver(client, route, body, "evt_6SfwXrtm8nVcjzzNCFFH1L")

    assert_all_dead_lettered_as_sent(clean_database, response, route, body)
    assert row_counts(clean_database)["users"] == users_before


@OVER_HTTP
@given(value=json_values, route=st.sampled_from(ROUTES))
def test_arbitrary_json_values_are_dead_lettered(
    client: httpx.Client, clean_database: Database, value: Any, route: str
) -> None:
    body = encode(value) if isinstance(value, (dict, list)) else json.dumps(value).encode()
    users_before = row_counts(clean_database)["users"]
    response = deliver(client, route, body, "evt_6SfwXrtm8nVcjzzNCFFH1L")

    assert_all_dead_lettered_as_sent(clean_database, response, route, body)
    if isinstance(value, list):
        stored = [dead_letter(clean_database, a["dead_letter_id"]).body for a in response.json()["events"]]
        assert stored == [
            encode(item) if isinstance(item, (dict, list)) else json.dumps(item).encode() for item in value
        ]
    assert row_counts(clean_database)["users"] == users_before


def any_event(event_type: str, data_object: Any) -> dict[str, Any]:
    """An event of its own (fresh id, sent now) carrying `data_object`, whatever it is."""
    return cloudevent(
        event_type,
        id="evt_" + secrets.token_hex(11),
        time=datetime.now(UTC),
        data={"object": data_object},
    )


@OVER_HTTP
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
    event = any_event(event_type, user)
    body = encode(event)
    surely_valid = surely_valid and "\\u0000" not in body.decode()
    response = deliver(client, route, body, event["id"])

    assert response.status_code == 200, response.text
    [answer] = response.json()["events"]
    count_in_statistics(f"{answer['outcome']} ({'valid' if surely_valid else 'maybe invalid'} fields)")
    if answer["outcome"] == "dead_lettered":
        # The envelope is always readable here, so the answer names the event.
        assert answer["id"] == event["id"]
        assert not surely_valid, f"a valid event was dead-lettered: {answer['error']}"
        assert dead_letter(clean_database, answer["dead_letter_id"]).body == body
        user_id = user.get("user_id") if isinstance(user, dict) else None
        if isinstance(user_id, str) and "\x00" not in user_id:  # a NUL cannot even be asked about
            assert clean_database.query("SELECT 1 FROM users WHERE user_id = %s", [user_id]) == []
        return
    assert answer["id"] == event["id"]
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


@OVER_HTTP
@given(
    body=st.binary(max_size=2_000)
    | json_values.map(lambda value: json.dumps(value).encode())
    | any_data_object.map(lambda drawn: encode(any_event("user.created", drawn[0]))),
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
