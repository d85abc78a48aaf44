"""The benchmark's ceiling: the real server, authentication and decoding, acknowledging without PostgreSQL.

Started only by `bench/run.py`; nothing in the relay's own configuration can reach this mode.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from relay.app import create_app, serve
from relay.batching import Result
from relay.events import Event
from relay.handlers import Outcome
from relay.settings import ConfigError, Settings


async def acknowledge_without_database(events: Sequence[Event]) -> list[Result]:
    return [Outcome.APPLIED] * len(events)


def main() -> int:
    try:
        settings = Settings.from_env()
    except ConfigError as error:
        print(f"ceiling server: {error}", file=sys.stderr)
        return 2
    serve(create_app(settings, os.environ["DATABASE_URL"], applier=acknowledge_without_database), settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
