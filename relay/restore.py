"""The copy turned back into files: the live users of one database connection as the JSON array that Auth0's
bulk user import job takes (`POST /api/v2/jobs/users-imports`), or every live profile as a users export job
writes it (NDJSON), which `relay backfill --file` loads into another copy.

Only the fields that format accepts are written, each only when it has the type the format gives it: the
import refuses a file with any other field. The user id is the one the connection knows (the identity's
`user_id`, which the import prefixes with the connection's strategy again, `auth0|…`), so a restored user
keeps their id. `app_metadata` loses the keys Auth0 reserves for itself, which the import refuses. A user
without an email cannot be imported (the format requires one) and is counted instead. Password hashes are
not in the copy (Auth0 never sends them in an event or an export): restored users must reset their password.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, Any

import msgspec

# The properties of Auth0's bulk import user schema that the copy can hold, with their JSON types; the
# others (password_hash, custom_password_hash, mfa_factors) are secrets Auth0 never sends.
IMPORT_FIELDS: dict[str, type] = {
    "email": str,
    "email_verified": bool,
    "username": str,
    "given_name": str,
    "family_name": str,
    "name": str,
    "nickname": str,
    "picture": str,
    "blocked": bool,
    "app_metadata": dict,
    "user_metadata": dict,
}

# Keys that the import refuses inside app_metadata: Auth0 keeps them for itself.
RESERVED_APP_METADATA = frozenset(
    {
        "__tenant",
        "_id",
        "blocked",
        "clientID",
        "created_at",
        "email_verified",
        "email",
        "globalClientID",
        "global_client_id",
        "identities",
        "lastIP",
        "lastLogin",
        "loginsCount",
        "metadata",
        "multifactor_last_modified",
        "multifactor",
        "updated_at",
        "user_id",
    }
)

# Auth0 takes an import file of at most this many bytes; a larger one must be split over several jobs.
IMPORT_FILE_LIMIT = 500 * 1024

_encode = msgspec.json.Encoder(decimal_format="number").encode


def import_user(profile: dict[str, Any], connection: str) -> dict[str, Any] | None:
    """The user as the bulk import takes it into `connection`, or None when it cannot be imported (no
    email)."""
    if not isinstance(profile.get("email"), str):
        return None
    user: dict[str, Any] = {"user_id": _connection_user_id(profile, connection)}
    for name, kind in IMPORT_FIELDS.items():
        value = profile.get(name)
        # bool is an int in Python, and an int is never a string: the exact type, or nothing.
        if type(value) is kind:
            user[name] = value
    if "app_metadata" in user:
        user["app_metadata"] = {
            key: value for key, value in user["app_metadata"].items() if key not in RESERVED_APP_METADATA
        }
    return user


def _connection_user_id(profile: dict[str, Any], connection: str) -> str:
    for identity in profile.get("identities") or ():
        is_theirs = isinstance(identity, dict) and identity.get("connection") == connection
        if is_theirs and isinstance(identity.get("user_id"), str | int):
            return str(identity["user_id"])
    return str(profile["user_id"]).partition("|")[2] or str(profile["user_id"])


class Format(enum.StrEnum):
    AUTH0_IMPORT = "auth0-import"  # the bulk import job's JSON array, for one database connection
    EXPORT = "export"  # a users export job's NDJSON, one profile a line: what `relay backfill --file` loads


@dataclass(frozen=True, slots=True)
class Written:
    users: int  # written
    without_email: int  # left out of an import file: the format requires an email
    size: int  # bytes written


def write_users(
    profiles: Iterable[dict[str, Any]],
    target: IO[bytes],
    shape: Format,
    connection: str | None,
    *,
    progress: Callable[[int], None] = lambda _read: None,
) -> Written:
    """Writes `profiles` to `target` in `shape`, a user a line; `progress(read)` after each thousand profiles
    read. An import file is for one `connection` (required); an export is every profile whole, exactly as
    stored, so that loading it into an empty schema gives the same profiles."""
    importing = shape is Format.AUTH0_IMPORT
    if importing and connection is None:
        raise ValueError("an import file is for one connection")
    users = without_email = read = 0
    size = target.write(b"[" if importing else b"")
    for profile in profiles:
        read += 1
        if read % 1000 == 0:
            progress(read)
        user = import_user(profile, connection) if importing and connection is not None else profile
        if user is None:
            without_email += 1
            continue
        if importing:
            size += target.write((b",\n" if users else b"\n") + _encode(user))
        else:
            size += target.write(_encode(user) + b"\n")
        users += 1
    size += target.write(b"\n]\n" if importing else b"")
    progress(read)
    return Written(users, without_email, size)
