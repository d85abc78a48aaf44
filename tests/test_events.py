import contextlib
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.events import EventKind, OtherEvent, UndecodableEvent, UserEvent, decode_event, split_body
from tests.support import FIXTURES, encode, fixture

FIXTURE_NAMES = sorted(path.stem for path in FIXTURES.glob("*.json"))
USER_ID = "auth0|679fb1b1e809445f129bc18d"


def event(name: str = "user.updated", /, **envelope_changes: Any) -> dict[str, Any]:
    """A fixture with top-level fields replaced (a value of `...` removes the field)."""
    loaded = fixture(name)
    for field, value in envelope_changes.items():
        if value is ...:
            loaded.pop(field, None)
        else:
            loaded[field] = value
    return loaded


def with_object(name: str = "user.updated", /, **object_changes: Any) -> dict[str, Any]:
    """A fixture with `data.object` fields replaced (a value of `...` removes the field)."""
    loaded = fixture(name)
    user = loaded["data"]["object"]
    for field, value in object_changes.items():
        if value is ...:
            user.pop(field, None)
        else:
            user[field] = value
    return loaded


def decode_user_event(body: dict[str, Any]) -> UserEvent:
    decoded = decode_event(encode(body))
    assert isinstance(decoded, UserEvent)
    return decoded


def undecodable(raw: bytes) -> str:
    with pytest.raises(UndecodableEvent) as error:
        decode_event(raw)
    return str(error.value)


def test_fixtures_are_found():
    assert {"user.created", "user.updated", "user.deleted", "user.deleted.minimal", "test-event"} <= set(
        FIXTURE_NAMES
    )


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_every_fixture_decodes(name):
    body = fixture(name)
    decoded = decode_event(encode(body))

    assert decoded.id == body["id"]
    assert decoded.time == datetime.fromisoformat(body["time"])
    assert decoded.user_id == body["data"]["object"]["user_id"]


def test_user_created_fixture_decodes_to_a_full_snapshot():
    body = fixture("user.created")
    decoded = decode_user_event(body)

    assert decoded == UserEvent(
        id="evt_6SfwXrtm8nVcjzzNCFFH1L",
        kind=EventKind.CREATED,
        time=datetime(2025, 2, 2, 17, 56, 1, 573000, tzinfo=UTC),
        user_id=USER_ID,
        profile=body["data"]["object"],
        is_snapshot=True,
        deleted_at=None,
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
    decoded = decode_user_event(with_object("user.deleted.minimal", deleted_at=deleted_at))

    assert decoded.deleted_at == datetime(2025, 2, 4, 11, 0, 0, 250000, tzinfo=UTC)


@pytest.mark.parametrize(("prefixed", "kind"), [(f"com.auth0.{kind.value}", kind) for kind in EventKind])
def test_com_auth0_type_prefix_is_accepted(prefixed, kind):
    assert decode_user_event(event(type=prefixed)).kind is kind


def test_unknown_top_level_fields_are_tolerated():
    body = event(
        spec_version="1.0",
        dataschema="https://auth0.com/schemas/user.updated",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        a0future={"nested": [1, 2, {"deep": True}]},
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
    decoded = decode_user_event(with_object(identities=identities, **extra))

    for field, value in extra.items():
        assert decoded.profile[field] == value
    assert decoded.profile["identities"] == identities


@pytest.mark.parametrize("identity_user_id", ["679fb1b1e809445f129bc18d", 10987654321, 0])
def test_identity_user_id_may_be_a_string_or_a_number(identity_user_id):
    identities = [{"connection": "c", "provider": "github", "isSocial": True, "user_id": identity_user_id}]
    decoded = decode_user_event(with_object(identities=identities))

    assert decoded.profile["identities"][0]["user_id"] == identity_user_id


def test_optional_fields_may_be_absent():
    decoded = decode_user_event(
        with_object(
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
    decoded = decode_user_event(with_object(**nulls))

    assert {field: decoded.profile[field] for field in nulls} == nulls


def test_object_with_only_user_id_is_a_partial_update():
    decoded = decode_user_event(event(data={"object": {"user_id": USER_ID}}))

    assert decoded.profile == {"user_id": USER_ID}
    assert not decoded.is_snapshot


def test_full_object_is_a_snapshot():
    assert decode_user_event(fixture("user.updated")).is_snapshot


@pytest.mark.parametrize("field", ["created_at", "updated_at", "identities"])
@pytest.mark.parametrize("removal", [..., None], ids=["absent", "null"])
def test_object_missing_a_snapshot_field_is_partial(field, removal):
    decoded = decode_user_event(with_object(**{field: removal}))

    assert not decoded.is_snapshot
    assert decoded.profile["email"] == "Jane.Doe@Example.com"


def test_empty_identities_still_make_a_snapshot():
    assert decode_user_event(with_object(identities=[])).is_snapshot


def test_test_event_is_recorded_not_applied():
    decoded = decode_event(encode(fixture("test-event")))

    assert decoded == OtherEvent(
        id="evt_T3stEv3nt0000000000001",
        type="user.created",
        time=datetime(2025, 2, 5, 8, 0, tzinfo=UTC),
        is_test=True,
        user_id="auth0|test-user",
    )


@pytest.mark.parametrize("kind", [kind.value for kind in EventKind])
def test_test_event_of_any_user_type_is_a_test(kind):
    decoded = decode_event(encode(event(type=kind, a0purpose="test")))

    assert isinstance(decoded, OtherEvent)
    assert decoded.is_test
    assert decoded.type == kind


@pytest.mark.parametrize(
    "event_type",
    ["organization.created", "com.auth0.organization.member.added", "group.deleted", "user.blocked"],
)
def test_unhandled_type_is_ignored_not_a_test(event_type):
    body = event(
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
    decoded = decode_event(encode(event(type="organization.created", data=data)))

    assert isinstance(decoded, OtherEvent)
    assert decoded.user_id == user_id


@pytest.mark.parametrize("event_type", ["organization.created", "user.created"])
def test_invalid_utf8_in_the_data_of_an_unapplied_event_is_ignored_or_undecodable(event_type):
    # Either reading is defensible (not JSON at all, or an event nobody applies); crashing is not.
    body = with_object("test-event", user_id="@@")
    body["type"] = event_type
    try:
        decoded = decode_event(encode(body).replace(b"@@", b"\xed\xa0\x80"))
    except UndecodableEvent:
        return
    assert isinstance(decoded, OtherEvent)
    assert decoded.user_id is None


def test_split_body_of_a_json_array_yields_each_event_in_order():
    events = [fixture("user.created"), fixture("user.updated"), fixture("user.deleted")]
    items = split_body(b" \n\t" + encode(events))

    assert [decode_event(item).id for item in items] == [body["id"] for body in events]


def test_split_body_of_a_single_object_yields_it_unchanged():
    body = encode(fixture("user.created"))
    assert split_body(body) == [body]


def test_split_body_of_an_empty_array_yields_nothing():
    assert split_body(b"[]") == []


def test_split_body_leaves_bad_items_for_decode_event():
    items = split_body(b'[{"id": 1}, 7, "text"]')

    assert items == [b'{"id": 1}', b"7", b'"text"']
    for item in items:
        undecodable(item)


@pytest.mark.parametrize(
    "body",
    [b"[", b'[{"id": "evt_1"},', b"[1, 2,]", b"[" * 100_000, b"[\xff]", b"[} garbage"],
    ids=["open", "truncated", "trailing-comma", "deeply-nested", "invalid-utf8", "garbage"],
)
def test_malformed_array_body_is_undecodable(body):
    with pytest.raises(UndecodableEvent, match="not a JSON array of events"):
        split_body(body)


DEEP = b"[" * 100_000
FAILURES = {
    "random-bytes": (bytes.fromhex("8b1f0800e4a1c79f03ff5c2e9a7d11b0"), "malformed"),
    "empty-body": (b"", "truncated"),
    "truncated-json": (encode(fixture("user.updated"))[:200], "truncated"),
    "not-an-object": (b'"user.created"', "Expected `object`"),
    "invalid-utf8-body": (b"\xff\xfe" + encode(fixture("user.updated")), "malformed"),
    "invalid-utf8-in-email": (encode(with_object(email="@@")).replace(b"@@", b"\xc3\x28"), "utf-8"),
    "invalid-utf8-in-id": (encode(event(id="@@")).replace(b"@@", b"\xff"), "utf-8"),
    "email_verified-yes": (encode(with_object(email_verified="yes")), "$.email_verified"),
    "logins_count-string": (encode(with_object(logins_count="3")), "$.logins_count"),
    "logins_count-negative": (encode(with_object(logins_count=-1)), "$.logins_count"),
    "logins_count-too-big": (encode(with_object(logins_count=2**63)), "$.logins_count"),
    "logins_count-huge": (encode(with_object(logins_count=10**30)), "$.logins_count"),
    "created_at-not-a-date": (encode(with_object(created_at="yesterday")), "$.created_at"),
    "last_login-without-timezone": (encode(with_object(last_login="2025-02-03T09:10:02")), "$.last_login"),
    "time-without-timezone": (encode(event(time="2025-02-03T09:12:44.101")), "$.time"),
    "time-not-a-date": (encode(event(time="1738574000")), "$.time"),
    "identities-not-a-list": (encode(with_object(identities={"provider": "auth0"})), "$.identities"),
    "identity-user_id-float": (encode(with_object(identities=[{"user_id": 1.5}])), "$.identities[0].user_id"),
    "app_metadata-not-an-object": (encode(with_object(app_metadata="plan=pro")), "$.app_metadata"),
    "user_id-missing": (encode(with_object(user_id=...)), "user_id"),
    "user_id-empty": (encode(with_object(user_id="")), "$.user_id"),
    "user_id-number": (encode(with_object(user_id=679)), "$.user_id"),
    "id-missing": (encode(event(id=...)), "`id`"),
    "id-empty": (encode(event(id="")), "$.id"),
    "type-missing": (encode(event(type=...)), "`type`"),
    "time-missing": (encode(event(time=...)), "`time`"),
    "data-missing": (encode(event(data=...)), "data.object"),
    "object-missing": (encode(event(data={"context": {}})), "object"),
    "object-not-an-object": (encode(event(data={"object": [USER_ID]})), "Expected `object`"),
    "deeply-nested-body": (DEEP, "Expected `object`"),
    "deeply-nested-data": (encode(event(data="@@")).replace(b'"@@"', DEEP), "nested too deeply"),
    "deeply-nested-object-field": (
        encode(with_object(custom="@@")).replace(b'"@@"', DEEP),
        "nested too deeply",
    ),
    "deeply-nested-objects": (
        encode(with_object(custom="@@")).replace(b'"@@"', b'{"a":' * 100_000),
        "nested too deeply",
    ),
}


@pytest.mark.parametrize(("raw", "mentions"), FAILURES.values(), ids=FAILURES.keys())
def test_unusable_event_is_undecodable_with_a_useful_message(raw, mentions):
    message = undecodable(raw)

    assert mentions.lower() in message.lower()
    assert len(message) < 500


def test_largest_bigint_logins_count_is_accepted():
    assert decode_user_event(with_object(logins_count=2**63 - 1)).profile["logins_count"] == 2**63 - 1


FIXTURE_BODIES = [encode(fixture(name)) for name in FIXTURE_NAMES]


@st.composite
def damaged_fixtures(draw: st.DrawFn) -> bytes:
    """A real event body with a few bytes replaced: close enough to valid to reach the field checks."""
    body = draw(st.sampled_from(FIXTURE_BODIES))
    start = draw(st.integers(0, len(body)))
    length = draw(st.integers(0, 8))
    return body[:start] + draw(st.binary(max_size=8)) + body[start + length :]


def decode_or_refuse(raw: bytes) -> None:
    with contextlib.suppress(UndecodableEvent):
        decode_event(raw)


@given(st.one_of(st.binary(max_size=512), damaged_fixtures()))
def test_any_bytes_decode_or_raise_undecodable_event(raw):
    decode_or_refuse(raw)


@given(
    st.one_of(st.binary(max_size=512), damaged_fixtures(), damaged_fixtures().map(lambda b: b"[" + b + b"]"))
)
def test_any_body_splits_or_raises_undecodable_event(raw):
    try:
        items = split_body(raw)
    except UndecodableEvent:
        return
    for item in items:
        decode_or_refuse(item)
