"""`relay deploy-action`: put the Action from `action/` into a tenant and point an event stream at it.

Steps, each told to `progress` as a line: find the Action by name; create it, or update it when its code,
runtime, trigger or secrets differ; wait until Auth0 has built it; deploy it; then find the event stream by
name and create it, or fix its destination, subscriptions and status. A run that finds everything right
writes nothing.

Auth0 never returns a secret's value, so a changed secret cannot be seen by reading the Action. Instead the
code sent to Auth0 ends with a fingerprint line: an HMAC-SHA256, keyed by `RELAY_SIGNING_SECRET`, of every
secret name and value. A changed URL or secret changes the code, and comparing the code Auth0 holds with the
code this run would send tells whether anything changed. Without the signing secret the fingerprint reveals
nothing. The secrets are always sent as the whole list, because an update replaces the list Auth0 holds.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay.auth0.management import (
    CREDENTIAL_VARIABLES,
    Credentials,
    Management,
    RateLimited,
    credentials_from,
    read_variables,
)
from relay.settings import ConfigError, decode_signing_secret

if TYPE_CHECKING:
    from auth0.management import Action, EventStreamResponseContent, GetActionResponseContent

DEFAULT_NAME = "user-sync-relay"
TRIGGER_ID = "event-stream"
TRIGGER_VERSION = "v1"
RUNTIME = "node22"
EVENT_TYPES = ("user.created", "user.updated", "user.deleted")
ACTION_FILE = "forward-to-relay.js"

RELAY_VARIABLES = {
    "RELAY_URL": "the relay's public https:// base URL; the Action posts to <RELAY_URL>/events/action",
    "RELAY_SIGNING_SECRET": "the whsec_ secret the Action signs with (also listed in the relay's "
    "RELAY_SIGNING_SECRETS)",
}
PREVIOUS_SECRET = "RELAY_SIGNING_SECRET_PREVIOUS"  # noqa: S105  (a variable's name)

_FINGERPRINT_PREFIX = "// relay deploy-action: secrets fingerprint (HMAC keyed by the signing secret) "


class DeployFailed(Exception):
    """The Action could not be built or deployed; the message says why."""


@dataclass(frozen=True, slots=True)
class ActionSecrets:
    relay_url: str = field(repr=False)
    signing_secret: str = field(repr=False)
    previous_signing_secret: str | None = field(default=None, repr=False)

    def items(self) -> list[tuple[str, str]]:
        """Every secret the Action gets, as (name, value): always the whole list."""
        items = [("RELAY_URL", self.relay_url), ("RELAY_SIGNING_SECRET", self.signing_secret)]
        if self.previous_signing_secret:
            items.append((PREVIOUS_SECRET, self.previous_signing_secret))
        return items

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.items()]

    def fingerprint(self) -> str:
        message = json.dumps(sorted(self.items()), separators=(",", ":")).encode()
        return hmac.new(self.signing_secret.encode(), message, hashlib.sha256).hexdigest()


def read_environment(environ: Mapping[str, str]) -> tuple[Credentials, ActionSecrets]:
    """The Management API credentials and the Action's secrets; every missing variable named at once."""
    values = read_variables(environ, {**CREDENTIAL_VARIABLES, **RELAY_VARIABLES})
    credentials = credentials_from(values)
    relay_url = values["RELAY_URL"]
    parts = urllib.parse.urlsplit(relay_url)
    if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment or parts.username:
        raise ConfigError(
            "RELAY_URL: expected the relay's https:// base URL without query, fragment or credentials "
            "(Auth0 sends user profiles to it)"
        )
    decode_signing_secret(values["RELAY_SIGNING_SECRET"], "RELAY_SIGNING_SECRET")
    previous = environ.get(PREVIOUS_SECRET, "").strip() or None
    if previous:
        decode_signing_secret(previous, PREVIOUS_SECRET)
    return credentials, ActionSecrets(relay_url, values["RELAY_SIGNING_SECRET"], previous)


def action_source() -> str:
    """The Action's code, from `action/` in a checkout (or beside the package in an installation)."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "action" / ACTION_FILE, package.parent / "action" / ACTION_FILE):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8")
    raise ConfigError(
        f"action/{ACTION_FILE}: not found; run relay deploy-action from a checkout of the repository"
    )


def action_code(source: str, secrets: ActionSecrets) -> str:
    """What Auth0 gets as the Action's code: the source, then the secrets' fingerprint line."""
    return f"{source.rstrip()}\n\n{_FINGERPRINT_PREFIX}{secrets.fingerprint()}\n"


@dataclass(frozen=True, slots=True)
class Deployed:
    changes: int  # what was changed (or, in a dry run, would have been): none when all was right already


def ensure_deployed(
    environ: Mapping[str, str],
    *,
    name: str = DEFAULT_NAME,
    stream_name: str = DEFAULT_NAME,
    dry_run: bool = False,
    progress: Callable[[str], None] = lambda _line: None,
    on_rate_limit: RateLimited = lambda _what, _seconds: None,
    sleep: Callable[[float], None] = time.sleep,
    build_timeout: float = 60.0,
    poll_interval: float = 1.0,
) -> Deployed:
    """Runs `relay deploy-action`, telling `progress` each step. Raises ConfigError for bad configuration
    (before any request), DeployFailed or ManagementError when the tenant could not be brought in line."""
    credentials, secrets = read_environment(environ)
    source = action_source()
    api = Management(
        credentials, sleep=sleep, secrets=[value for _, value in secrets.items()], on_rate_limit=on_rate_limit
    )
    deployer = _Deployer(api, name, source, secrets, dry_run, sleep, build_timeout, poll_interval, progress)
    progress(
        f"Auth0 tenant {credentials.domain}" + (" (dry run: nothing will be written)" if dry_run else "")
    )
    action_id = deployer.ensure_action()
    deployer.ensure_stream(stream_name, action_id)
    return Deployed(deployer.changes)


def find_stream(api: Management, stream_name: str) -> EventStreamResponseContent | None:
    """The tenant's event stream named `stream_name`, if there is one."""
    streams = api.call(
        "list the event streams",
        "read:event_streams",
        lambda sdk, once: list(sdk.event_streams.list(take=100, request_options=once)),
    )
    return next((stream for stream in streams if stream.name == stream_name and stream.id), None)


def stream_drift(existing: EventStreamResponseContent) -> tuple[dict[str, Any], list[str]]:
    """The update that makes a stream send exactly `EVENT_TYPES` and be enabled (empty when it does), and
    each change in words."""
    from auth0.management import EventStreamSubscription

    changes: dict[str, Any] = {}
    described: list[str] = []
    current = {s.event_type for s in existing.subscriptions or [] if s.event_type}
    if current != set(EVENT_TYPES):
        changes["subscriptions"] = [
            EventStreamSubscription(event_type=event_type) for event_type in EVENT_TYPES
        ]
        added, removed = sorted(set(EVENT_TYPES) - current), sorted(current - set(EVENT_TYPES))
        described.append(
            "subscriptions" + "".join(f" +{t}" for t in added) + "".join(f" -{t}" for t in removed)
        )
    if existing.status != "enabled":
        changes["status"] = "enabled"
        described.append(f"status {existing.status} → enabled")
    return changes, described


@dataclass
class _Deployer:
    api: Management
    name: str
    source: str
    secrets: ActionSecrets
    dry_run: bool
    sleep: Callable[[float], None]
    build_timeout: float
    poll_interval: float
    say: Callable[[str], None]
    changes: int = 0

    def ensure_action(self) -> str | None:
        """The id of the deployed Action (None in a dry run that would create it)."""
        label = f"Action {self.name!r}"
        existing = self._find_action()
        code = action_code(self.source, self.secrets)
        secret_names = ", ".join(self.secrets.names)
        if existing is None or not existing.id:
            self._change(
                f"{label}: not found; {self._will('creating', 'would create')} it (trigger {TRIGGER_ID} "
                f"{TRIGGER_VERSION}, runtime {RUNTIME}, secrets {secret_names})"
            )
            if self.dry_run:
                self.say(f"{label}: would wait for the build, then deploy it")
                return None
            action_id = self._create_action(code)
            self.say(f"{label}: created ({action_id})")
        else:
            action_id = existing.id
            label = f"Action {self.name!r} ({action_id})"
            differences = self._differences(existing)
            if differences:
                self._change(
                    f"{label}: {', '.join(differences)} changed; {self._will('updating', 'would update')} it "
                    f"with the whole secrets list ({secret_names})"
                )
                if not self.dry_run:
                    self._update_action(action_id, code)
            elif not existing.all_changes_deployed:
                self._change(f"{label}: up to date, but not all of it is deployed")
            else:
                self.say(f"{label}: up to date and deployed")
                return action_id
            if self.dry_run:
                self.say(f"{label}: would wait for the build, then deploy it")
                return action_id
        self._wait_for_build(action_id, label)
        version = self.api.call(
            "deploy the Action",
            "create:actions",
            lambda sdk, once: sdk.actions.deploy(action_id, request_options=once),
        )
        number = f" version {version.number:g}" if version.number is not None else ""
        self.say(f"{label}: deployed{number}")
        return action_id

    def _create_action(self, code: str) -> str:
        from auth0.management import ActionSecretRequest, ActionTrigger

        created = self.api.call(
            "create the Action",
            "create:actions",
            lambda sdk, once: sdk.actions.create(
                name=self.name,
                supported_triggers=[ActionTrigger(id=TRIGGER_ID, version=TRIGGER_VERSION)],
                code=code,
                runtime=RUNTIME,
                secrets=[ActionSecretRequest(name=name, value=value) for name, value in self.secrets.items()],
                request_options=once,
            ),
        )
        if not created.id:
            raise DeployFailed("Auth0 created the Action but did not return its id")
        return created.id

    def _update_action(self, action_id: str, code: str) -> None:
        from auth0.management import ActionSecretRequest, ActionTrigger

        self.api.call(
            "update the Action",
            "update:actions",
            lambda sdk, once: sdk.actions.update(
                action_id,
                supported_triggers=[ActionTrigger(id=TRIGGER_ID, version=TRIGGER_VERSION)],
                code=code,
                runtime=RUNTIME,
                secrets=[ActionSecretRequest(name=name, value=value) for name, value in self.secrets.items()],
                request_options=once,
            ),
        )

    def ensure_stream(self, stream_name: str, action_id: str | None) -> None:
        from auth0.management import (
            CreateEventStreamActionRequestContent,
            EventStreamActionConfiguration,
            EventStreamActionDestination,
            EventStreamActionResponseContent,
            EventStreamSubscription,
        )

        label = f"Event stream {stream_name!r}"
        subscriptions = [EventStreamSubscription(event_type=event_type) for event_type in EVENT_TYPES]
        target = "the new Action" if action_id is None else f"Action {action_id}"
        destination = EventStreamActionDestination(
            type="action", configuration=EventStreamActionConfiguration(action_id=action_id or "")
        )
        existing = find_stream(self.api, stream_name)
        if existing is None or not existing.id:
            self._change(
                f"{label}: not found; {self._will('creating', 'would create')} it "
                f"({target}, {', '.join(EVENT_TYPES)}, enabled)"
            )
            if self.dry_run:
                return
            request = CreateEventStreamActionRequestContent(
                name=stream_name, subscriptions=subscriptions, destination=destination, status="enabled"
            )
            created = self.api.call(
                "create the event stream",
                "create:event_streams",
                lambda sdk, once: sdk.event_streams.create(request=request, request_options=once),
            )
            self.say(f"{label}: created ({created.id}), enabled")
            return

        stream_id = existing.id
        label = f"Event stream {stream_name!r} ({stream_id})"
        changes: dict[str, Any] = {}
        described: list[str] = []
        points_here = (
            isinstance(existing, EventStreamActionResponseContent)
            and existing.destination is not None
            and existing.destination.configuration.action_id == action_id
        )
        if not points_here:
            changes["destination"] = destination
            described.append(f"destination → {target}")
        drift, drift_described = stream_drift(existing)
        changes.update(drift)
        described += drift_described
        if not changes:
            self.say(f"{label}: up to date ({target}, {', '.join(EVENT_TYPES)}, enabled)")
            return
        self._change(f"{label}: {self._will('updating', 'would update')} {'; '.join(described)}")
        if not self.dry_run:
            self.api.call(
                "update the event stream",
                "update:event_streams",
                lambda sdk, once: sdk.event_streams.update(stream_id, **changes, request_options=once),
            )
            self.say(f"{label}: updated")

    def _find_action(self) -> Action | None:
        actions = self.api.call(
            "look up the Action",
            "read:actions",
            lambda sdk, once: (
                sdk.actions.list(
                    action_name=self.name, trigger_id=TRIGGER_ID, per_page=50, request_options=once
                ).items
                or []
            ),
        )
        named = [action for action in actions if action.name == self.name]
        if len(named) > 1:
            raise DeployFailed(
                f"{len(named)} Actions are named {self.name!r}; delete the extra ones or use --name"
            )
        return named[0] if named else None

    def _differences(self, existing: Action) -> list[str]:
        differences = []
        held_source, marker, held_fingerprint = (existing.code or "").rpartition(f"\n\n{_FINGERPRINT_PREFIX}")
        if not marker or held_source != self.source.rstrip():
            differences.append("code")
        if existing.runtime != RUNTIME:
            differences.append(f"runtime ({existing.runtime} → {RUNTIME})")
        triggers = [(trigger.id, trigger.version) for trigger in existing.supported_triggers or []]
        if triggers != [(TRIGGER_ID, TRIGGER_VERSION)]:
            differences.append("trigger")
        held_names = sorted(secret.name or "" for secret in existing.secrets or [])
        if held_names != sorted(self.secrets.names) or held_fingerprint.strip() != self.secrets.fingerprint():
            differences.append("secrets")
        return differences

    def _wait_for_build(self, action_id: str, label: str) -> None:
        started = time.monotonic()
        last_status = None
        for poll in range(max(1, math.ceil(self.build_timeout / self.poll_interval))):
            if poll:
                self.sleep(self.poll_interval)
            action = self.api.call(
                "read the Action's build status",
                "read:actions",
                lambda sdk, once: sdk.actions.get(action_id, request_options=once),
            )
            if action.status != last_status:
                last_status = action.status
                self.say(f"{label}: build {action.status} ({time.monotonic() - started:.0f} s)")
            if action.status == "built":
                return
            if action.status == "failed":
                raise DeployFailed(f"Auth0 could not build the Action: {_build_errors(action)}")
        raise DeployFailed(
            f"the Action was not built within {self.build_timeout:g} s (status {last_status}); run it again"
        )

    def _change(self, line: str) -> None:
        self.changes += 1
        self.say(line)

    def _will(self, doing: str, would_do: str) -> str:
        return would_do if self.dry_run else doing


def _build_errors(action: GetActionResponseContent) -> str:
    """Auth0's build errors, when the Action carries them (`errors`, as a version does)."""
    errors = (action.model_extra or {}).get("errors") or []
    messages = [
        ": ".join(str(part) for part in (error.get("id"), error.get("msg")) if part)
        for error in errors
        if isinstance(error, Mapping)
    ]
    if any(messages):
        return "; ".join(message for message in messages if message)
    return "status failed, with no error details in the answer; open the Action in the Dashboard to see why"
