"""The CloudEvents Auth0 sends, and the one place they are decoded.

Decoding is deliberately tolerant where Auth0's documentation disagrees with itself (a `com.auth0.` type
prefix, unknown fields, numeric identity ids, the minimal `user.deleted`) and strict where a wrong type
would otherwise reach a typed column. Anything that fails here is authentic but unusable: the caller
dead-letters it rather than rejecting it, because Auth0 never retries a 4xx.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

# Auth0 ids are 26 characters; the bound only keeps absurd values out of the ledger's primary key.
EventId = Annotated[str, Meta(min_length=1, max_length=255)]
UserId = Annotated[str, Meta(min_length=1, max_length=512)]
AwareDatetime = Annotated[datetime, Meta(tz=True)]
# Stored in a bigint column; msgspec would otherwise accept up to 2**64 - 1.
Count = Annotated[int, Meta(ge=0, le=2**63 - 1)]

Optional = UnsetType  # shorthand for "may be absent from the payload"


class Identity(Struct, kw_only=True, forbid_unknown_fields=False):
    connection: str | Optional = UNSET
    provider: str | Optional = UNSET
    user_id: str | int | Optional = UNSET
    isSocial: bool | Optional = UNSET


class UserObject(Struct, kw_only=True, forbid_unknown_fields=False):
    """`data.object`: checked field by field; the stored profile keeps the raw object, extra fields too."""

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


class Envelope(Struct, kw_only=True, forbid_unknown_fields=False):
    id: EventId
    type: Annotated[str, Meta(min_length=1, max_length=255)]
    time: AwareDatetime
    data: msgspec.Raw = msgspec.Raw(b"null")
    a0purpose: str | Optional | None = UNSET
    a0tenant: str | Optional | None = UNSET
    a0stream: str | Optional | None = UNSET


class UserEventData(Struct, forbid_unknown_fields=False):
    object: msgspec.Raw


class EventKind(enum.Enum):
    CREATED = "user.created"
    UPDATED = "user.updated"
    DELETED = "user.deleted"


@dataclass(frozen=True, slots=True)
class UserEvent:
    """A decoded `user.*` event: what the handlers need, nothing more."""

    id: str
    kind: EventKind
    time: datetime
    user_id: str
    profile: dict[str, Any]  # data.object exactly as sent, unknown fields included
    is_snapshot: bool
    deleted_at: datetime | None


@dataclass(frozen=True, slots=True)
class OtherEvent:
    """A test event, or a type the relay does not handle: recorded in the ledger, never applied."""

    id: str
    type: str
    time: datetime
    is_test: bool
    user_id: str | None


Event = UserEvent | OtherEvent


class UndecodableEvent(ValueError):
    """An authentic body that cannot become an event; the message says why, for the dead letter."""


class _OriginFields(Struct, forbid_unknown_fields=False):
    a0tenant: Any = None
    a0stream: Any = None


@dataclass(frozen=True, slots=True)
class Origin:
    """Where an event says it comes from: its `a0tenant` and `a0stream`, when it names them."""

    tenant: str | None
    stream: str | None


_envelope_decoder = msgspec.json.Decoder(Envelope)
_user_data_decoder = msgspec.json.Decoder(UserEventData)
_profile_decoder = msgspec.json.Decoder(dict[str, Any])
_body_items_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_origin_decoder = msgspec.json.Decoder(_OriginFields)
_KINDS = {kind.value: kind for kind in EventKind}
# msgspec reports invalid UTF-8 inside a JSON string as UnicodeDecodeError, not as a DecodeError.
_DECODE_ERRORS = (msgspec.DecodeError, RecursionError, UnicodeDecodeError)


def split_body(body: bytes) -> list[bytes]:
    """The events of a request body: one JSON object, or a JSON array of them (webhook batches)."""
    if body.lstrip()[:1] == b"[":
        try:
            return [bytes(item) for item in _body_items_decoder.decode(body)]
        except _DECODE_ERRORS as error:
            raise UndecodableEvent(f"body is not a JSON array of events: {error}") from None
    return [body]


def decode_event(raw: bytes) -> Event:
    """Decodes one CloudEvent, or raises `UndecodableEvent` saying what is wrong with it."""
    try:
        envelope = _envelope_decoder.decode(raw)
    except _DECODE_ERRORS as error:
        raise UndecodableEvent(f"not a CloudEvent: {_describe(error)}") from None

    event_type = envelope.type.removeprefix("com.auth0.")
    kind = _KINDS.get(event_type)
    if envelope.a0purpose == "test" or kind is None:
        return OtherEvent(
            id=envelope.id,
            type=event_type,
            time=envelope.time,
            is_test=envelope.a0purpose == "test",
            user_id=_peek_user_id(envelope.data),
        )

    try:
        object_json = _user_data_decoder.decode(envelope.data).object
        checked = msgspec.json.decode(object_json, type=UserObject)
        profile = _profile_decoder.decode(object_json)
    except _DECODE_ERRORS as error:
        raise UndecodableEvent(f"{event_type} data.object is not an Auth0 user: {_describe(error)}") from None
    if kind is EventKind.DELETED:
        deleted_at = checked.deleted_at if isinstance(checked.deleted_at, datetime) else envelope.time
    else:
        deleted_at = None
    return UserEvent(
        id=envelope.id,
        kind=kind,
        time=envelope.time,
        user_id=checked.user_id,
        profile=profile,
        is_snapshot=all(profile.get(name) is not None for name in SNAPSHOT_FIELDS),
        deleted_at=deleted_at,
    )


def read_origin(raw: bytes) -> Origin | None:
    """The tenant and stream an item names, read before (and whether or not) it decodes as an event, so
    the allow-lists hold for broken events too; None when the item is not even a JSON object."""
    try:
        found = _origin_decoder.decode(raw)
    except _DECODE_ERRORS:
        return None
    return Origin(
        found.a0tenant if isinstance(found.a0tenant, str) else None,
        found.a0stream if isinstance(found.a0stream, str) else None,
    )


def _peek_user_id(data: msgspec.Raw) -> str | None:
    """The user a test or unhandled event speaks of, if it says, for the ledger; never an error."""
    try:
        found = msgspec.json.decode(data, type=UserEventData).object
        user_id = msgspec.json.decode(found, type=dict[str, Any]).get("user_id")
    except _DECODE_ERRORS:
        return None
    return user_id if isinstance(user_id, str) and 0 < len(user_id) <= 512 else None


def _describe(error: Exception) -> str:
    if isinstance(error, RecursionError):
        return "JSON nested too deeply"
    if isinstance(error, UnicodeDecodeError):
        return "a JSON string is not valid UTF-8"
    return str(error)
