"""Promise 2's reference: random histories of one tenant's user events, and the state they must leave.

The reference model applies each user's events (and export rows) once each, one by one in version order, and
is written as plainly as the promises read, independently of `relay.handlers`: the relay must reach the same
state whatever the arrival order, the duplicates, the batching and the concurrency.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from hypothesis import strategies as st

from tests.support.database import Database
from tests.support.events import BASE_TIME, iso, user_event

# DESIGN.md, promise 4: an object carrying all of these is a full snapshot.
SNAPSHOT_FIELDS = ("user_id", "created_at", "updated_at", "identities")
# README: in scrub mode a deletion keeps only these of the profile.
SCRUB_KEPT_FIELDS = ("user_id", "created_at", "updated_at", "deleted_at")

FIELD_VALUES: dict[str, list[Any]] = {
    "email": ["a@example.com", "B@Example.com", "c@example.org"],
    "name": ["Ann", "Bo", "Zoë"],
    "nickname": ["ann", "bo"],
    "logins_count": [0, 1, 7],
    "blocked": [True, False],
    "app_metadata": [{}, {"plan": "pro"}, {"plan": "free", "seats": 3}],
    "custom_field": ["x", "y"],
}


@dataclass(frozen=True)
class Spec:
    """One event of a history before it is given an id: kind, user, time offset, and the fields it carries."""

    kind: str  # created | updated | deleted | test
    user: int
    millis: int
    fields: dict[str, Any]


@dataclass(frozen=True)
class RowSpec:
    """One users-export row: a full snapshot of a user, versioned by its updated_at."""

    user: int
    millis: int
    fields: dict[str, Any]


def user_id_of(prefix: str, user: int) -> str:
    return f"auth0|{prefix}-{user}"


def snapshot_fields(user: int, millis: int) -> dict[str, Any]:
    return {
        "identities": [{"provider": "auth0", "connection": "db", "user_id": str(user)}],
        "created_at": iso(BASE_TIME),
        "updated_at": iso(BASE_TIME + timedelta(milliseconds=millis)),
    }


def make_spec(kind: str, user: int, millis: int, fields: dict[str, Any], shape: str) -> Spec:
    """`shape`: `snapshot` (a full object; never for a delete), `deleted_at` (a delete carrying only its
    deleted_at, half a millisecond after the event), `updated_at` (a partial object that says when), or
    `partial`."""
    if shape == "snapshot" and kind != "deleted":
        fields = {**fields, **snapshot_fields(user, millis)}
    elif shape == "deleted_at" and kind == "deleted":
        fields = {"deleted_at": iso(BASE_TIME + timedelta(milliseconds=millis, microseconds=500))}
    elif shape == "updated_at":
        fields = {**fields, "updated_at": iso(BASE_TIME + timedelta(milliseconds=millis))}
    return Spec(kind, user, millis, fields)


@st.composite
def event_specs(draw: st.DrawFn, *, users: int = 3, millis: int = 7, tests: bool = True) -> Spec:
    """Creates, full and partial updates, deletes (and test events), over few users and few instants, so
    equal times and conflicts are common."""
    kinds = ["created", "updated", "updated", "deleted"] + (["test"] if tests else [])
    names = draw(st.lists(st.sampled_from(sorted(FIELD_VALUES)), unique=True))
    return make_spec(
        draw(st.sampled_from(kinds)),
        draw(st.integers(0, users - 1)),
        draw(st.integers(0, millis - 1)),
        {name: draw(st.sampled_from(FIELD_VALUES[name])) for name in names},
        draw(st.sampled_from(["snapshot", "deleted_at", "updated_at", "partial"])),
    )


@st.composite
def row_specs(draw: st.DrawFn, *, users: int = 3, millis: int = 9) -> RowSpec:
    names = draw(st.lists(st.sampled_from(sorted(FIELD_VALUES)), unique=True))
    return RowSpec(
        draw(st.integers(0, users - 1)),
        draw(st.integers(0, millis - 1)),
        {name: draw(st.sampled_from(FIELD_VALUES[name])) for name in names},
    )


@st.composite
def deliveries(draw: st.DrawFn, max_events: int = 14) -> tuple[list[Spec], list[int]]:
    """A history, and the order it is delivered in: a permutation, with duplicates inserted anywhere."""
    history = draw(st.lists(event_specs(), min_size=1, max_size=max_events))
    delivered = list(draw(st.permutations(range(len(history)))))
    for duplicate in draw(st.lists(st.integers(0, len(history) - 1), max_size=5)):
        delivered.insert(draw(st.integers(0, len(delivered))), duplicate)
    return history, delivered


def conflicting_history(chooser: random.Random, users: int, events: int) -> list[Spec]:
    """Creates, full and partial updates, deletes and test events for a few users, with many equal times."""
    return [
        make_spec(
            chooser.choice(["created", "updated", "updated", "updated", "deleted", "test"]),
            chooser.randrange(users),
            chooser.randrange(60),
            {
                name: chooser.choice(FIELD_VALUES[name])
                for name in chooser.sample(sorted(FIELD_VALUES), k=chooser.randint(0, 4))
            },
            chooser.choice(["snapshot", "snapshot", "deleted_at", "updated_at", "partial"]),
        )
        for _ in range(events)
    ]


def to_cloudevents(history: list[Spec], prefix: str) -> list[dict[str, Any]]:
    """Gives each spec an id and turns it into the CloudEvent Auth0 would send."""
    events = []
    for number, spec in enumerate(history):
        # Ids drawn at random, so that equal times are broken in no particular pattern.
        event_id = f"evt_{prefix}{secrets.token_hex(4)}{number:03d}"
        user_id = user_id_of(prefix, spec.user)
        if spec.kind == "test":
            events.append(
                user_event("created", event_id, spec.millis, user_id, **spec.fields) | {"a0purpose": "test"}
            )
        else:
            events.append(user_event(spec.kind, event_id, spec.millis, user_id, **spec.fields))
    return events


def to_export_rows(rows: list[RowSpec], prefix: str) -> list[dict[str, Any]]:
    return [
        {"user_id": user_id_of(prefix, row.user), **snapshot_fields(row.user, row.millis), **row.fields}
        for row in rows
    ]


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@dataclass
class ExpectedUser:
    profile: dict[str, Any]
    deleted_at: datetime | None = None
    last_version: tuple[datetime, str] | None = None  # (last_event_processed, last_event_id)


def reference_copy(
    events: Iterable[dict[str, Any]], export_rows: Iterable[dict[str, Any]] = (), delete_mode: str = "soft"
) -> dict[str, ExpectedUser]:
    """Every user's events and export rows, once each, in version order, applied as the promises read.

    An event's version is (`time`, `id`); an export row is a `user.updated` full snapshot whose version is
    (`updated_at`, "backfill"). Test events change no user.
    """
    versioned: list[tuple[tuple[datetime, str], str, dict[str, Any], datetime]] = []
    for sent in events:
        if sent.get("a0purpose") != "test":
            moment = parse_time(sent["time"])
            versioned.append(((moment, sent["id"]), sent["type"], sent["data"]["object"], moment))
    for row in export_rows:
        moment = parse_time(row.get("updated_at") or row["created_at"])
        versioned.append(((moment, "backfill"), "user.updated", row, moment))

    expected: dict[str, ExpectedUser] = {}
    for version, kind, user_object, moment in sorted(versioned, key=lambda entry: entry[0]):
        user = expected.setdefault(user_object["user_id"], ExpectedUser({}))
        if kind == "user.deleted":
            deleted_at = user_object.get("deleted_at")
            user.deleted_at = parse_time(deleted_at) if deleted_at else moment
            if delete_mode == "scrub":
                user.profile = {name: user_object[name] for name in SCRUB_KEPT_FIELDS if name in user_object}
            else:
                user.profile = {**user.profile, **user_object}
        else:
            if kind == "user.created":
                user.deleted_at = None
            full = all(user_object.get(name) is not None for name in SNAPSHOT_FIELDS)
            user.profile = dict(user_object) if full else {**user.profile, **user_object}
        user.last_version = version
    return expected


def assert_copy_matches(
    database: Database,
    events: list[dict[str, Any]],
    prefix: str,
    *,
    export_rows: list[dict[str, Any]] | None = None,
    delete_mode: str = "soft",
) -> None:
    """The users of `prefix` in PostgreSQL are exactly the reference's, and every event is in the ledger."""
    expected = reference_copy(events, export_rows or [], delete_mode)
    rows = database.query(
        "SELECT user_id, profile, deleted_at, last_event_processed, last_event_id, email "
        "FROM users WHERE user_id LIKE %s",
        [f"auth0|{prefix}-%"],
    )
    assert {row[0] for row in rows} == set(expected)
    for user_id, profile, deleted_at, last_time, last_id, email in rows:
        want = expected[user_id]
        assert profile == want.profile, user_id
        assert deleted_at == want.deleted_at, user_id
        assert (last_time, last_id) == want.last_version, user_id
        assert email == want.profile.get("email"), user_id  # the typed columns follow the profile

    ledger = database.query(
        "SELECT count(*) FROM processed_events WHERE event_id LIKE %s", [f"evt_{prefix}%"]
    )
    assert ledger == [(len(events),)]
