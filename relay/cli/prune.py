"""`relay prune`: what was deleted, and that tombstones were kept."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from relay import operations
from relay.cli.database import database
from relay.operations import iso_utc
from relay.settings import Settings
from relay.store import open_pool


def prune(settings: Settings, older_than: timedelta, batch_size: int) -> int:
    conninfo, _ = database(settings)
    return asyncio.run(_prune(conninfo, settings, older_than, batch_size))


async def _prune(conninfo: str, settings: Settings, older_than: timedelta, batch_size: int) -> int:
    async with open_pool(conninfo, settings) as pool:
        pruned = await operations.prune(pool, older_than, batch_size)
    cutoff = iso_utc(pruned.cutoff)
    print(f"processed_events: deleted {pruned.processed_events} rows received before {cutoff}")
    print(f"dead_letters: deleted {pruned.dead_letters} resolved before {cutoff}")
    print(f"user_events: deleted {pruned.user_events} history rows of events before {cutoff}")
    print("users: kept (tombstones are never pruned)")
    return 0
