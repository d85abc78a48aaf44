"""The one decoder: every body becomes user events, other events, or undecodable items, and never raises."""

from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.events import (
    EventKind,
    Item,
    Origin,
    OtherEvent,
    Undecodable,
    UserEvent,
    _split_array_iteratively,
    decode_body,
    decode_event,
    from_micros,
    to_micros,
)
from tests.support.events import FIXTURE_NAMES, cloudevent, encode, fixture

USER_ID = "auth0|679fb1b1e809445f129bc18d"
ORIGIN = Origin("acme", "est_38ANnv8pQhqsZrX2VFbftv")  # the fixtures' a0tenant and a0stream


def decode_user_event(body: dict[str, Any]) -> UserEvent:
    decoded = decode_event(encode(body))
    assert isinstance(decoded, UserEvent), decoded
    return decoded


def undecodable(raw: bytes) -> str:
    """Why `raw` is undecodable (the test fails if it decodes)."""
    decoded = decode_event(raw)
    assert isinstance(decoded, Undecodable), decoded
    assert decoded.raw == raw
    return decoded.reason


def test_fixtures_are_found():
    assert {"user.created", "user.updated", "user.deleted", "user.deleted.minimal", "test-event"} <= set(
        FIXTURE_NAMES
    )


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_every_fixture_decodes(name):
    body = fixture(name)
    decoded = decode_event(encode(body))

    assert isinstance(decoded, UserEvent | OtherEvent)
    assert decoded.id == body["id"]
    assert decoded.time == datetime.fromisoformat(body["time"])
    assert decoded.user_id == body["data"]["object"]["user_id"]
    assert decoded.origin == ORIGIN
    assert decoded.raw == encode(body)


def test_user_created_fixture_decodes_to_a_full_snapshot():
    body = fixture("user.created")
    decoded = decode_user_event(body)

    assert decoded == UserEvent(
        id="evt_6SfwXrtm8nVcjzzNCFFH1L",
        kind=EventKind.CREATED,
        time=datetime(2025, 2, 2, 17, 56, 1, 573000, tzinfo=UTC),
        version=(1_738_518_961_573_000, "evt_6SfwXrtm8nVcjzzNCFFH1L"),
        user_id=USER_ID,
        profile=body["data"]["object"],
        is_snapshot=True,
        deleted_at=None,
        origin=ORIGIN,
        raw=encode(body),
    )


def test_user_updated_fixture_keeps_the_whole_object_and_not_previous_object():
    body = fixture("user.updated")
    decoded = decode_user_event(body)

    assert decoded.kind is EventKind.UPDATED
    assert decoded.profile == body["data"]["object"]
    assert decoded.profile["email"] == "Jane.Doe@Example.com"
    assert decoded.is_snapshot
    assert decoded.deleted_at is None


def test_user_deleted_fixture_takes_deleted_at_from_the_object():
    decoded = decode_user_event(fixture("user.deleted"))

    assert decoded.kind is EventKind.DELETED
    assert decoded.deleted_at == datetime(2025, 2, 4, 11, 0, 0, 241000, tzinfo=UTC)
    assert decoded.time == datetime(2025, 2, 4, 11, 0, 0, 250000, tzinfo=UTC)


def test_minimal_user_deleted_decodes_as_a_partial_delete():
    decoded = decode_user_event(fixture("user.deleted.minimal"))

    assert decoded.kind is EventKind.DELETED
    assert decoded.user_id == USER_ID
    assert decoded.profile == {"user_id": USER_ID, "deleted_at": "2025-02-04T11:00:00.241Z"}
    assert decoded.deleted_at == datetime(2025, 2, 4, 11, 0, 0, 241000, tzinfo=UTC)
    assert not decoded.is_snapshot


@pytest.mark.parametrize("deleted_at", [..., None], ids=["absent", "null"])
def test_user_deleted_without_deleted_at_takes_the_event_time(deleted_at):
    decoded = decode_user_event(cloudevent("user.deleted.minimal", deleted_at=deleted_at))

    assert decoded.deleted_at == datetime(2025, 2, 4, 11, 0, 0, 250000, tzinfo=UTC)


@pytest.mark.parametrize(("prefixed", "kind"), [(f"com.auth0.{kind.value}", kind) for kind in EventKind])
def test_com_auth0_type_prefix_is_accepted(prefixed, kind):
    assert decode_user_event(cloudevent("user.updated", type=prefixed)).kind is kind


def test_unknown_top_level_fields_are_tolerated():
    body = cloudevent(
        "user.updated",
        envelope={
            "spec_version": "1.0",
            "dataschema": "https://auth0.com/schemas/user.updated",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "a0future": {"nested": [1, 2, {"deep": True}]},
        },
    )
    decoded = decode_user_event(body)

    assert decoded.id == body["id"]
    assert decoded.profile == body["data"]["object"]


def test_envelope_with_only_the_fields_the_relay_needs_decodes():
    body = {
        "id": "evt_1",
        "type": "user.updated",
        "time": "2025-02-03T09:12:44Z",
        "data": {"object": {"user_id": "u"}},
    }
    assert decode_user_event(body).user_id == "u"


def test_unknown_object_fields_are_kept_in_the_profile():
    extra = {
        "last_ip": "203.0.113.7",
        "multifactor": ["guardian"],
        "email_verified_at": "2025-02-03T09:00:00.000Z",
        "custom_claims": {"tier": {"level": 3, "flags": [True, None, 1.5]}},
    }
    identities = [
        {
            "connection": "google-oauth2",
            "provider": "google-oauth2",
            "isSocial": True,
            "user_id": "10987654321",
            "profileData": {"email": "jane@gmail.com", "locale": "en"},
            "access_token": "kept-as-sent",
        }
    ]
    decoded = decode_user_event(cloudevent("user.updated", identities=identities, **extra))

    for field, value in extra.items():
        assert decoded.profile[field] == value
    assert decoded.profile["identities"] == identities


@pytest.mark.parametrize("identity_user_id", ["679fb1b1e809445f129bc18d", 10987654321, 0])
def test_identity_user_id_may_be_a_string_or_a_number(identity_user_id):
    identities = [{"connection": "c", "provider": "github", "isSocial": True, "user_id": identity_user_id}]
    decoded = decode_user_event(cloudevent("user.updated", identities=identities))

    assert decoded.profile["identities"][0]["user_id"] == identity_user_id


def test_optional_fields_may_be_absent():
    decoded = decode_user_event(
        cloudevent(
            "user.created",
            email=...,
            email_verified=...,
            name=...,
            nickname=...,
            picture=...,
            user_metadata=...,
            app_metadata=...,
        )
    )
    assert set(decoded.profile) == {"user_id", "identities", "created_at", "updated_at"}
    assert decoded.is_snapshot


def test_optional_fields_may_be_null():
    nulls = dict.fromkeys(
        [
            "email",
            "email_verified",
            "name",
            "picture",
            "phone_number",
            "blocked",
            "last_login",
            "logins_count",
        ]
    )
    decoded = decode_user_event(cloudevent("user.updated", **nulls))

    assert {field: decoded.profile[field] for field in nulls} == nulls


def test_object_with_only_user_id_is_a_partial_update():
    decoded = decode_user_event(cloudevent("user.updated", data={"object": {"user_id": USER_ID}}))

    assert decoded.profile == {"user_id": USER_ID}
    assert not decoded.is_snapshot


def test_full_object_is_a_snapshot():
    assert decode_user_event(fixture("user.updated")).is_snapshot


@pytest.mark.parametrize("field", ["created_at", "updated_at", "identities"])
@pytest.mark.parametrize("removal", [..., None], ids=["absent", "null"])
def test_object_missing_a_snapshot_field_is_partial(field, removal):
    decoded = decode_user_event(cloudevent("user.updated", **{field: removal}))

    assert not decoded.is_snapshot
    assert decoded.profile["email"] == "Jane.Doe@Example.com"


def test_empty_identities_still_make_a_snapshot():
    assert decode_user_event(cloudevent("user.updated", identities=[])).is_snapshot


def test_test_event_is_recorded_not_applied():
    body = encode(fixture("test-event"))

    assert decode_event(body) == OtherEvent(
        id="evt_T3stEv3nt0000000000001",
        type="user.created",
        time=datetime(2025, 2, 5, 8, 0, tzinfo=UTC),
        is_test=True,
        user_id="auth0|test-user",
        origin=ORIGIN,
        raw=body,
    )


@pytest.mark.parametrize("kind", [kind.value for kind in EventKind])
def test_test_event_of_any_user_type_is_a_test(kind):
    decoded = decode_event(encode(cloudevent("user.updated", type=kind, a0purpose="test")))

    assert isinstance(decoded, OtherEvent)
    assert decoded.is_test
    assert decoded.type == kind


@pytest.mark.parametrize(
    "event_type",
    ["organization.created", "com.auth0.organization.member.added", "group.deleted", "user.blocked"],
)
def test_unhandled_type_is_ignored_not_a_test(event_type):
    body = cloudevent(
        "user.updated",
        type=event_type,
        data={"object": {"id": "org_Ab12Cd34Ef56Gh78", "name": "acme", "display_name": "Acme"}},
    )
    decoded = decode_event(encode(body))

    assert decoded == OtherEvent(
        id=body["id"],
        type=event_type.removeprefix("com.auth0."),
        time=datetime.fromisoformat(body["time"]),
        is_test=False,
        user_id=None,
        origin=ORIGIN,
        raw=encode(body),
    )


@pytest.mark.parametrize(
    ("data", "user_id"),
    [
        ({"object": {"user_id": "auth0|x"}}, "auth0|x"),
        ({"object": {"user_id": 42}}, None),
        ({"object": {"user_id": ""}}, None),
        ({"object": "not an object"}, None),
        ({}, None),
        (None, None),
        ([1, 2], None),
    ],
)
def test_unhandled_type_never_fails_on_its_data(data, user_id):
    decoded = decode_event(encode(cloudevent("user.updated", type="organization.created", data=data)))

    assert isinstance(decoded, OtherEvent)
    assert decoded.user_id == user_id


@pytest.mark.parametrize("event_type", ["organization.created", "user.created"])
def test_invalid_utf8_in_the_data_of_a_test_event_leaves_it_a_test_without_a_user(event_type):
    """Nobody applies a test event's data, so bytes that are not UTF-8 there cost it only its user_id."""
    raw = encode(cloudevent("test-event", type=event_type, user_id="@@")).replace(b"@@", b"\xed\xa0\x80")

    assert decode_event(raw) == OtherEvent(
        id="evt_T3stEv3nt0000000000001",
        type=event_type,
        time=datetime(2025, 2, 5, 8, 0, tzinfo=UTC),
        is_test=True,
        user_id=None,
        origin=ORIGIN,
        raw=raw,
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("time", "9999-12-31T23:59:59-01:00"),  # one second into the year 10000 in UTC
        ("time", "0001-01-01T00:00:00+00:01"),  # a minute before the year 1 in UTC
        ("deleted_at", "9999-12-31T23:30:00-00:45"),
    ],
)
def test_a_valid_rfc3339_time_out_of_range_in_utc_is_undecodable(field, value):
    changes = {"time": value} if field == "time" else {"deleted_at": value}
    event = cloudevent("user.deleted", **changes)
    raw = encode(event)

    assert decode_event(raw) == Undecodable(
        raw, "user.deleted time or deleted_at is out of range once converted to UTC", ORIGIN, event["id"]
    )


def test_an_unhandled_type_with_a_time_out_of_range_in_utc_is_undecodable():
    event = cloudevent("user.updated", type="organization.created", time="9999-12-31T23:59:59-01:00")
    raw = encode(event)

    assert decode_event(raw) == Undecodable(
        raw,
        "organization.created time or deleted_at is out of range once converted to UTC",
        ORIGIN,
        event["id"],
    )


NUL_REASON = "the event holds a \\u0000 character, which PostgreSQL cannot store in text or jsonb"


@pytest.mark.parametrize(
    "body",
    [
        cloudevent("user.updated", name="Jane\u0000Doe"),
        cloudevent("user.updated", user_metadata={"k\u0000": 1}),
        cloudevent("user.updated", user_id="auth0|\u0000"),
        cloudevent("user.updated", type="user.\u0000renamed"),
        cloudevent("test-event", data={"object": {"user_id": "auth0|\u0000"}}),
        cloudevent("user.updated", type="organization.created", data=[{"x": "\u0000"}]),
    ],
    ids=["profile string", "metadata key", "user_id", "unhandled type", "test event", "unhandled data"],
)
def test_any_event_holding_a_nul_character_is_undecodable(body):
    raw = encode(body)
    assert decode_event(raw) == Undecodable(raw, NUL_REASON, ORIGIN, body["id"])


def test_an_escaped_backslash_before_u0000_is_no_nul():
    body = cloudevent("user.updated", name="C:\\u0000dir")  # the text is C:\u0000dir, no NUL in it
    assert decode_user_event(body).profile["name"] == "C:\\u0000dir"


def test_an_event_version_is_its_time_in_microseconds_then_its_id():
    decoded = decode_user_event(cloudevent("user.updated", time="2025-02-03T10:12:44.101234+01:00"))

    assert decoded.time == datetime(2025, 2, 3, 9, 12, 44, 101234, tzinfo=UTC)
    assert decoded.version == (to_micros(decoded.time), decoded.id)
    assert from_micros(decoded.version[0]) == decoded.time


@given(st.datetimes(timezones=st.just(UTC)))
def test_micros_round_trip_every_time(moment):
    assert from_micros(to_micros(moment)) == moment


def test_a_json_array_body_yields_each_event_in_order():
    events = [fixture("user.created"), fixture("user.updated"), fixture("user.deleted")]
    items = decode_body(b" \n\t" + encode(events))

    assert [item.raw for item in items] == [encode(body) for body in events]
    assert [(type(item), item.id) for item in items] == [(UserEvent, body["id"]) for body in events]


def test_a_single_object_body_is_one_item_holding_the_body():
    body = encode(fixture("user.created"))
    assert decode_body(body) == [decode_event(body)]
    assert decode_body(body)[0].raw == body


def test_an_empty_array_body_holds_no_item():
    assert decode_body(b"[]") == []


def test_bad_items_of_an_array_are_each_undecodable_with_their_own_bytes():
    items = decode_body(b'[{"id": 1}, 7, "text"]')

    assert items == [
        Undecodable(b'{"id": 1}', "not a CloudEvent: Expected `str`, got `int` - at `$.id`", Origin()),
        Undecodable(b"7", "not a CloudEvent: Expected `object`, got `int`", None),
        Undecodable(b'"text"', "not a CloudEvent: Expected `object`, got `str`", None),
    ]


@pytest.mark.parametrize(
    "body",
    [b"[", b'[{"id": "evt_1"},', b"[1, 2,]", b"[" * 100_000, b"[\xff]", b"[} garbage"],
    ids=["open", "truncated", "trailing-comma", "deeply-nested", "invalid-utf8", "garbage"],
)
def test_a_malformed_array_body_is_one_undecodable_item_holding_the_whole_body(body):
    [item] = decode_body(body)

    assert isinstance(item, Undecodable)
    assert (item.raw, item.origin) == (body, None)
    assert item.reason.startswith("body is not a JSON array of events: ")


DEEPLY_NESTED_ITEM = b'{"n":' * 50_000 + b"1" + b"}" * 50_000


def test_an_item_nested_too_deep_to_decode_is_undecodable_alone_among_its_batch_mates():
    first, last = fixture("user.created"), fixture("user.deleted")
    items = decode_body(b"[" + encode(first) + b", " + DEEPLY_NESTED_ITEM + b" ,\n" + encode(last) + b"]")

    assert [type(item) for item in items] == [UserEvent, Undecodable, UserEvent]
    assert (items[0].id, items[2].id) == (first["id"], last["id"])
    assert items[1].raw == DEEPLY_NESTED_ITEM


@pytest.mark.parametrize(
    "body",
    [
        b"[1, " + DEEPLY_NESTED_ITEM,  # never closed
        b"[1, " + DEEPLY_NESTED_ITEM + b"] trailing",
        b"[1, " + DEEPLY_NESTED_ITEM[:-1] + b"]]",  # an object closed by a bracket
        b"garbage [" + DEEPLY_NESTED_ITEM + b"]",
    ],
    ids=["unclosed", "trailing", "mismatched", "leading"],
)
def test_a_malformed_array_holding_a_deep_item_is_still_one_undecodable_item(body):
    [item] = decode_body(body)

    assert isinstance(item, Undecodable)
    assert item.raw == body


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet=st.sampled_from('ab,[]{}"\\ :')),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3)
    ),
    max_leaves=12,
)


@given(st.lists(JSON_VALUES, max_size=5), st.sampled_from([b",", b" , ", b"\n,\t"]))
def test_the_iterative_split_finds_the_items_the_decoder_finds(values, separator):
    body = b"[ " + separator.join(msgspec.json.encode(value) for value in values) + b" ]"

    assert _split_array_iteratively(body) == [
        bytes(raw) for raw in msgspec.json.decode(body, type=list[msgspec.Raw])
    ]


DEEP = b"[" * 100_000
FAILURES = {
    "random-bytes": (bytes.fromhex("8b1f0800e4a1c79f03ff5c2e9a7d11b0"), "malformed"),
    "empty-body": (b"", "truncated"),
    "truncated-json": (encode(fixture("user.updated"))[:200], "truncated"),
    "not-an-object": (b'"user.created"', "Expected `object`"),
    "invalid-utf8-body": (b"\xff\xfe" + encode(fixture("user.updated")), "malformed"),
    "invalid-utf8-in-email": (
        encode(cloudevent("user.updated", email="@@")).replace(b"@@", b"\xc3\x28"),
        "utf-8",
    ),
    "invalid-utf8-in-id": (encode(cloudevent("user.updated", id="@@")).replace(b"@@", b"\xff"), "utf-8"),
    "email_verified-yes": (encode(cloudevent("user.updated", email_verified="yes")), "$.email_verified"),
    "logins_count-string": (encode(cloudevent("user.updated", logins_count="3")), "$.logins_count"),
    "logins_count-negative": (encode(cloudevent("user.updated", logins_count=-1)), "$.logins_count"),
    "logins_count-too-big": (encode(cloudevent("user.updated", logins_count=2**63)), "$.logins_count"),
    "logins_count-huge": (encode(cloudevent("user.updated", logins_count=10**30)), "$.logins_count"),
    "created_at-not-a-date": (encode(cloudevent("user.updated", created_at="yesterday")), "$.created_at"),
    "last_login-without-timezone": (
        encode(cloudevent("user.updated", last_login="2025-02-03T09:10:02")),
        "$.last_login",
    ),
    "time-without-timezone": (encode(cloudevent("user.updated", time="2025-02-03T09:12:44.101")), "$.time"),
    "time-not-a-date": (encode(cloudevent("user.updated", time="1738574000")), "$.time"),
    "identities-not-a-list": (
        encode(cloudevent("user.updated", identities={"provider": "auth0"})),
        "$.identities",
    ),
    "identity-user_id-float": (
        encode(cloudevent("user.updated", identities=[{"user_id": 1.5}])),
        "$.identities[0].user_id",
    ),
    "app_metadata-not-an-object": (
        encode(cloudevent("user.updated", app_metadata="plan=pro")),
        "$.app_metadata",
    ),
    "user_id-missing": (encode(cloudevent("user.updated", user_id=...)), "user_id"),
    "user_id-empty": (encode(cloudevent("user.updated", user_id="")), "$.user_id"),
    "user_id-number": (encode(cloudevent("user.updated", user_id=679)), "$.user_id"),
    "id-missing": (encode(cloudevent("user.updated", id=...)), "`id`"),
    "id-empty": (encode(cloudevent("user.updated", id="")), "$.id"),
    "type-missing": (encode(cloudevent("user.updated", type=...)), "`type`"),
    "time-missing": (encode(cloudevent("user.updated", time=...)), "`time`"),
    "data-missing": (encode(cloudevent("user.updated", data=...)), "data.object"),
    "object-missing": (encode(cloudevent("user.updated", data={"context": {}})), "object"),
    "object-not-an-object": (
        encode(cloudevent("user.updated", data={"object": [USER_ID]})),
        "Expected `object`",
    ),
    "deeply-nested-body": (DEEP, "Expected `object`"),
    "deeply-nested-data": (
        encode(cloudevent("user.updated", data="@@")).replace(b'"@@"', DEEP),
        "nested too deeply",
    ),
    "deeply-nested-object-field": (
        encode(cloudevent("user.updated", custom="@@")).replace(b'"@@"', DEEP),
        "nested too deeply",
    ),
    "deeply-nested-objects": (
        encode(cloudevent("user.updated", custom="@@")).replace(b'"@@"', b'{"a":' * 100_000),
        "nested too deeply",
    ),
}


@pytest.mark.parametrize(("raw", "mentions"), FAILURES.values(), ids=FAILURES.keys())
def test_unusable_event_is_undecodable_with_a_useful_message(raw, mentions):
    message = undecodable(raw)

    assert mentions.lower() in message.lower()
    assert len(message) < 500


def test_largest_bigint_logins_count_is_accepted():
    assert (
        decode_user_event(cloudevent("user.updated", logins_count=2**63 - 1)).profile["logins_count"]
        == 2**63 - 1
    )


FIXTURE_BODIES = [encode(fixture(name)) for name in FIXTURE_NAMES]


@st.composite
def damaged_fixtures(draw: st.DrawFn) -> bytes:
    """A real event body with a few bytes replaced: close enough to valid to reach the field checks."""
    body = draw(st.sampled_from(FIXTURE_BODIES))
    start = draw(st.integers(0, len(body)))
    length = draw(st.integers(0, 8))
    return body[:start] + draw(st.binary(max_size=8)) + body[start + length :]


def assert_decoded_from(item: Item, raw: bytes) -> None:
    """An item keeps exactly the bytes it came from, and an undecodable one says why."""
    assert isinstance(item, UserEvent | OtherEvent | Undecodable)
    assert item.raw == raw
    if isinstance(item, Undecodable):
        assert 0 < len(item.reason) < 500


@given(st.one_of(st.binary(max_size=512), damaged_fixtures()))
def test_any_bytes_decode_to_one_item_holding_them(raw):
    assert_decoded_from(decode_event(raw), raw)


@given(
    st.one_of(st.binary(max_size=512), damaged_fixtures(), damaged_fixtures().map(lambda b: b"[" + b + b"]"))
)
def test_any_body_decodes_to_items_holding_the_whole_body_or_each_element(raw):
    items = decode_body(raw)

    if len(items) == 1 and items[0].raw == raw:
        assert_decoded_from(items[0], raw)
        return
    # Otherwise the body was a JSON array: each item holds one element, exactly as it stands in the body.
    assert raw.lstrip()[:1] == b"["
    position = 0
    for item in items:
        assert_decoded_from(item, item.raw)
        found = raw.index(item.raw, position)
        assert raw[position:found].strip(b" \t\n\r[,") == b""
        position = found + len(item.raw)
    assert raw[position:].strip(b" \t\n\r]") == b""
