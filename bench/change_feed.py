"""What the change feed costs a live batch: the commit time of the same pipeline with RELAY_CHANGE_FEED on
and off, measured batch by batch, alternating, on one schema (so both see the same table as it grows).

    .venv/bin/python -m bench.change_feed [--batches 400] [--batch-size 100] [--concurrency 1]

Each batch is `--batch-size` new users (`user.created`, every one announced), decoded before the clock
starts; `--concurrency` batches commit at once, each on its own pooled connection, as replicas or flushers
would (a transaction that notifies holds a server-wide lock while it commits, so this is where the feed can
cost most). Against DATABASE_URL, or the embedded PostgreSQL `make bench` uses.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time
from dataclasses import replace

from bench.run import database, drop_schema
from relay.events import decode_body
from relay.migrations import migrate
from relay.pipeline import Delivery, Pipeline
from relay.settings import Settings
from relay.store import create_pool
from tests.support.events import encode, new_users

SCHEMA = "bench_change_feed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--batches", type=int, default=400, help="batches measured, half of them with the feed"
    )
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=1, help="batches committed at once")
    args = parser.parse_args()
    conninfo, where, _psql = database()
    shape = f"{args.batches} batches of {args.batch_size} new users, {args.concurrency} at once"
    print(f"PostgreSQL: {where}; {shape}")
    seconds = asyncio.run(measure(conninfo, args.batches, args.batch_size, args.concurrency))
    on, off = statistics.median(seconds[True]), statistics.median(seconds[False])
    print(f"median commit, feed off: {off * 1000:.2f} ms")
    print(f"median commit, feed on:  {on * 1000:.2f} ms")
    print(f"feed on / feed off: {on / off:.3f}")


async def measure(conninfo: str, batches: int, batch_size: int, concurrency: int) -> dict[bool, list[float]]:
    drop_schema(conninfo, SCHEMA)
    await migrate(conninfo, SCHEMA)
    settings = Settings(database_url=conninfo, db_schema=SCHEMA, pool_size=concurrency)
    pool = create_pool(conninfo, settings)
    await pool.open(wait=True)
    pipelines = {feed: Pipeline(pool, replace(settings, change_feed=feed)) for feed in (True, False)}
    numbers = itertools.count()
    seconds: dict[bool, list[float]] = {True: [], False: []}

    def batch() -> list[Delivery]:
        tag = f"b{next(numbers)}"
        return [Delivery("webhook", decode_body(encode(event))) for event in new_users(tag, batch_size)]

    async def timed(pipeline: Pipeline, deliveries: list[Delivery]) -> float:
        started = time.perf_counter()
        await pipeline.commit(deliveries)
        return time.perf_counter() - started

    try:
        for _warm_up in range(4):
            await timed(pipelines[True], batch())
        for round_number in range(batches // concurrency):
            # On, off, off, on, …: neither setting always follows the other.
            feed = (round_number % 2 == 0) == (round_number % 4 < 2)
            prepared = [batch() for _ in range(concurrency)]
            took = await asyncio.gather(*(timed(pipelines[feed], deliveries) for deliveries in prepared))
            seconds[feed].extend(took)
    finally:
        await pool.close()
        drop_schema(conninfo, SCHEMA)
    return seconds


if __name__ == "__main__":
    main()
