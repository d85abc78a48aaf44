"""The `relay` console script: `serve` and `migrate`; `send-sample` for a first look; the Auth0 tasks
`deploy-action`, `deploy-eventbridge`, `verify`, `backfill`, `catch-up`, `deliveries` and `redeliver`; and
the operator's `dead-letters`, `prune` and `export`. This module parses and dispatches; each group of
commands has a module here that runs the library's work and says how it went. This package is the only part
of the relay that writes to the terminal.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from relay import __version__
from relay.observability import configure_logging
from relay.restore import Format
from relay.settings import ConfigError, Settings, use_secret_files
from relay.store import StoreError

# `relay dead-letters replay --help`, laid out by hand (argparse would run the table together).
REPLAY_DESCRIPTION = """\
Replays each dead letter as its route calls for: an event body (routes action, webhook, catch-up)
through the current decoder, allow-lists and handlers, like a new delivery; an export row (route
backfill) through the backfill's rules, so it never overwrites anything newer and never revives a
deleted user."""
REPLAY_STATUSES = """\
each dead letter is reported as one of:
  resolved          it went in (applied, stale, duplicate, ...) and is marked resolved
  failing           it still cannot go in; the letter keeps the new error and stays unresolved
  not replayable    it holds nothing to replay (an Events API message with no event, say); left as
                    it is: read it with `relay dead-letters show ID`, then `relay dead-letters resolve ID`
  already resolved  (an ID given) nothing to do
  not found         (an ID given) there is no such dead letter

exit status: 0 when nothing that could be replayed failed (not replayable ones do not count);
1 when a letter still fails or an ID given was not found. Without IDs, every unresolved letter is
taken, oldest first, and one that fails or is not replayable never stops the others."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relay", description="Keeps a PostgreSQL copy of Auth0 users.")
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
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
    eventbridge = commands.add_parser(
        "deploy-eventbridge",
        help="create or update an Auth0 event stream to Amazon EventBridge; prints its partner event source",
    )
    eventbridge.add_argument(
        "--aws-account-id", required=True, type=_aws_account_id, help="the 12-digit AWS account id"
    )
    eventbridge.add_argument(
        "--aws-region", required=True, type=_aws_region, help="the AWS region, e.g. us-east-1"
    )
    eventbridge.add_argument("--stream-name", default="user-sync-relay", help="the event stream's name")
    eventbridge.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
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
        help="replay dead letters with the current relay; resolves those that go in "
        "(exit status 1 if one that could be replayed still fails)",
        description=REPLAY_DESCRIPTION,
        epilog=REPLAY_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    replay.add_argument("ids", type=int, nargs="*", metavar="ID", help="default: every unresolved one")
    resolve = letter_commands.add_parser("resolve", help="mark a dead letter resolved without replaying it")
    resolve.add_argument("id", type=int)
    prune = commands.add_parser(
        "prune",
        help="delete old ledger rows, resolved dead letters and history (tombstones in users are kept)",
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
    backfill.add_argument(
        "--reconcile-deletes",
        action="store_true",
        help="then tombstone the users a complete export does not list and nothing changed since it began",
    )
    backfill.add_argument(
        "--exported-at",
        type=_moment,
        metavar="TIME",
        help="with --file and --reconcile-deletes: ISO 8601 time the export job was created",
    )
    backfill.add_argument(
        "--dry-run",
        action="store_true",
        help="with --reconcile-deletes: list who would be tombstoned; load and write nothing",
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
    export = commands.add_parser(
        "export",
        help="write the live users as Auth0's bulk user import JSON, or as a users export's NDJSON",
    )
    export.add_argument(
        "--format",
        required=True,
        choices=[shape.value for shape in Format],
        help="auth0-import: the JSON array POST /api/v2/jobs/users-imports takes (no password hashes; "
        "needs --connection); export: one profile a line, as a users export job writes them, which "
        "relay backfill --file loads",
    )
    export.add_argument("--connection", help="only the users with an identity in this connection (by name)")
    export.add_argument("--out", type=Path, metavar="FILE", help="write to FILE (default: stdout)")

    args = parser.parse_args(argv)
    try:
        use_secret_files(os.environ)
        settings = Settings.from_env()
        configure_logging(settings.log_level)
        if args.command == "redeliver" and args.event_id and (args.since or args.until or args.types):
            parser.error("redeliver: --event-id cannot be combined with --since, --until or --types")
        if args.command == "backfill":
            _check_reconcile_options(parser, args)
        if args.command == "export" and args.format == Format.AUTH0_IMPORT and args.connection is None:
            parser.error(
                "export: --format auth0-import needs --connection NAME, the connection to import into"
            )
        return _run(args, settings)
    except ConfigError as error:
        # One line per problem: deploy-action names every missing variable at once.
        for line in str(error).splitlines():
            print(f"relay: configuration error: {line}", file=sys.stderr)
        return 2
    except StoreError as error:
        # The driver's words: libpq names the host and port, never the password; its first line is the cause.
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"relay: cannot use the PostgreSQL at DATABASE_URL: {reason}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, settings: Settings) -> int:
    """Runs the command; each module is imported only when its command runs, so `serve` loads no Auth0 SDK."""
    command = args.command
    if command == "serve":
        from relay.cli.serve import serve

        return serve(settings, migrate_first=args.migrate)
    if command == "migrate":
        from relay.cli.serve import migrate

        return migrate(settings)
    if command == "send-sample":
        from relay.cli.sample import send_sample

        return send_sample(settings, args.url, args.email)
    if command == "deploy-action":
        from relay.cli.deploy import deploy_action

        return deploy_action(os.environ, name=args.name, stream_name=args.stream_name, dry_run=args.dry_run)
    if command == "deploy-eventbridge":
        from relay.cli.deploy import deploy_eventbridge

        return deploy_eventbridge(
            os.environ,
            aws_account_id=args.aws_account_id,
            aws_region=args.aws_region,
            stream_name=args.stream_name,
            dry_run=args.dry_run,
        )
    if command == "verify":
        from relay.cli.verify import verify

        return verify(os.environ, settings, connection=args.connection, timeout=args.timeout)
    if command == "dead-letters":
        from relay.cli.dead_letters import dead_letters

        return dead_letters(settings, args)
    if command == "prune":
        from relay.cli.prune import prune

        return prune(settings, args.older_than, args.batch_size)
    if command == "backfill":
        from relay.auth0.export import Reconciling
        from relay.cli.backfill import backfill

        reconciling = None
        if args.reconcile_deletes:
            reconciling = Reconciling(args.exported_at, args.dry_run)
        return backfill(
            os.environ,
            settings,
            file=args.file,
            job_id=args.job_id,
            timeout=args.timeout,
            poll_interval=args.poll_interval,
            reconciling=reconciling,
        )
    if command == "export":
        from relay.cli.export import export

        return export(settings, Format(args.format), args.connection, args.out)
    if command == "catch-up":
        from relay.cli.catch_up import catch_up

        return catch_up(
            os.environ, settings, since=args.since, until_idle=args.until_idle, idle_seconds=args.idle_seconds
        )
    from relay.cli.deliveries import deliveries, redeliver

    chosen = {
        "stream_id": args.stream_id,
        "stream_name": args.stream_name,
        "since": args.since,
        "until": args.until,
        "types": args.types,
    }
    if command == "deliveries":
        return deliveries(os.environ, **chosen)
    return redeliver(os.environ, event_id=args.event_id, **chosen)


def _aws_account_id(text: str) -> str:
    if not (len(text) == 12 and text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"expected a 12-digit AWS account id, got {text!r}")
    return text


def _aws_region(text: str) -> str:
    from relay.auth0.eventbridge import aws_regions

    if text not in aws_regions():
        raise argparse.ArgumentTypeError(
            f"expected an AWS region Auth0 can send events to, such as us-east-1, got {text!r}"
        )
    return text


def _check_reconcile_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.reconcile_deletes:
        if args.exported_at or args.dry_run:
            parser.error("backfill: --exported-at and --dry-run go with --reconcile-deletes")
    elif args.file is not None and args.exported_at is None:
        parser.error(
            "backfill: --reconcile-deletes with --file needs --exported-at TIME, when the export job was "
            "created: a user changed after it must not look deleted"
        )
    elif args.file is None and args.exported_at is not None:
        parser.error("backfill: --exported-at goes with --file; an export job's own creation time is used")


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
