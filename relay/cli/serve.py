"""`relay serve` and `relay migrate`: the migrations applied, the routes and, with the embedded database, the
development credentials and the commands to try them with."""

from __future__ import annotations

import asyncio
import dataclasses
import os

from relay.cli.database import database
from relay.settings import ConfigError, Settings, decode_signing_secret


def migrate(settings: Settings) -> int:
    from relay import migrations

    conninfo, _ = database(settings)
    applied = asyncio.run(migrations.migrate(conninfo, settings.db_schema))
    for migration in applied:
        print(f"applied {migration.version:04d}_{migration.name}")
    print(f"schema {settings.db_schema!r} is up to date")
    return 0


def serve(settings: Settings, *, migrate_first: bool) -> int:
    from relay import app, migrations

    conninfo, psql = database(settings)
    if not settings.has_credentials:
        if settings.database_url and not settings.sqs_queue_url:
            raise ConfigError(
                "no credentials configured: set RELAY_SIGNING_SECRETS (for the Action) and/or "
                "RELAY_WEBHOOK_TOKENS, RELAY_WEBHOOK_BASIC or RELAY_WEBHOOK_HEADER (for the webhook), "
                "or RELAY_SQS_QUEUE_URL (to take events from an SQS queue only)"
            )
        if not settings.database_url:
            settings = _with_dev_credentials(settings)
    if migrate_first:
        for migration in asyncio.run(migrations.migrate(conninfo, settings.db_schema)):
            print(f"applied migration {migration.version:04d}_{migration.name}")
    _print_banner(settings, conninfo, psql)
    app.serve(settings, conninfo)
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
        f"  POST {base}/events/eventbridge  (EventBridge API destination: the webhook's credentials)",
        f"  GET  {base}/healthz  {base}/readyz",
    ]
    if settings.sqs_queue_url:
        lines.append(f"consuming SQS queue {settings.sqs_queue_url} (EventBridge events)")
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
