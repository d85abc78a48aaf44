"""The one event builder: CloudEvents as Auth0 sends them, made from the fixtures in tests/fixtures/ (one per
event type), and the rows of a users export, as backfill reads them."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.support import FIXTURES

# A time before every fixture's, for histories built around it.
BASE_TIME = datetime(2025, 1, 1, tzinfo=UTC)

# The CloudEvent's own attributes; every other keyword of `cloudevent()` is a `data.object` field.
ENVELOPE_FIELDS = frozenset(
    {"specversion", "type", "source", "id", "time", "data", "a0tenant", "a0stream", "a0purpose"}
)
# The events Auth0 sends (other documents, such as schemas, live in subfolders).
FIXTURE_NAMES = sorted(path.stem for path in FIXTURES.glob("*.json"))

_KEEP: Any = object()


def fixture(name: str) -> dict[str, Any]:
    """One of the JSON fixtures as a fresh dict, e.g. `fixture("user.created")`."""
    loaded: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return loaded


def iso(moment: datetime) -> str:
    """A time as Auth0 writes it: UTC, milliseconds, `Z`."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def cloudevent(
    name: str = "user.created",
    /,
    *,
    data_object: Any = _KEEP,
    envelope: Mapping[str, Any] | None = None,
    **changes: Any,
) -> dict[str, Any]:
    """The fixture `name` (`user.created`, `user.updated`, `user.deleted`, `user.deleted.minimal`,
    `test-event`), changed.

    Keywords naming a CloudEvent attribute (`id`, `type`, `time`, `a0tenant`, `a0stream`, `a0purpose`,
    `data`, …) set it; any other keyword sets that field of `data.object` (`user_id`, `email`, …). A value of
    `...` removes the field. A `datetime` becomes Auth0's text form. `data_object` replaces `data.object`
    whole, with any JSON value; `envelope` sets top-level fields the relay does not know.
    """
    built = fixture(name)
    if data_object is not _KEEP:
        built["data"]["object"] = data_object
    for field, value in {**changes, **(envelope or {})}.items():
        target = built if field in ENVELOPE_FIELDS or field in (envelope or {}) else built["data"]["object"]
        if value is ...:
            target.pop(field, None)
        else:
            target[field] = iso(value) if isinstance(value, datetime) else value
    return built


def user_event(kind: str, event_id: str, at: datetime | int, user_id: str, **fields: Any) -> dict[str, Any]:
    """A `user.{kind}` event whose `data.object` is `user_id` and `fields` only: a partial object, unless the
    fields make it a full snapshot. `at` is its time, or milliseconds after BASE_TIME."""
    moment = at if isinstance(at, datetime) else BASE_TIME + timedelta(milliseconds=at)
    return cloudevent(f"user.{kind}", id=event_id, time=moment, data_object={"user_id": user_id, **fields})


def new_users(tag: str, count: int, **changes: Any) -> Iterator[dict[str, Any]]:
    """`count` user.created events, each for a user of its own: `auth0|{tag}-{n}`, event `evt_{tag}{n:08d}`,
    email `user{n}@{tag}.example`, a millisecond apart."""
    for number in range(count):
        yield cloudevent(
            "user.created",
            id=f"evt_{tag}{number:08d}",
            time=BASE_TIME + timedelta(milliseconds=number),
            user_id=f"auth0|{tag}-{number}",
            email=f"user{number}@{tag}.example",
            **changes,
        )


# Data that every reader on the way accepts and PostgreSQL alone refuses: a JSON number beyond what its
# numeric type holds (the relay keeps a profile's numbers exact, so it passes them on as sent). `encode`
# writes the number wherever this string stands, since the standard library cannot write it.
NUMBER_POSTGRESQL_REFUSES = "number PostgreSQL refuses: 1e99999999"
REFUSED_NUMBER_ERROR = "value overflows numeric format"


def encode(value: Any) -> bytes:
    """Compact JSON, as Auth0 and the Action send it."""
    text = json.dumps(value, separators=(",", ":"))
    return text.replace(f'"{NUMBER_POSTGRESQL_REFUSES}"', "1e99999999").encode()


def export_row(user_id: str, updated: datetime, **fields: Any) -> dict[str, Any]:
    """One user as a JSON users export lists it: the explicit field list, metadata objects whole."""
    local_id = user_id.split("|")[-1]
    return {
        "user_id": user_id,
        "email": f"{local_id}@example.com",
        "email_verified": True,
        "name": f"User {local_id}",
        "identities": [
            {"connection": "Username-Password-Authentication", "provider": "auth0", "user_id": local_id}
        ],
        "app_metadata": {"plan": "pro"},
        "user_metadata": {},
        "created_at": iso(BASE_TIME),
        "updated_at": iso(updated),
        "logins_count": 1,
        **fields,
    }


def export_rows(count: int) -> list[dict[str, Any]]:
    """`auth0|user00000`, `auth0|user00001`, …, updated a second apart."""
    return [
        export_row(f"auth0|user{number:05d}", BASE_TIME + timedelta(seconds=number))
        for number in range(count)
    ]


def ndjson(rows: list[dict[str, Any]]) -> bytes:
    """Export rows as the export file holds them: one JSON object a line."""
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)
