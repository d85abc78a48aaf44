"""`relay verify`: show end to end that changes made in Auth0 reach the relay's copy in PostgreSQL.

It creates a throw-away user (random example.com email, random password) in a database connection and waits
for its row in `users`. Then it renames the user and waits for the new name, and deletes the user and waits
for the tombstone. Each step tells `progress` how long the change took to arrive, counted from the Management
API request. If anything fails, the caller deletes the user again (`clean_up`) so the tenant is left as it
was. The relay keeps the tombstone row, as it does for every deleted user. Only the Management API is written
to; the database is only read.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from relay import store
from relay.auth0.management import Management, ManagementError
from relay.settings import Settings
from relay.store import DirectConnection, WatchedUser


class VerificationFailed(Exception):
    """Synchronization could not be shown; the message says where it broke."""


class StepTimedOut(VerificationFailed):
    """A change made in Auth0 did not reach PostgreSQL in time; the message names the step."""


@dataclass
class ThrowAwayUser:
    email: str
    password: str
    name: str
    new_name: str
    user_id: str | None = None
    deleted: bool = False

    @classmethod
    def random(cls) -> ThrowAwayUser:
        suffix = secrets.token_hex(6)
        return cls(
            email=f"relay-verify-{suffix}@example.com",
            password=_throwaway_password(),
            name=f"Relay Verify {suffix}",
            new_name=f"Relay Verify {suffix} (renamed)",
        )

    @property
    def left_in_auth0(self) -> bool:
        """Created in Auth0 and not deleted yet: what `clean_up` is for."""
        return bool(self.user_id) and not self.deleted


class Verification:
    """One run of `relay verify` against `api`'s tenant and the relay's database at `conninfo`.

    `run` raises VerificationFailed, ManagementError, or the store's errors (`NotMigrated` when the schema has
    no users table, found before anything is created in Auth0).
    """

    def __init__(
        self,
        api: Management,
        conninfo: str,
        settings: Settings,
        *,
        connection: str,
        timeout: float = 60.0,
        poll_interval: float = 0.2,
        progress: Callable[[str], None] = lambda _line: None,
    ) -> None:
        self.api = api
        self.user = ThrowAwayUser.random()
        self._conninfo = conninfo
        self._settings = settings
        self._schema = settings.db_schema
        self._connection = connection
        self._timeout = timeout
        self._poll_interval = poll_interval
        self._progress = progress

    def run(self) -> None:
        with store.direct_connection(self._conninfo, self._settings) as database:
            store.find_watched_user(database, "")
            self._progress(
                f"Auth0 tenant {self.api.domain}, connection {self._connection!r}; schema {self._schema}"
            )
            self._create_rename_delete(database)

    def clean_up(self) -> None:
        """Deletes the throw-away user from Auth0 (ManagementError if Auth0 refuses)."""
        user_id = self.user.user_id or ""
        self.api.call(
            "delete the test user",
            "delete:users",
            lambda sdk, once: sdk.users.delete(user_id, request_options=once),
        )

    def _create_rename_delete(self, database: DirectConnection) -> None:
        user, connection, schema, say = self.user, self._connection, self._schema, self._progress
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
        say(f"created {user_id} ({user.email}) in Auth0")
        waited = self._wait(database, "user.created", "its row", started, lambda row: row is not None)
        say(f"user.created: row in {schema}.users after {waited:.1f} s")

        started = time.monotonic()
        self.api.call(
            "rename the test user",
            "update:users",
            lambda sdk, once: sdk.users.update(user_id, name=user.new_name, request_options=once),
        )
        waited = self._wait(
            database,
            "user.updated",
            "the new name",
            started,
            lambda row: row is not None and row.name == user.new_name,
        )
        say(f"user.updated: new name in {schema}.users after {waited:.1f} s")

        started = time.monotonic()
        self.api.call(
            "delete the test user",
            "delete:users",
            lambda sdk, once: sdk.users.delete(user_id, request_options=once),
        )
        user.deleted = True
        waited = self._wait(
            database,
            "user.deleted",
            "the tombstone (deleted_at)",
            started,
            lambda row: row is not None and bool(row.deleted_at),
        )
        say(f"user.deleted: tombstone in {schema}.users after {waited:.1f} s")
        say("synchronization verified: created, updated and deleted in Auth0, each seen in PostgreSQL")

    def _wait(
        self,
        database: DirectConnection,
        event: str,
        what: str,
        started: float,
        arrived: Callable[[WatchedUser | None], bool],
    ) -> float:
        """Seconds from `started` until `arrived` holds for the stored row; StepTimedOut after the timeout."""
        deadline = time.monotonic() + self._timeout
        while True:
            if arrived(store.find_watched_user(database, self.user.user_id or "")):
                return time.monotonic() - started
            if time.monotonic() >= deadline:
                raise StepTimedOut(
                    f"timed out after {self._timeout:g} s waiting for {event}: {what} of "
                    f"{self.user.user_id} did not reach {self._schema}.users. Look at the event stream's "
                    "failed deliveries in the Auth0 Dashboard and at the relay's log"
                )
            time.sleep(self._poll_interval)


def _throwaway_password() -> str:
    """Random, and accepted by every Auth0 password policy: long, four kinds of character, no triple."""
    while True:
        candidate = secrets.token_urlsafe(24) + "aZ7!"
        if not re.search(r"(.)\1\1", candidate):
            return candidate
