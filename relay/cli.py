"""The `relay` console script: `serve` and `migrate`; `send-sample` for a first look; the Auth0 tasks
`deploy-action`, `verify`, `backfill`, `catch-up`, `deliveries` and `redeliver`; and the operator's
`dead-letters` and `prune`. Each command's work lives in its own module; this one only parses and wires."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import secrets
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg

from relay.observability import configure_logging
from relay.settings import ConfigError, Settings, decode_signing_secret


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relay", description="Keeps a PostgreSQL copy of Auth0 users.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", help="serve the relay (embedded PostgreSQL when DATABASE_URL is unset)"
    )
    serve.add_argument("--migrate", action="store_true", help="apply pending migrations before serving")
    commands.add_parser("migrate", help="apply pending schema migrations (safe to run from several replicas)")
    sample = commands.add_parser("send-sample", help="post a signed sample user.created event to a relay")
    sample.add_argument("--url", default="http://127.0.0.1:8000", help="the relay's base URL")
    sample.add_argument("--email", default="jane@example.com", help="the sample user's email")
    deploy = commands.add_parser(
        "deploy-action", help="create or update the Auth0 Action, deploy it, and bind an event stream to it"
    )
    deploy.add_argument("--name", default="user-sync-relay", help="the Action's name")
    deploy.add_argument("--stream-name", default="user-sync-relay", help="the event stream's name")
    deploy.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    verify = commands.add_parser(
        "verify",
        help="create, rename and delete a throw-away Auth0 user and wait for each change in PostgreSQL",
    )
    verify.add_argument("--connection", required=True, help="the database connection to create the user in")
    verify.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each change")
    letters = commands.add_parser(
        "dead-letters", help="list, show, replay or resolve the authentic events the relay could not apply"
    )
    letter_commands = letters.add_subparsers(dest="dead_letters_command", required=True)
    listing = letter_commands.add_parser("list", help="unresolved dead letters, oldest first")
    listing.add_argument("--all", action="store_true", help="resolved ones too")
    listing.add_argument("--limit", type=_positive, default=50, help="most rows to show (default 50)")
    show = letter_commands.add_parser("show", help="one dead letter: headers, error and body")
    show.add_argument("id", type=int)
    replay = letter_commands.add_parser(
        "replay",
        help="run stored bodies through the current decoder and handlers; resolves those that go in "
        "(exit status 1 if any still fails)",
    )
    replay.add_argument("ids", type=int, nargs="*", metavar="ID", help="default: every unresolved one")
    resolve = letter_commands.add_parser("resolve", help="mark a dead letter resolved without replaying it")
    resolve.add_argument("id", type=int)
    prune = commands.add_parser(
        "prune", help="delete old ledger rows and resolved dead letters (tombstones in users are kept)"
    )
    prune.add_argument(
        "--older-than", required=True, type=_age, metavar="AGE", help="e.g. 30d or 12h (days or hours)"
    )
    prune.add_argument("--batch-size", type=_positive, default=5000, help="rows per delete (default 5000)")

    backfill = commands.add_parser(
        "backfill",
        help="copy every existing Auth0 user into PostgreSQL through a users export job (safe to re-run)",
    )
    backfill_source = backfill.add_mutually_exclusive_group()
    backfill_source.add_argument(
        "--file", type=Path, metavar="PATH", help="load an export already downloaded (gzip or plain NDJSON)"
    )
    backfill_source.add_argument(
        "--job-id", metavar="JOB", help="pick up an export job started earlier (Auth0 keeps it 24 h)"
    )
    backfill.add_argument(
        "--timeout", type=_seconds, default=1800.0, help="seconds to wait for the export job (default 1800)"
    )
    backfill.add_argument(
        "--poll-interval", type=_seconds, default=5.0, help="seconds between job status checks (default 5)"
    )
    catch_up = commands.add_parser(
        "catch-up", help="apply user events missed while the relay was down, from the Auth0 Events API"
    )
    catch_up.add_argument(
        "--since",
        type=_moment,
        metavar="TIME",
        help="ISO 8601 time to read from (default: the stored cursor)",
    )
    catch_up.add_argument(
        "--until-idle",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stop once no event has come for --idle-seconds (default on; --no-until-idle follows forever)",
    )
    catch_up.add_argument(
        "--idle-seconds", type=_seconds, default=10.0, help="quiet seconds that end the catch-up (default 10)"
    )
    deliveries = commands.add_parser("deliveries", help="list the event stream's failed deliveries")
    redeliver = commands.add_parser(
        "redeliver", help="ask Auth0 to deliver failed events again: one (--event-id) or by time and type"
    )
    for command in (deliveries, redeliver):
        command.add_argument("--stream-id", help="the event stream's id (default: AUTH0_EVENT_STREAM_ID)")
        command.add_argument(
            "--stream-name", default="user-sync-relay", help="else the event stream with this name"
        )
        command.add_argument("--since", type=_moment, metavar="TIME", help="ISO 8601: events from this time")
        command.add_argument(
            "--until", type=_moment, metavar="TIME", help="ISO 8601: events before this time"
        )
        command.add_argument(
            "--types", type=_event_types, default=(), metavar="TYPES", help="comma-separated event types"
        )
    redeliver.add_argument("--event-id", metavar="ID", help="redeliver this one event")

    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        configure_logging(settings.log_level)
        if args.command == "serve":
            return _serve(settings, migrate_first=args.migrate)
        if args.command == "migrate":
            return _migrate(settings)
        if args.command == "deploy-action":
            return _deploy_action(args.name, args.stream_name, dry_run=args.dry_run)
        if args.command == "verify":
            return _verify(settings, args.connection, args.timeout)
        if args.command == "dead-letters":
            return _dead_letters(settings, args)
        if args.command == "prune":
            return _prune(settings, args.older_than, args.batch_size)
        if args.command == "backfill":
            return _backfill(settings, args)
        if args.command == "catch-up":
            return _catch_up(settings, args)
        if args.command == "deliveries":
            return _deliveries(args)
        if args.command == "redeliver":
            if args.event_id and (args.since or args.until or args.types):
                parser.error("redeliver: --event-id cannot be combined with --since, --until or --types")
            return _redeliver(args)
        return _send_sample(settings, args.url, args.email)
    except ConfigError as error:
        # One line per problem: deploy-action names every missing variable at once.
        for line in str(error).splitlines():
            print(f"relay: configuration error: {line}", file=sys.stderr)
        return 2
    except psycopg.OperationalError as error:
        # libpq names the host and port, never the password; its first line is the cause.
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"relay: cannot use the PostgreSQL at DATABASE_URL: {reason}", file=sys.stderr)
        return 1


def _database(settings: Settings) -> tuple[str, str | None]:
    """The conninfo to use, and the bundled psql when the embedded server was started."""
    if settings.database_url:
        return settings.database_url, None
    from relay.embedded import start_embedded

    server = start_embedded(settings.data_dir)
    return server.conninfo, str(server.psql)


def _migrate(settings: Settings) -> int:
    from relay.migrations import migrate

    conninfo, _ = _database(settings)
    applied = asyncio.run(migrate(conninfo, settings.db_schema))
    for migration in applied:
        print(f"applied {migration.version:04d}_{migration.name}")
    print(f"schema {settings.db_schema!r} is up to date")
    return 0


def _deploy_action(name: str, stream_name: str, *, dry_run: bool) -> int:
    from relay.auth0.deploy import deploy_action

    return deploy_action(os.environ, name=name, stream_name=stream_name, dry_run=dry_run)


def _verify(settings: Settings, connection: str, timeout: float) -> int:
    from relay.auth0.management import credentials_from_env
    from relay.auth0.verify import verify_synchronization

    credentials = credentials_from_env(os.environ)
    conninfo, _ = _database(settings)
    return verify_synchronization(credentials, conninfo, settings, connection=connection, timeout=timeout)


def _dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    from relay import operations

    conninfo, _ = _database(settings)
    command = args.dead_letters_command
    if command == "list":
        return asyncio.run(
            operations.list_command(
                conninfo, settings, include_resolved=args.all, limit=args.limit, out=sys.stdout
            )
        )
    if command == "show":
        return asyncio.run(operations.show_command(conninfo, settings, args.id, sys.stdout))
    if command == "replay":
        return asyncio.run(operations.replay_command(conninfo, settings, args.ids, sys.stdout))
    return asyncio.run(operations.resolve_command(conninfo, settings, args.id, sys.stdout))


def _prune(settings: Settings, older_than: timedelta, batch_size: int) -> int:
    from relay import operations

    conninfo, _ = _database(settings)
    return asyncio.run(operations.prune_command(conninfo, settings, older_than, batch_size, sys.stdout))


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _age(text: str) -> timedelta:
    from relay.operations import parse_age

    try:
        return parse_age(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _backfill(settings: Settings, args: argparse.Namespace) -> int:
    from relay.auth0.export import run_backfill

    return run_backfill(
        os.environ,
        settings,
        lambda: _database(settings)[0],
        file=args.file,
        job_id=args.job_id,
        timeout=args.timeout,
        poll_interval=args.poll_interval,
    )


def _catch_up(settings: Settings, args: argparse.Namespace) -> int:
    from relay.auth0.catch_up import run_catch_up

    return run_catch_up(
        os.environ,
        settings,
        lambda: _database(settings)[0],
        since=args.since,
        until_idle=args.until_idle,
        idle_seconds=args.idle_seconds,
    )


def _deliveries(args: argparse.Namespace) -> int:
    from relay.auth0.deliveries import run_deliveries

    return run_deliveries(
        os.environ,
        stream_id=args.stream_id,
        stream_name=args.stream_name,
        since=args.since,
        until=args.until,
        types=args.types,
    )


def _redeliver(args: argparse.Namespace) -> int:
    from relay.auth0.deliveries import run_redeliver

    return run_redeliver(
        os.environ,
        stream_id=args.stream_id,
        stream_name=args.stream_name,
        event_id=args.event_id,
        since=args.since,
        until=args.until,
        types=args.types,
    )


def _moment(text: str) -> datetime:
    """An ISO 8601 time such as 2026-05-01T10:00:00Z or 2026-05-01; without a zone it is UTC."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an ISO 8601 time such as 2026-05-01T10:00:00Z, got {text!r}"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _event_types(text: str) -> tuple[str, ...]:
    types = tuple(part.strip() for part in text.split(",") if part.strip())
    if not types:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated event types such as user.created, got {text!r}"
        )
    return types


def _serve(settings: Settings, *, migrate_first: bool) -> int:
    from relay.app import serve
    from relay.migrations import migrate

    if not settings.has_credentials:
        if settings.database_url:
            raise ConfigError(
                "no credentials configured: set RELAY_SIGNING_SECRETS (for the Action) and/or "
                "RELAY_WEBHOOK_TOKENS, RELAY_WEBHOOK_BASIC or RELAY_WEBHOOK_HEADER (for the webhook)"
            )
        settings = _with_dev_credentials(settings)
    conninfo, psql = _database(settings)
    if migrate_first:
        for migration in asyncio.run(migrate(conninfo, settings.db_schema)):
            print(f"applied migration {migration.version:04d}_{migration.name}")
    _print_banner(settings, conninfo, psql)
    serve(settings, conninfo)
    return 0


def _with_dev_credentials(settings: Settings) -> Settings:
    """The development credentials, in the settings and in the environment (worker processes read it)."""
    from relay.embedded import dev_credentials

    credentials = dev_credentials(settings.data_dir)
    os.environ["RELAY_SIGNING_SECRETS"] = credentials.signing_secret
    os.environ["RELAY_WEBHOOK_TOKENS"] = credentials.webhook_token
    return dataclasses.replace(
        settings,
        signing_secrets=(decode_signing_secret(credentials.signing_secret, "dev-credentials.json"),),
        webhook_tokens=(credentials.webhook_token,),
    )


def _print_banner(settings: Settings, conninfo: str, psql: str | None) -> None:
    base = f"http://{settings.host}:{settings.port}"
    lines = [
        f"relay listening on {base} ({settings.workers} worker{'s' if settings.workers > 1 else ''})",
        f"  POST {base}/events/action    (Standard Webhooks signature from the Auth0 Action)",
        f"  POST {base}/events/webhook   (Auth0 webhook destination: bearer, basic or custom header)",
        f"  GET  {base}/healthz  {base}/readyz",
    ]
    if psql is not None:
        from relay.embedded import dev_credentials

        credentials = dev_credentials(settings.data_dir)
        lines += [
            "",
            "development credentials (embedded database only; kept in "
            f"{settings.data_dir / 'dev-credentials.json'}):",
            f"  signing secret: {credentials.signing_secret}",
            f"  bearer token:   {credentials.webhook_token}",
            "",
            "post a signed sample event, then look at the copy:",
            f"  .venv/bin/relay send-sample --url {base}",
            f"  {psql} '{conninfo}' -c 'SELECT user_id, email, updated_at FROM {settings.db_schema}.users'",
        ]
    print("\n".join(lines), flush=True)


def sample_event(email: str) -> dict[str, Any]:
    """A `user.created` event shaped as Auth0 sends it, with a fresh id and time."""
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    local_id = secrets.token_hex(12)
    return {
        "specversion": "1.0",
        "type": "user.created",
        "source": "urn:auth0:example.us.auth0.com",
        "id": "evt_" + secrets.token_urlsafe(16).replace("-", "a").replace("_", "b")[:22],
        "time": now,
        "data": {
            "object": {
                "user_id": f"auth0|{local_id}",
                "email": email,
                "email_verified": False,
                "name": email,
                "nickname": email.split("@")[0],
                "identities": [
                    {
                        "connection": "Username-Password-Authentication",
                        "provider": "auth0",
                        "isSocial": False,
                        "user_id": local_id,
                    }
                ],
                "app_metadata": {},
                "user_metadata": {},
                "created_at": now,
                "updated_at": now,
            }
        },
        "a0tenant": "example",
        "a0stream": "est_" + "0" * 22,
    }


def _send_sample(settings: Settings, url: str, email: str) -> int:
    from relay.embedded import dev_credentials
    from relay.signing import sign

    if settings.signing_secrets:
        key = settings.signing_secrets[0]
    else:
        key = decode_signing_secret(dev_credentials(settings.data_dir).signing_secret, "dev-credentials.json")
    event = sample_event(email)
    body = json.dumps(event, separators=(",", ":")).encode()
    timestamp = int(time.time())
    request = urllib.request.Request(  # noqa: S310  (the URL is the operator's own relay)
        url.rstrip("/") + "/events/action",
        data=body,
        method="POST",
        headers={
            "content-type": "application/json",
            "webhook-id": event["id"],
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(key, event["id"], timestamp, body),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            print(f"{response.status} {response.read().decode()}")
    except urllib.error.HTTPError as error:
        print(f"{error.code} {error.read().decode()}", file=sys.stderr)
        return 1
    except urllib.error.URLError as error:
        print(f"could not reach {url}: {error.reason}", file=sys.stderr)
        return 1
    print(f"posted {event['type']} {event['id']} for {event['data']['object']['user_id']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
