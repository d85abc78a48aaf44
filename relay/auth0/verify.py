"""`relay verify`: show end to end that changes made in Auth0 reach the relay's copy in PostgreSQL.

It creates a throw-away user (random example.com email, random password) in a database connection and waits
for its row in `users`. Then it renames the user and waits for the new name, and deletes the user and waits
for the tombstone. Each step prints how long the change took to arrive, counted from the Management API
request. If anything fails, the user is deleted again so the tenant is left as it was. The relay keeps the
tombstone row, as it does for every deleted user. Only the Management API is written to; the database is
only read.
"""

from __future__ import annotations

import re
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from relay.auth0.management import Credentials, Management, ManagementError
from relay.settings import Settings
from relay.store import FIND_USER, connection_options

_DATABASE_HINT = "point DATABASE_URL and RELAY_DB_SCHEMA at the relay's database"


@dataclass(frozen=True, slots=True)
class StoredUser:
    name: str | None
    deleted_at: datetime | None


class VerificationFailed(Exception):
    """Synchronization could not be shown; the message says where it broke."""


class StepTimedOut(VerificationFailed):
    """A change made in Auth0 did not reach PostgreSQL in time; the message names the step."""


@dataclass
class _ThrowAwayUser:
    email: str
    password: str
    name: str
    new_name: str
    user_id: str | None = None
    deleted: bool = False


def verify_synchronization(
    credentials: Credentials,
    conninfo: str,
    settings: Settings,
    *,
    connection: str,
    timeout: float = 60.0,
    poll_interval: float = 0.2,
) -> int:
    """Runs `relay verify`; returns the exit status."""
    api = Management(credentials)
    suffix = secrets.token_hex(6)
    user = _ThrowAwayUser(
        email=f"relay-verify-{suffix}@example.com",
        password=_throwaway_password(),
        name=f"Relay Verify {suffix}",
        new_name=f"Relay Verify {suffix} (renamed)",
    )
    try:
        with psycopg.connect(conninfo, **connection_options(settings)) as database:
            _check_database(database, settings.db_schema)
            _say(f"Auth0 tenant {api.domain}, connection {connection!r}; schema {settings.db_schema}")
            _Verification(api, database, settings.db_schema, user, timeout, poll_interval).run(connection)
    except (VerificationFailed, ManagementError) as error:
        print(f"relay verify: {_one_line(error)}", file=sys.stderr, flush=True)
        return 1
    except psycopg.Error as error:
        print(f"relay verify: PostgreSQL: {_one_line(error)}; {_DATABASE_HINT}", file=sys.stderr, flush=True)
        return 1
    finally:
        if user.user_id and not user.deleted:
            _clean_up(api, user)
    return 0


@dataclass
class _Verification:
    api: Management
    database: psycopg.Connection[Any]
    schema: str
    user: _ThrowAwayUser
    timeout: float
    poll_interval: float

    def run(self, connection: str) -> None:
        user = self.user
        started = time.monotonic()
        created = self.api.call(
            f"create a user in connection {connection!r}",
            "create:users",
            lambda sdk, once: sdk.users.create(
                connection=connection,
                email=user.email,
                password=user.password,
                name=user.name,
                # A verification email to example.com would only bounce.
                verify_email=False,
                request_options=once,
            ),
        )
        if not created.user_id:
            raise ManagementError("Auth0 created the user but did not return its user_id")
        user_id = user.user_id = created.user_id
        _say(f"created {user_id} ({user.email}) in Auth0")
        waited = self._wait("user.created", "its row", started, lambda row: row is not None)
        _say(f"user.created: row in {self.schema}.users after {waited:.1f} s")

        started = time.monotonic()
        self.api.call(
            "rename the test user",
            "update:users",
            lambda sdk, once: sdk.users.update(user_id, name=user.new_name, request_options=once),
        )
        waited = self._wait(
            "user.updated", "the new name", started, lambda row: row is not None and row.name == user.new_name
        )
        _say(f"user.updated: new name in {self.schema}.users after {waited:.1f} s")

        started = time.monotonic()
        self.api.call(
            "delete the test user",
            "delete:users",
            lambda sdk, once: sdk.users.delete(user_id, request_options=once),
        )
        user.deleted = True
        waited = self._wait(
            "user.deleted",
            "the tombstone (deleted_at)",
            started,
            lambda row: row is not None and bool(row.deleted_at),
        )
        _say(f"user.deleted: tombstone in {self.schema}.users after {waited:.1f} s")
        _say("synchronization verified: created, updated and deleted in Auth0, each seen in PostgreSQL")

    def _wait(
        self, event: str, what: str, started: float, arrived: Callable[[StoredUser | None], bool]
    ) -> float:
        """Seconds from `started` until `arrived` holds for the stored row; StepTimedOut after the timeout."""
        deadline = time.monotonic() + self.timeout
        while True:
            row = self.database.execute(FIND_USER, {"user_id": self.user.user_id}).fetchone()
            if arrived(StoredUser(*row) if row else None):
                return time.monotonic() - started
            if time.monotonic() >= deadline:
                raise StepTimedOut(
                    f"timed out after {self.timeout:g} s waiting for {event}: {what} of "
                    f"{self.user.user_id} did not reach {self.schema}.users. Look at the event stream's "
                    "failed deliveries in the Auth0 Dashboard and at the relay's log"
                )
            time.sleep(self.poll_interval)


def _check_database(database: psycopg.Connection[Any], schema: str) -> None:
    try:
        database.execute(FIND_USER, {"user_id": ""})
    except psycopg.errors.UndefinedTable:
        raise VerificationFailed(f"no users table in schema {schema!r}; {_DATABASE_HINT}") from None


def _clean_up(api: Management, user: _ThrowAwayUser) -> None:
    user_id = user.user_id or ""
    try:
        api.call(
            "delete the test user",
            "delete:users",
            lambda sdk, once: sdk.users.delete(user_id, request_options=once),
        )
    except ManagementError as error:
        print(
            f"relay verify: clean-up failed, delete {user_id} ({user.email}) by hand: {error}",
            file=sys.stderr,
            flush=True,
        )
        return
    _say(f"clean-up: deleted {user_id} from Auth0")


def _throwaway_password() -> str:
    """Random, and accepted by every Auth0 password policy: long, four kinds of character, no triple."""
    while True:
        candidate = secrets.token_urlsafe(24) + "aZ7!"
        if not re.search(r"(.)\1\1", candidate):
            return candidate


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _say(line: str) -> None:
    print(line, flush=True)
