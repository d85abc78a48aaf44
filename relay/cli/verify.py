"""`relay verify`: each step on stdout with the time the change took to arrive; a failure in one line on
stderr; and the throw-away user deleted from Auth0 whatever happened."""

from __future__ import annotations

import sys
from collections.abc import Mapping

from relay.auth0.management import Management, ManagementError, credentials_from_env
from relay.auth0.verify import Verification, VerificationFailed
from relay.cli.database import database
from relay.cli.progress import rate_limit_notice, say
from relay.settings import Settings
from relay.store import NotMigrated, StoreError

_DATABASE_HINT = "point DATABASE_URL and RELAY_DB_SCHEMA at the relay's database"


def verify(environ: Mapping[str, str], settings: Settings, *, connection: str, timeout: float) -> int:
    """Returns the exit status."""
    credentials = credentials_from_env(environ)
    conninfo, _ = database(settings)
    api = Management(credentials, on_rate_limit=rate_limit_notice(sys.stdout))
    verification = Verification(api, conninfo, settings, connection=connection, timeout=timeout, progress=say)
    try:
        verification.run()
    except (VerificationFailed, ManagementError) as error:
        _fail(_one_line(error))
        return 1
    except NotMigrated:
        _fail(f"no users table in schema {settings.db_schema!r}; {_DATABASE_HINT}")
        return 1
    except StoreError as error:
        _fail(f"PostgreSQL: {_one_line(error)}; {_DATABASE_HINT}")
        return 1
    finally:
        if verification.user.left_in_auth0:
            _clean_up(verification)
    return 0


def _clean_up(verification: Verification) -> None:
    user = verification.user
    try:
        verification.clean_up()
    except ManagementError as error:
        _fail(f"clean-up failed, delete {user.user_id or ''} ({user.email}) by hand: {error}")
        return
    say(f"clean-up: deleted {user.user_id or ''} from Auth0")


def _fail(line: str) -> None:
    print(f"relay verify: {line}", file=sys.stderr, flush=True)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
