"""Configuration from the environment, validated once at start-up.

Every problem is reported as one `ConfigError` line that names the variable and what was expected, so
`relay serve` can refuse to start with a message an operator can act on instead of a traceback.

Every variable that holds a secret may instead name a file holding it, as `NAME_FILE` (Docker and Kubernetes
mount secrets as files, and a file keeps the secret out of the process list and the container's spec).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import psycopg
from psycopg.conninfo import conninfo_to_dict

from relay.signing import HEADERS_NOT_FOR_CREDENTIALS

DeleteMode = Literal["soft", "scrub"]

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# The change feed's channel is `<schema>_users_changed`; PostgreSQL names hold at most 63 bytes.
CHANGE_FEED_SUFFIX = "_users_changed"
_LONGEST_CHANNEL = 63
_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
# As Auth0 documents `a0tenant` (the tenant name) and `a0stream` (the event stream id).
_TENANT_NAME = re.compile(r"[a-z0-9][-a-z0-9]{1,62}[a-z0-9]")
_STREAM_ID = re.compile(r"est_[A-Za-z0-9]{1,64}")
# Standard Webhooks secrets carry 24 to 64 random bytes; fewer is too weak to accept.
_MIN_SECRET_BYTES = 24
# EventBridge source names: letters, digits and . / _ - (e.g. aws.partner/auth0.com/acme-<uuid>/auth0.events).
_EVENT_SOURCE = re.compile(r"[A-Za-z0-9./_-]{1,256}")
# An SQS queue URL, e.g. https://sqs.us-east-1.amazonaws.com/123456789012/auth0-events; the region is read
# from its host when AWS_REGION / AWS_DEFAULT_REGION are unset.
_QUEUE_URL = re.compile(r"https?://[^/\s]+/[0-9]+/[A-Za-z0-9_-]{1,80}(\.fifo)?")
_REGION_IN_QUEUE_HOST = re.compile(r"sqs\.([a-z0-9-]+)\.amazonaws\.com(\.cn)?")


# The variables holding a secret: the relay's own, and those of the Auth0 commands.
SECRET_VARIABLES = (
    "DATABASE_URL",
    "RELAY_SIGNING_SECRETS",
    "RELAY_WEBHOOK_TOKENS",
    "RELAY_WEBHOOK_BASIC",
    "RELAY_WEBHOOK_HEADER",
    "AUTH0_CLIENT_SECRET",
    "RELAY_SIGNING_SECRET",
    "RELAY_SIGNING_SECRET_PREVIOUS",
)
SECRET_FILE_SUFFIX = "_FILE"  # noqa: S105  (a suffix of variable names)


class ConfigError(ValueError):
    """A configuration variable is missing or malformed; the message names it."""


def secrets_from_files(environ: Mapping[str, str]) -> dict[str, str]:
    """{NAME: the file's content, surrounding white space removed} for each secret variable given as
    `NAME_FILE`. Both set is an error: which one was meant cannot be guessed."""
    found = {}
    for name in SECRET_VARIABLES:
        file_variable = name + SECRET_FILE_SUFFIX
        path = environ.get(file_variable, "").strip()
        if not path:
            continue
        if environ.get(name, "").strip():
            raise ConfigError(f"{name} and {file_variable} are both set: keep one of them")
        try:
            found[name] = Path(path).read_text(encoding="utf-8").strip()
        except OSError as error:
            raise ConfigError(f"{file_variable}: cannot read {path!r}: {error.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{file_variable}: {path!r} is not UTF-8 text") from None
    return found


def use_secret_files(environ: MutableMapping[str, str]) -> None:
    """Moves each secret given as a file into `environ` under its own name (dropping `NAME_FILE`), so this
    process, the worker processes it starts and the Auth0 commands all read it like any other variable."""
    for name, value in secrets_from_files(environ).items():
        environ[name] = value
        del environ[name + SECRET_FILE_SUFFIX]


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str | None = None
    """libpq URI of the PostgreSQL to write to; unset starts an embedded server under `data_dir`."""
    signing_secrets: tuple[bytes, ...] = ()
    """HMAC keys (decoded from `whsec_…`) that may sign requests to `/events/action`."""
    webhook_tokens: tuple[str, ...] = ()
    """Bearer tokens accepted on `/events/webhook`."""
    webhook_basic: tuple[str, ...] = ()
    """`user:password` pairs accepted as HTTP Basic credentials on `/events/webhook`."""
    webhook_headers: tuple[tuple[str, str], ...] = ()
    """(lower-case header name, value) pairs accepted as a custom-header credential on `/events/webhook`."""
    db_schema: str = "auth0"
    """PostgreSQL schema that holds the relay's tables."""
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 8000
    """Port to listen on."""
    max_body_bytes: int = 256 * 1024
    """Largest request body accepted; larger ones get 413 before they are read whole."""
    delete_mode: DeleteMode = "soft"
    """`soft` keeps a deleted user's profile beside the tombstone; `scrub` clears its personal fields."""
    history: bool = False
    """Keep every merged event's object, and every export row, in `user_events` (`RELAY_HISTORY=on`)."""
    change_feed: bool = True
    """NOTIFY the users each commit wrote on `<schema>_users_changed` (`RELAY_CHANGE_FEED=off` to stop)."""
    pool_size: int = 10
    """Most PostgreSQL connections this process holds."""
    db_timeout_seconds: float = 2.0
    """Longest wait for a pooled connection before answering 503, kept well inside Auth0's retry budget."""
    batch_max_events: int = 500
    """Most events committed in one transaction; 1 gives one transaction per event."""
    batch_max_wait_ms: float = 1.0
    """How long a batch may wait for more events once it has one; 0 takes only what is already queued."""
    batch_flushers: int = 1
    """Batches committed at the same time, per worker (each holds one pooled connection)."""
    queue_max_events: int = 2000
    """Events that may wait for a commit; beyond that the relay answers 503 instead of queueing more."""
    data_dir: Path = field(default_factory=lambda: Path(".data"))
    """Where the embedded PostgreSQL and the generated development credentials live."""
    log_level: str = "INFO"
    """Python logging level name."""
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    """Processes serving HTTP on one socket, each with its own pool and group committer."""
    allowed_tenants: frozenset[str] = frozenset()
    """Tenants (`a0tenant`) whose events are accepted; empty accepts any."""
    allowed_streams: frozenset[str] = frozenset()
    """Event streams (`a0stream`) whose events are accepted; empty accepts any."""
    eventbridge_sources: frozenset[str] = frozenset()
    """EventBridge `source` names accepted (partner event sources); empty accepts any Auth0 partner source."""
    sqs_queue_url: str | None = None
    """The SQS queue an EventBridge rule fills; set, `relay serve` long-polls it beside the HTTP routes."""
    aws_region: str | None = None
    """The queue's AWS region (AWS_REGION, AWS_DEFAULT_REGION, or the queue URL's host)."""
    sqs_visibility_seconds: int = 30
    """How long a received message stays hidden from other consumers; extended while its batch is slow."""
    sqs_pollers: int = 2
    """Long polls each worker keeps open at once (each takes up to 10 messages)."""

    @property
    def change_feed_channel(self) -> str | None:
        """The channel the users each commit wrote are announced on, or None with the change feed off."""
        return self.db_schema + CHANGE_FEED_SUFFIX if self.change_feed else None

    @property
    def has_credentials(self) -> bool:
        return bool(self.signing_secrets or self.webhook_tokens or self.webhook_basic or self.webhook_headers)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        given = os.environ if environ is None else environ
        env = {**given, **secrets_from_files(given)}

        def text(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        schema = text("RELAY_DB_SCHEMA") or "auth0"
        # PostgreSQL reserves the pg_ prefix: CREATE SCHEMA would fail with a traceback at migration time.
        if not _SCHEMA_NAME.fullmatch(schema) or schema.startswith("pg_"):
            raise ConfigError(
                f"RELAY_DB_SCHEMA: expected a lower-case PostgreSQL identifier "
                f"(letters, digits, underscore; not starting with pg_), got {schema!r}"
            )
        host = text("RELAY_HOST") or "127.0.0.1"
        if not (_HOST_NAME.fullmatch(host) or _is_ip_address(host)):
            raise ConfigError(
                f"RELAY_HOST: expected an IP address or host name (no scheme, no port), got {host!r}"
            )
        delete_mode = text("RELAY_DELETE_MODE") or "soft"
        if delete_mode not in ("soft", "scrub"):
            raise ConfigError(f"RELAY_DELETE_MODE: expected 'soft' or 'scrub', got {delete_mode!r}")
        history = (text("RELAY_HISTORY") or "off").lower()
        if history not in ("on", "off"):
            raise ConfigError(f"RELAY_HISTORY: expected 'on' or 'off', got {history!r}")
        change_feed = (text("RELAY_CHANGE_FEED") or "on").lower()
        if change_feed not in ("on", "off"):
            raise ConfigError(f"RELAY_CHANGE_FEED: expected 'on' or 'off', got {change_feed!r}")
        if change_feed == "on" and len(schema + CHANGE_FEED_SUFFIX) > _LONGEST_CHANNEL:
            longest_schema = _LONGEST_CHANNEL - len(CHANGE_FEED_SUFFIX)
            raise ConfigError(
                f"RELAY_DB_SCHEMA: at most {longest_schema} characters with the change feed on, so that its "
                f"channel {schema + CHANGE_FEED_SUFFIX!r} fits PostgreSQL's {_LONGEST_CHANNEL}; or set "
                "RELAY_CHANGE_FEED=off"
            )
        log_level = (text("RELAY_LOG_LEVEL") or "INFO").upper()
        if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"RELAY_LOG_LEVEL: expected DEBUG, INFO, WARNING or ERROR, got {log_level!r}")

        queue_url = text("RELAY_SQS_QUEUE_URL")
        if queue_url is not None and not _QUEUE_URL.fullmatch(queue_url):
            raise ConfigError(
                "RELAY_SQS_QUEUE_URL: expected an SQS queue URL such as "
                f"https://sqs.us-east-1.amazonaws.com/123456789012/auth0-events, got {queue_url!r}"
            )

        return cls(
            database_url=_database_url(text("DATABASE_URL")),
            signing_secrets=tuple(
                decode_signing_secret(s, "RELAY_SIGNING_SECRETS")
                for s in _items(text("RELAY_SIGNING_SECRETS"))
            ),
            webhook_tokens=tuple(_items(text("RELAY_WEBHOOK_TOKENS"))),
            webhook_basic=tuple(_basic_pairs(text("RELAY_WEBHOOK_BASIC"))),
            webhook_headers=tuple(_header_pairs(text("RELAY_WEBHOOK_HEADER"))),
            db_schema=schema,
            host=host,
            port=_integer(env, "RELAY_PORT", 8000, 1, 65535),
            max_body_bytes=_integer(env, "RELAY_MAX_BODY_BYTES", 256 * 1024, 1024, 64 * 1024 * 1024),
            delete_mode=delete_mode,  # type: ignore[arg-type]  # checked just above
            history=history == "on",
            change_feed=change_feed == "on",
            pool_size=_integer(env, "RELAY_DB_POOL_SIZE", 10, 1, 1000),
            db_timeout_seconds=_number(env, "RELAY_DB_TIMEOUT_SECONDS", 2.0, 0.1, 30.0),
            batch_max_events=_integer(env, "RELAY_BATCH_MAX_EVENTS", 500, 1, 10_000),
            batch_max_wait_ms=_number(env, "RELAY_BATCH_MAX_WAIT_MS", 1.0, 0.0, 1000.0),
            batch_flushers=_integer(env, "RELAY_BATCH_FLUSHERS", 1, 1, 64),
            queue_max_events=_integer(env, "RELAY_QUEUE_MAX_EVENTS", 2000, 1, 1_000_000),
            data_dir=Path(text("RELAY_DATA_DIR") or ".data"),
            log_level=log_level,
            workers=_integer(env, "RELAY_WORKERS", os.cpu_count() or 1, 1, 64),
            allowed_tenants=_names(
                text("RELAY_ALLOWED_TENANTS"),
                "RELAY_ALLOWED_TENANTS",
                _TENANT_NAME,
                "acme (the tenant name in acme.us.auth0.com)",
            ),
            allowed_streams=_names(
                text("RELAY_ALLOWED_STREAMS"),
                "RELAY_ALLOWED_STREAMS",
                _STREAM_ID,
                "est_38ANnv8pQhqsZrX2VFbftv",
            ),
            eventbridge_sources=_names(
                text("RELAY_EVENTBRIDGE_SOURCES"),
                "RELAY_EVENTBRIDGE_SOURCES",
                _EVENT_SOURCE,
                "aws.partner/auth0.com/acme-0123abcd/auth0.events",
            ),
            sqs_queue_url=queue_url,
            aws_region=_aws_region(env, queue_url),
            sqs_visibility_seconds=_integer(env, "RELAY_SQS_VISIBILITY_SECONDS", 30, 2, 43_200),
            sqs_pollers=_integer(env, "RELAY_SQS_POLLERS", 2, 1, 32),
        )


def _database_url(value: str | None) -> str | None:
    if value is not None:
        try:
            conninfo_to_dict(value)
        except psycopg.Error:
            # libpq's own message quotes the string, password included: never pass it on.
            raise ConfigError(
                "DATABASE_URL: expected a libpq URI such as postgresql://user:password@host:5432/dbname"
            ) from None
    return value


def _aws_region(env: Mapping[str, str], queue_url: str | None) -> str | None:
    """The region the AWS SDKs would use, else the one the queue URL names; required with a queue."""
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        if env.get(name, "").strip():
            return env[name].strip()
    if queue_url is None:
        return None
    host = queue_url.split("/")[2]
    found = _REGION_IN_QUEUE_HOST.fullmatch(host)
    if found is None:
        raise ConfigError(
            "AWS_REGION: not set, and RELAY_SQS_QUEUE_URL does not name a region; set it to the queue's "
            "region, e.g. us-east-1"
        )
    return found[1]


def _is_ip_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def decode_signing_secret(secret: str, variable: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret: the base64 after `whsec_`."""
    if not secret.startswith("whsec_"):
        raise ConfigError(f"{variable}: each secret must start with 'whsec_' (Standard Webhooks format)")
    encoded = secret.removeprefix("whsec_")
    try:
        # The reference libraries tolerate missing padding, so a secret copied from them works here too.
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        raise ConfigError(f"{variable}: the part after 'whsec_' must be base64") from None
    if len(key) < _MIN_SECRET_BYTES:
        raise ConfigError(f"{variable}: each secret must hold at least {_MIN_SECRET_BYTES} random bytes")
    return key


def _items(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def _names(value: str | None, variable: str, pattern: re.Pattern[str], example: str) -> frozenset[str]:
    names = _items(value)
    for name in names:
        if not pattern.fullmatch(name):
            raise ConfigError(f"{variable}: expected comma-separated values like {example}, got {name!r}")
    return frozenset(names)


def _basic_pairs(value: str | None) -> list[str]:
    pairs = _items(value)
    for pair in pairs:
        user, colon, password = pair.partition(":")
        if not (user and colon and password):
            raise ConfigError("RELAY_WEBHOOK_BASIC: expected comma-separated 'user:password' pairs")
    return pairs


def _header_pairs(value: str | None) -> list[tuple[str, str]]:
    pairs = []
    for item in _items(value):
        name, colon, header_value = item.partition(":")
        name, header_value = name.strip(), header_value.strip()
        if not (colon and _HEADER_NAME.fullmatch(name) and header_value):
            raise ConfigError("RELAY_WEBHOOK_HEADER: expected comma-separated 'Header-Name:value' pairs")
        if name.lower() in HEADERS_NOT_FOR_CREDENTIALS:
            raise ConfigError(
                f"RELAY_WEBHOOK_HEADER: {name!r} cannot carry a custom-header credential "
                "(the request needs it for itself, or a dead letter keeps it for diagnosis)"
            )
        pairs.append((name.lower(), header_value))
    return pairs


def _integer(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a whole number from {low} to {high}, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}: expected a whole number from {low} to {high}, got {value}")
    return value


def _number(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a number from {low} to {high}, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}: expected a number from {low} to {high}, got {value}")
    return value
