"""The shared handlers: what each event does to a stored user, whichever route or tool it came from.

Events arrive at least once and in any order, so the stored state must not depend on arrival order. It is
kept as a last-writer-wins map: every top-level profile field remembers the version (event `time`, then
event `id` to break ties) of the event that last wrote it, a full snapshot (or a scrubbing delete) sets a
floor below which older writes no longer count, and `user.created` / `user.deleted` compete on their own
version for whether the user is live. Applying events in any order, with any duplicates, therefore yields
exactly what applying them one by one in version order would: a partial update that arrives late still
fills the fields no newer event has written, and a late, older event never undoes a newer one.

These functions are pure; `store.py` loads and saves the state around them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from relay.events import EventKind, UserEvent, Version
from relay.settings import DeleteMode

# What a scrubbing delete keeps of the profile: identifiers and timestamps, nothing personal.
SCRUB_KEPT_FIELDS = frozenset({"user_id", "created_at", "updated_at", "deleted_at"})


class Outcome(enum.StrEnum):
    """What happened to an event; recorded in `processed_events.outcome`."""

    APPLIED = "applied"  # the newest event so far for its user
    TOMBSTONED = "tombstoned"  # a delete that is the newest event so far for its user
    STALE = "stale"  # older than what is stored; any fields no newer event wrote were still merged
    DUPLICATE = "duplicate"  # already processed
    TEST = "test"  # `a0purpose: "test"`: recorded, not applied
    IGNORED = "ignored"  # a type the relay does not handle
    DEAD_LETTERED = "dead_lettered"  # authentic but unusable: kept in `dead_letters`


@dataclass(slots=True)
class UserState:
    """A user as stored, with the versions that make merging order-independent.

    A profile field written by the newest snapshot carries that snapshot's version; only fields written
    since (by partial events) keep a version of their own, which keeps the stored bookkeeping small.
    """

    user_id: str
    profile: dict[str, Any] = field(default_factory=dict)
    field_versions: dict[str, Version] = field(default_factory=dict)  # fields newer than the snapshot
    snapshot_version: Version | None = None  # writes older than this no longer count
    lifecycle_version: Version | None = None  # the newest user.created or user.deleted
    deleted_at: datetime | None = None
    last_version: Version | None = None  # the newest event applied, of any kind

    def to_merge_state(self) -> dict[str, Any]:
        """The bookkeeping stored in `users.merge_state` (JSON)."""
        return {
            "fields": {name: list(version) for name, version in self.field_versions.items()},
            "snapshot": list(self.snapshot_version) if self.snapshot_version else None,
            "lifecycle": list(self.lifecycle_version) if self.lifecycle_version else None,
            "last": list(self.last_version) if self.last_version else None,
        }

    @classmethod
    def from_stored(
        cls, user_id: str, profile: dict[str, Any], merge_state: dict[str, Any], deleted_at: datetime | None
    ) -> UserState:
        def version(value: Any) -> Version | None:
            return (int(value[0]), str(value[1])) if value else None

        return cls(
            user_id=user_id,
            profile=dict(profile),
            field_versions={
                name: (int(v[0]), str(v[1])) for name, v in merge_state.get("fields", {}).items()
            },
            snapshot_version=version(merge_state.get("snapshot")),
            lifecycle_version=version(merge_state.get("lifecycle")),
            deleted_at=deleted_at,
            last_version=version(merge_state.get("last")),
        )


def apply_event(state: UserState, event: UserEvent, delete_mode: DeleteMode) -> Outcome:
    """Folds one event into `state` (in place) and says what it amounted to."""
    version = event.version
    if event.kind is EventKind.DELETED and delete_mode == "scrub":
        fields = {name: value for name, value in event.profile.items() if name in SCRUB_KEPT_FIELDS}
        replaces = True
    else:
        fields = event.profile
        replaces = event.is_snapshot and event.kind is not EventKind.DELETED

    if replaces and (state.snapshot_version is None or version > state.snapshot_version):
        # Everything written before this snapshot goes; fields written after it stay, and win over it.
        newer = {name: v for name, v in state.field_versions.items() if v > version}
        kept = {name: state.profile[name] for name in newer if name in state.profile}
        state.field_versions = newer
        state.profile = {**fields, **kept}
        state.snapshot_version = version
    elif state.snapshot_version is None or version >= state.snapshot_version:
        # A partial write (or an older snapshot) wins each field it carries that no newer event wrote.
        floor = state.snapshot_version
        profile, field_versions = state.profile, state.field_versions
        for name, value in fields.items():
            if name in profile:
                written = field_versions.get(name, floor)
                if written is not None and version <= written:
                    continue
            profile[name] = value
            if version == floor:
                field_versions.pop(name, None)
            else:
                field_versions[name] = version

    if event.kind is not EventKind.UPDATED and (
        state.lifecycle_version is None or version > state.lifecycle_version
    ):
        state.lifecycle_version = version
        state.deleted_at = event.deleted_at if event.kind is EventKind.DELETED else None

    if state.last_version is not None and version <= state.last_version:
        return Outcome.STALE
    state.last_version = version
    return Outcome.TOMBSTONED if event.kind is EventKind.DELETED else Outcome.APPLIED
