"""The CloudEvents Auth0 sends, and the one place they are decoded.

Every item of a request body becomes exactly one of three things, decided here and nowhere else: a
`UserEvent` (one of the three types the relay applies), an `OtherEvent` (a test event, or a type the relay
does not handle: recorded, never applied), or `Undecodable` (authentic but unusable: kept as a dead letter,
because Auth0 never retries a 4xx). Decoding never raises.

The JSON is parsed once: straight into the envelope with `data.object` as a dict, which is the profile as
sent, unknown fields included. The fields that reach typed columns are then checked on that dict without
parsing again. Decoding is tolerant where Auth0's documentation disagrees with itself (a `com.auth0.` type
prefix, unknown fields, numeric identity ids, the minimal `user.deleted`) and strict where a wrong type would
otherwise reach a typed column, or a time would leave the range the store can hold.
"""

from __future__ import annotations

import enum
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

# Auth0 ids are 26 characters; the bound only keeps absurd values out of the ledger's primary key.
EventId = Annotated[str, Meta(min_length=1, max_length=255)]
EventType = Annotated[str, Meta(min_length=1, max_length=255)]
UserId = Annotated[str, Meta(min_length=1, max_length=512)]
AwareDatetime = Annotated[datetime, Meta(tz=True)]
# Stored in a bigint column; msgspec would otherwise accept up to 2**64 - 1.
Count = Annotated[int, Meta(ge=0, le=2**63 - 1)]

Optional = UnsetType  # shorthand for "may be absent from the payload"

# An event's version: (its `time` in microseconds since the epoch, its id). Tuples compare exactly as
# versions must: later time wins, and equal times are broken by the id.
Version = tuple[int, str]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_micros(moment: datetime) -> int:
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


class Identity(Struct, kw_only=True, forbid_unknown_fields=False):
    connection: str | Optional = UNSET
    provider: str | Optional = UNSET
    user_id: str | int | Optional = UNSET
    isSocial: bool | Optional = UNSET


class UserObject(Struct, kw_only=True, forbid_unknown_fields=False):
    """The fields of `data.object` that reach typed columns, and their types; the profile keeps the rest."""

    user_id: UserId
    email: str | Optional | None = UNSET
    email_verified: bool | Optional | None = UNSET
    name: str | Optional | None = UNSET
    given_name: str | Optional | None = UNSET
    family_name: str | Optional | None = UNSET
    nickname: str | Optional | None = UNSET
    picture: str | Optional | None = UNSET
    username: str | Optional | None = UNSET
    phone_number: str | Optional | None = UNSET
    phone_verified: bool | Optional | None = UNSET
    blocked: bool | Optional | None = UNSET
    created_at: AwareDatetime | Optional | None = UNSET
    updated_at: AwareDatetime | Optional | None = UNSET
    last_login: AwareDatetime | Optional | None = UNSET
    deleted_at: AwareDatetime | Optional | None = UNSET
    logins_count: Count | Optional | None = UNSET
    identities: list[Identity] | Optional | None = UNSET
    app_metadata: dict[str, Any] | Optional | None = UNSET
    user_metadata: dict[str, Any] | Optional | None = UNSET


# A full snapshot carries all of these; an object missing any of them is merged over what is stored.
SNAPSHOT_FIELDS = ("user_id", "created_at", "updated_at", "identities")


class EventKind(enum.StrEnum):
    CREATED = "user.created"
    UPDATED = "user.updated"
    DELETED = "user.deleted"


class Origin(Struct, frozen=True):
    """Where an event says it comes from: its `a0tenant` and `a0stream`, when it names them."""

    tenant: str | None = None
    stream: str | None = None


class UserEvent(Struct, frozen=True):
    """A decoded `user.*` event: what the handlers need, and the raw item in case it must be dead-lettered."""

    id: str
    kind: EventKind
    time: datetime  # UTC
    version: Version
    user_id: str
    profile: dict[str, Any]  # data.object exactly as sent, unknown fields included
    is_snapshot: bool
    deleted_at: datetime | None  # UTC; set for user.deleted only
    origin: Origin
    raw: bytes


class OtherEvent(Struct, frozen=True):
    """A test event, or a type the relay does not handle: recorded in the ledger, never applied."""

    id: str
    type: str
    time: datetime
    is_test: bool
    user_id: str | None
    origin: Origin
    raw: bytes


class Undecodable(Struct, frozen=True):
    """An authentic item that cannot become an event; `reason` says why, for the dead letter."""

    raw: bytes
    reason: str
    origin: Origin | None = None  # None: not even the envelope could be read
    id: str | None = None  # the event's id, when the envelope could be read


Item = UserEvent | OtherEvent | Undecodable


class _UserData(Struct, forbid_unknown_fields=False):
    object: dict[str, Any]


class _CloudEvent(Struct, kw_only=True, forbid_unknown_fields=False):
    """The shape of every user event: one parse gives the envelope and the profile."""

    id: EventId
    type: EventType
    time: AwareDatetime
    data: _UserData
    a0purpose: str | None = None
    a0tenant: str | None = None
    a0stream: str | None = None


class _Envelope(Struct, kw_only=True, forbid_unknown_fields=False):
    """Read only when `_CloudEvent` does not fit: a test event or another type may carry any `data`."""

    id: EventId
    type: EventType
    time: AwareDatetime
    data: msgspec.Raw = msgspec.Raw(b"null")
    a0purpose: str | None = None
    a0tenant: str | None = None
    a0stream: str | None = None


class _OriginFields(Struct, forbid_unknown_fields=False):
    a0tenant: Any = None
    a0stream: Any = None


class _NamedUser(Struct, forbid_unknown_fields=False):
    user_id: Any = None


class _NamedUserData(Struct, forbid_unknown_fields=False):
    object: _NamedUser | None = None


# A profile's numbers with a fraction or an exponent become Decimals, not floats, so that a value a double
# cannot hold (0.1000000000000000000001, 1e-400) reaches PostgreSQL's jsonb, which keeps it as sent.
_event_decoder = msgspec.json.Decoder(_CloudEvent, float_hook=Decimal)
_envelope_decoder = msgspec.json.Decoder(_Envelope)
_items_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_origin_decoder = msgspec.json.Decoder(_OriginFields)
_named_user_decoder = msgspec.json.Decoder(_NamedUserData)
_KINDS = {kind.value: kind for kind in EventKind}
# msgspec reports invalid UTF-8 inside a JSON string as UnicodeDecodeError, and JSON nested beyond what the
# stack allows as RecursionError, not as a DecodeError.
_DECODE_ERRORS = (msgspec.DecodeError, RecursionError, UnicodeDecodeError)
# A UTC offset can carry a time near year 1 or 9999 past the end of what a datetime holds.
_OUT_OF_RANGE = "time or deleted_at is out of range once converted to UTC"
_HOLDS_NUL = "the event holds a \\u0000 character, which PostgreSQL cannot store in text or jsonb"


def decode_body(body: bytes) -> list[Item]:
    """The items of a request body: one JSON object, or a JSON array of them (webhook batches)."""
    if body.lstrip()[:1] == b"[":
        raw_items: list[bytes] | list[msgspec.Raw] | None
        try:
            raw_items = _items_decoder.decode(body)
        except RecursionError as error:
            # msgspec finds each item's end by descending into it, so one item nested past the recursion
            # limit would make every event of the body one dead letter. Scanning without recursion keeps
            # that item's fate its own.
            raw_items = _split_array_iteratively(body)
            if raw_items is None:
                return [Undecodable(body, f"body is not a JSON array of events: {_describe(error)}")]
        except _DECODE_ERRORS as error:
            return [Undecodable(body, f"body is not a JSON array of events: {_describe(error)}")]
        return [decode_event(bytes(raw)) for raw in raw_items]
    return [decode_event(body)]


# A JSON string (escapes included) or one structural character: what an array's top level is split on.
_STRING_OR_STRUCTURE = re.compile(rb'"(?:[^"\\]|\\.)*"|[][{},]', re.DOTALL)


_CLOSING = {ord("["): ord("]"), ord("{"): ord("}")}


def _split_array_iteratively(body: bytes) -> list[bytes] | None:
    """The items of a JSON array, found without recursion; None when the body is not one well-formed array.

    Only the array's own structure is checked here: each item is then decoded, and judged, on its own.
    """
    items: list[bytes] = []
    open_brackets = bytearray()  # a stack, so `[{]}` is refused as a parser would refuse it
    item_start, end = 0, None
    for token in _STRING_OR_STRUCTURE.finditer(body):
        char = body[token.start()]
        if char in b"[{":
            open_brackets.append(char)
            if len(open_brackets) == 1:
                item_start = token.end()
        elif char in b"]}":
            if not open_brackets or _CLOSING[open_brackets.pop()] != char:
                return None
            if not open_brackets:
                items.append(body[item_start : token.start()])
                end = token.end()
                break
        elif char == ord(",") and len(open_brackets) == 1:
            items.append(body[item_start : token.start()])
            item_start = token.end()
    if end is None or body[end:].strip() or body[: body.index(b"[")].strip():
        return None
    if items == [items[0]] and not items[0].strip():
        return []  # `[]`
    return [item.strip() for item in items]


def decode_event(raw: bytes) -> Item:
    """One CloudEvent, decoded; never raises."""
    try:
        event = _event_decoder.decode(raw)
    except _DECODE_ERRORS as error:
        return _not_a_user_event_shape(raw, error)
    origin = Origin(event.a0tenant, event.a0stream)
    # The byte search is cheap and almost always false; only then is the event searched for a real NUL.
    if b"\\u0000" in raw and holds_nul(raw):
        return Undecodable(raw, _HOLDS_NUL, origin, event.id)
    event_type = event.type.removeprefix("com.auth0.")
    kind = _KINDS.get(event_type)
    if kind is None or event.a0purpose == "test":
        user_id = event.data.object.get("user_id")
        return _other_event(event.id, event_type, event.time, event.a0purpose, user_id, origin, raw)

    profile = event.data.object
    try:
        checked = msgspec.convert(profile, UserObject)
        time = event.time.astimezone(UTC)
        deleted_at = None
        if kind is EventKind.DELETED:
            deleted_at = time
            if isinstance(checked.deleted_at, datetime):
                deleted_at = checked.deleted_at.astimezone(UTC)
    except (msgspec.ValidationError, RecursionError) as error:
        reason = f"{event_type} data.object is not an Auth0 user: {_describe(error)}"
        return Undecodable(raw, reason, origin, event.id)
    except OverflowError:
        return Undecodable(raw, f"{event_type} {_OUT_OF_RANGE}", origin, event.id)
    return UserEvent(
        id=event.id,
        kind=kind,
        time=time,
        version=(to_micros(time), event.id),
        user_id=checked.user_id,
        profile=profile,
        is_snapshot=all(profile.get(name) is not None for name in SNAPSHOT_FIELDS),
        deleted_at=deleted_at,
        origin=origin,
        raw=raw,
    )


def _not_a_user_event_shape(raw: bytes, error: Exception) -> Item:
    """The slow path: a test event or another type may carry any `data`; a user event may not."""
    try:
        envelope = _envelope_decoder.decode(raw)
    except _DECODE_ERRORS as envelope_error:
        return Undecodable(raw, f"not a CloudEvent: {_describe(envelope_error)}", _read_origin(raw))
    origin = Origin(envelope.a0tenant, envelope.a0stream)
    if b"\\u0000" in raw and holds_nul(raw):
        return Undecodable(raw, _HOLDS_NUL, origin, envelope.id)
    event_type = envelope.type.removeprefix("com.auth0.")
    if event_type in _KINDS and envelope.a0purpose != "test":
        reason = f"{event_type} data.object is not an Auth0 user: {_describe(error)}"
        return Undecodable(raw, reason, origin, envelope.id)
    return _other_event(
        envelope.id, event_type, envelope.time, envelope.a0purpose, _named_user(envelope.data), origin, raw
    )


def _other_event(
    event_id: str,
    event_type: str,
    time: datetime,
    purpose: str | None,
    user_id: Any,
    origin: Origin,
    raw: bytes,
) -> OtherEvent | Undecodable:
    try:
        utc_time = time.astimezone(UTC)
    except OverflowError:
        return Undecodable(raw, f"{event_type} {_OUT_OF_RANGE}", origin, event_id)
    return OtherEvent(
        id=event_id,
        type=event_type,
        time=utc_time,
        is_test=purpose == "test",
        # The user a test or unhandled event speaks of, if it says, for the ledger.
        user_id=user_id if isinstance(user_id, str) and 0 < len(user_id) <= 512 else None,
        origin=origin,
        raw=raw,
    )


def _named_user(data: msgspec.Raw) -> Any:
    try:
        found = _named_user_decoder.decode(data)
    except _DECODE_ERRORS:
        return None
    return found.object.user_id if found.object is not None else None


def _read_origin(raw: bytes) -> Origin | None:
    """The tenant and stream an undecodable item names, so the allow-lists hold for broken events too; None
    when the item is not even a JSON object."""
    try:
        found = _origin_decoder.decode(raw)
    except _DECODE_ERRORS:
        return None
    return Origin(
        found.a0tenant if isinstance(found.a0tenant, str) else None,
        found.a0stream if isinstance(found.a0stream, str) else None,
    )


def holds_nul(raw: bytes) -> bool:
    """Whether a NUL character is in any string, key or value, of a JSON document (or it is nested too
    deeply to tell)."""
    try:
        return _has_nul(msgspec.json.decode(raw))
    except _DECODE_ERRORS:
        return True


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in key or _has_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_has_nul(item) for item in value)
    return False


def _describe(error: Exception) -> str:
    if isinstance(error, RecursionError):
        return "JSON nested too deeply"
    if isinstance(error, UnicodeDecodeError):
        return "a JSON string is not valid UTF-8"
    return str(error)
