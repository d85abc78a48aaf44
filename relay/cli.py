"""The `relay` console script: `serve`, `migrate`, `send-sample` for a first look, and the Auth0 tasks
`deploy-action` and `verify`."""

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
from datetime import UTC, datetime
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


def _serve(settings: Settings, *, migrate_first: bool) -> int:
    from relay.app import create_app, serve
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
    serve(create_app(settings, conninfo), settings)
    return 0


def _with_dev_credentials(settings: Settings) -> Settings:
    from relay.embedded import dev_credentials

    credentials = dev_credentials(settings.data_dir)
    return dataclasses.replace(
        settings,
        signing_secrets=(decode_signing_secret(credentials.signing_secret, "dev-credentials.json"),),
        webhook_tokens=(credentials.webhook_token,),
    )


def _print_banner(settings: Settings, conninfo: str, psql: str | None) -> None:
    base = f"http://{settings.host}:{settings.port}"
    lines = [
        f"relay listening on {base}",
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
