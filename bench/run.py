"""`make bench`: the relay as `make run` serves it, measured side by side with its peers, in one run.

Machines of this kind differ 2-3x in speed from one day to the next, so only ratios measured in the same run
mean anything. Each round runs every server in turn against the same PostgreSQL, each on a fresh schema,
loaded by wrk with the same distinct ~800-byte `user.created` events on 64 connections; the figure is the
median ratio over the rounds. The servers:

  relay                        `relay serve --migrate` with every setting at its default (INFO logs,
                               RELAY_WORKERS = the CPU count), on /events/webhook with a bearer token
  relay, one tx per event      the same with RELAY_BATCH_MAX_EVENTS=1 and RELAY_BATCH_FLUSHERS=10: every
                               event its own transaction, ten at a time per worker (as the guide's pool)
  relay, history on            the same as relay with RELAY_HISTORY=on: every event's object also kept in
                               user_events, in the batch's one statement
  relay, change feed off       the same as relay with RELAY_CHANGE_FEED=off: no NOTIFY of the users each
                               commit wrote (the default announces them)
  guide-style handler          bench/guide: Express + node-postgres, one guarded upsert per event, no ledger
  bare Litestar (N processes)  bench/bare_litestar.py: bearer check and msgspec decode, no database, under
                               uvicorn with as many worker processes as the relay
  bare Litestar (1 process)    the same app in one process

Each round also measures the SQS path: a queue on a moto server (in this process) holding the same kind of
events wrapped as EventBridge delivers them, drained by `relay serve` with `RELAY_SQS_QUEUE_URL` and every
other setting at its default (events per second from serving to the last event in the ledger). moto lets a
few dozen events a second through here, fewer the more it holds, far below what the relay takes; so the
figure to read is the ratio to a bare consumer draining the same events from the same moto: a loop of
ReceiveMessage (10 at a time) and DeleteMessageBatch, with no database.

Every run also counts the CPU time it took, per event: the server's processes, the PostgreSQL server's (when
it runs on this machine), and wrk's. On two cores shared by all three, the bare app spends its CPU on HTTP
alone while the relay shares the machine with PostgreSQL's work for every event; the report shows what that
costs, and the relay / bare ratio that the CPU alone allows.

After every relay run, each event wrk saw acknowledged is looked up in `processed_events`: the count missing
is printed, and must be 0. A longer relay run samples the memory of all its processes. Then the backfill of
a generated export (`relay backfill --file`, end to end) is timed against the COPY limit of the same server:
`gunzip | psql COPY` of the same lines into a jsonb staging table plus one INSERT … SELECT into a plain table;
and against the same INSERT into the relay's own `users` table, whose trigger and indexes are work any load
into it must do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
from psycopg import sql

from relay.migrations import migrate
from tests.support.aws import Aws, Queue, eventbridge_event, make_queue, moto_server
from tests.support.events import new_users

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
TOKEN = "bench-token-0123456789abcdef"  # noqa: S105  (a load test on loopback)
WORKERS = os.cpu_count() or 1

RELAY = "relay"
ONE_TX = "relay, one tx per event"
HISTORY = "relay, history on"
FEED_OFF = "relay, change feed off"
GUIDE = "guide-style handler"
BARE_N = f"bare Litestar ({WORKERS} processes)"
BARE_1 = "bare Litestar (1 process)"
SERVERS = (RELAY, GUIDE, BARE_N, BARE_1, ONE_TX, HISTORY, FEED_OFF)
RELAYS = (RELAY, ONE_TX, HISTORY, FEED_OFF)
SQS = "relay SQS consumer (moto)"


@dataclass
class Run:
    server: str
    round: int
    events_per_second: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    refused: int
    socket_errors: int
    acknowledged: int
    lost: int | None = None
    rss_mib: list[float] = field(default_factory=list)
    cpu: CpuPerEvent | None = None


@dataclass(frozen=True)
class CpuPerEvent:
    """CPU microseconds per acknowledged event, by whom."""

    server: float
    database: float | None  # None when PostgreSQL runs elsewhere
    load: float

    @property
    def total(self) -> float:
        return self.server + (self.database or 0.0) + self.load


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (the median is the figure)")
    parser.add_argument("--seconds", type=int, default=15, help="length of each run")
    parser.add_argument("--soak-seconds", type=int, default=60, help="length of the memory run (0 skips it)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--backfill-users", type=int, default=300_000, help="export size (0 skips backfill)")
    parser.add_argument(
        "--sqs-events",
        type=int,
        default=300,
        help="events queued per SQS run (0 skips it); moto, not the relay, bounds this path's pace here",
    )
    args = parser.parse_args()

    for tool in ("wrk", "node"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed (make bench installs wrk with apt-get)", file=sys.stderr)
            return 2
    conninfo, where, psql = database()
    postmaster = local_postmaster(conninfo)
    print(f"machine: {os.cpu_count()} cores, {memory_gib():.0f} GiB; PostgreSQL: {where}")
    print(
        f"load: wrk, {args.threads} threads, {args.connections} connections, {args.seconds} s per run, "
        f"{args.rounds} rounds\n",
        flush=True,
    )
    drop_bench_schemas(conninfo)

    runs: list[Run] = []
    sqs_rates: dict[int, SqsRates] = {}
    with contextlib.ExitStack() as stack:
        aws = stack.enter_context(moto_server()) if args.sqs_events else None
        for round_number in range(1, args.rounds + 1):
            # The order turns each round, so no server always runs first, or right after the slowest.
            order = SERVERS[round_number - 1 :] + SERVERS[: round_number - 1]
            for server in order:
                print(f"round {round_number}: {server} ...", flush=True)
                runs.append(run_server(server, round_number, args.seconds, conninfo, postmaster, args))
            if aws is not None:
                print(f"round {round_number}: {SQS} ({args.sqs_events:,} queued events) ...", flush=True)
                sqs_rates[round_number] = sqs_run(aws, round_number, args.sqs_events, conninfo)
    soak = None
    if args.soak_seconds:
        print(f"memory run: {RELAY}, {args.soak_seconds} s ...", flush=True)
        soak = run_server(RELAY, 0, args.soak_seconds, conninfo, postmaster, args, sample_memory=True)
    backfills: list[Backfill] = []
    if args.backfill_users:
        export = export_file(args.backfill_users)
        for round_number in range(1, args.rounds + 1):
            print(
                f"round {round_number}: backfill of {args.backfill_users:,} users and the COPY limit ...",
                flush=True,
            )
            plain, into_users = copy_limit(conninfo, psql, export, args.backfill_users)
            backfills.append(
                Backfill(relay_backfill(conninfo, export, args.backfill_users), plain, into_users)
            )

    report(runs, soak, backfills, sqs_rates, args)
    lost = [run.lost for run in runs + ([soak] if soak else []) if run.lost]
    return 1 if lost else 0


# ---------------------------------------------------------------------------------------------------------
# Servers


def run_server(
    server: str,
    round_number: int,
    seconds: int,
    conninfo: str,
    postmaster: int | None,
    args: argparse.Namespace,
    sample_memory: bool = False,
) -> Run:
    schema = f"bench_{round_number}_{SERVERS.index(server)}"
    fresh_schema(conninfo, schema, relay=server in RELAYS)
    port = free_port()
    command, env = server_command(server, conninfo, schema, port)
    with serving(command, env, port) as (process, scratch):
        sampler = MemorySampler(process.pid) if sample_memory else None
        if sampler:
            sampler.start()
        acked_prefix = scratch / "load" if server in RELAYS else None
        cpu_before = cpu_seconds(process.pid, postmaster)
        summary = load(port, seconds, args, f"r{round_number}s{SERVERS.index(server)}", acked_prefix)
        cpu_after = cpu_seconds(process.pid, postmaster)
        if sampler:
            sampler.stop()
        acked = read_acknowledged(acked_prefix, args.threads) if acked_prefix else []
    result = Run(
        server,
        round_number,
        (summary["requests"] - summary["refused"]) / summary["seconds"],
        summary["p50_ms"],
        summary["p99_ms"],
        summary["max_ms"],
        int(summary["refused"]),
        int(summary["socket_errors"]),
        int(summary["requests"] - summary["refused"]),
    )
    result.cpu = cpu_per_event(cpu_before, cpu_after, result.acknowledged)
    if acked_prefix:
        result.lost = count_missing(conninfo, schema, acked)
    if sample_memory and sampler:
        result.rss_mib = sampler.samples
    drop_schema(conninfo, schema)
    return result


def server_command(server: str, conninfo: str, schema: str, port: int) -> tuple[list[str], dict[str, str]]:
    base = {key: value for key, value in os.environ.items() if not key.startswith("RELAY_")}
    if server in RELAYS:
        env = {
            **base,
            "DATABASE_URL": conninfo,
            "RELAY_DB_SCHEMA": schema,
            "RELAY_WEBHOOK_TOKENS": TOKEN,
            "RELAY_PORT": str(port),
        }
        if server == ONE_TX:
            env["RELAY_BATCH_MAX_EVENTS"] = "1"
            env["RELAY_BATCH_FLUSHERS"] = "10"
        if server == HISTORY:
            env["RELAY_HISTORY"] = "on"
        if server == FEED_OFF:
            env["RELAY_CHANGE_FEED"] = "off"
        return [sys.executable, "-m", "relay.cli", "serve", "--migrate"], env
    if server == GUIDE:
        env = {
            **base,
            "DATABASE_URL": conninfo,
            "GUIDE_SCHEMA": schema,
            "GUIDE_TOKEN": TOKEN,
            "PORT": str(port),
        }
        return ["node", str(BENCH_DIR / "guide" / "server.js")], env
    workers = WORKERS if server == BARE_N else 1
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "bench.bare_litestar:app",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--workers={workers}",
        "--loop=uvloop",
        "--http=httptools",
        "--no-access-log",
        "--log-level=warning",
    ], {**base, "BENCH_TOKEN": TOKEN}


def load(
    port: int, seconds: int, args: argparse.Namespace, tag: str, acked_prefix: Path | None
) -> dict[str, float]:
    completed = subprocess.run(
        [
            "wrk",
            f"-t{args.threads}",
            f"-c{args.connections}",
            f"-d{seconds}s",
            "--timeout=10s",
            "-s",
            str(BENCH_DIR / "post_events.lua"),
            f"http://127.0.0.1:{port}",
            "--",
            tag,
            TOKEN,
            str(acked_prefix) if acked_prefix else "-",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    summary: dict[str, float] = json.loads(completed.stdout.strip().splitlines()[-1])
    return summary


@dataclass(frozen=True)
class SqsRates:
    """Events per second drained from the same moto server: by `relay serve`, and by a bare loop."""

    relay: float
    bare: float


def sqs_run(aws: Aws, round_number: int, events: int, conninfo: str) -> SqsRates:
    """The same events drained from moto by `relay serve`, then by the bare loop, each from its own queue."""
    bodies = [json.dumps(eventbridge_event(event)) for event in new_users(f"sqs{round_number}", events)]
    return SqsRates(relay_sqs_rate(aws, round_number, bodies, conninfo), bare_sqs_rate(aws, bodies))


def filled_queue(aws: Aws, bodies: list[str]) -> Queue:
    queue = make_queue(aws, visibility_seconds=30, max_receives=5)
    sqs = aws.client("sqs")
    for start in range(0, len(bodies), 10):
        entries = [{"Id": str(n), "MessageBody": body} for n, body in enumerate(bodies[start : start + 10])]
        sqs.send_message_batch(QueueUrl=queue.url, Entries=entries)
    return queue


def bare_sqs_rate(aws: Aws, bodies: list[str]) -> float:
    """Events per second a loop that only receives and deletes drains from the same moto: its pace."""
    queue, sqs = filled_queue(aws, bodies), aws.client("sqs")
    started, deleted = time.monotonic(), 0
    while deleted < len(bodies):
        if time.monotonic() - started > 600:
            raise RuntimeError(f"the bare SQS loop deleted {deleted} of {len(bodies)} messages in 600 s")
        messages = sqs.receive_message(QueueUrl=queue.url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        received = messages.get("Messages", [])
        if received:
            entries = [{"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]} for n, m in enumerate(received)]
            sqs.delete_message_batch(QueueUrl=queue.url, Entries=entries)
            deleted += len(received)
    return len(bodies) / (time.monotonic() - started)


def relay_sqs_rate(aws: Aws, round_number: int, bodies: list[str], conninfo: str) -> float:
    """Events per second `relay serve` drains from an SQS queue holding these EventBridge events."""
    events = len(bodies)
    schema = f"bench_{round_number}_sqs"
    fresh_schema(conninfo, schema, relay=True)
    queue = filled_queue(aws, bodies)
    port = free_port()
    command, env = server_command(RELAY, conninfo, schema, port)
    env.update(aws.environment(), RELAY_SQS_QUEUE_URL=queue.url)
    count = sql.SQL("SELECT count(*) FROM {}.processed_events").format(sql.Identifier(schema))
    with serving(command, env, port), psycopg.connect(conninfo, autocommit=True) as conn:

        def applied() -> int:
            row = conn.execute(count).fetchone()
            return int(row[0]) if row else 0

        # The consumer starts before the HTTP port answers: what it applied by then is not timed.
        started, applied_before = time.monotonic(), applied()
        while (done := applied()) < events:
            if time.monotonic() - started > 600:
                raise RuntimeError(f"the SQS run applied {done} of {events} events in 600 s")
            time.sleep(0.05)
        elapsed = time.monotonic() - started
    drop_schema(conninfo, schema)
    return (events - applied_before) / elapsed


@contextlib.contextmanager
def serving(
    command: list[str], env: dict[str, str], port: int
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A server process started, answering on `port`, and a scratch folder beside its log; stopped after."""
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as scratch:
        log_path = Path(scratch) / "server.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_serving(port, process, log_path)
            yield process, Path(scratch)
        finally:
            stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, as an orchestrator stops the relay; killed if it has not ended within 30 s."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_until_serving(port: int, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                time.sleep(1)  # worker processes start one after the other
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server did not start within 60 s:\n{log_path.read_text()[-3000:]}")


def read_acknowledged(prefix: Path, threads: int) -> list[str]:
    return [
        line.strip()
        for thread in range(threads)
        for line in Path(f"{prefix}.{thread}.acked").read_text().splitlines()
        if line.strip()
    ]


class MemorySampler(threading.Thread):
    """The resident memory of a process and all its descendants, once a second."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[float] = []
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(1.0):
            self.samples.append(sum(rss_kib(pid) for pid in process_tree(self.pid)) / 1024)

    def stop(self) -> None:
        self._stopped.set()
        self.join()


@dataclass(frozen=True)
class CpuSeconds:
    server: float
    database: float | None
    load: float


def cpu_seconds(server_pid: int, postmaster: int | None) -> CpuSeconds:
    """CPU seconds used so far by the server's processes, PostgreSQL's (its backends that have exited
    included) and this process's children that have ended (wrk, once it has)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return CpuSeconds(
        sum(process_cpu(pid) for pid in process_tree(server_pid)),
        None
        if postmaster is None
        else sum(process_cpu(pid, reaped_children=pid == postmaster) for pid in process_tree(postmaster)),
        children.ru_utime + children.ru_stime,
    )


def cpu_per_event(before: CpuSeconds, after: CpuSeconds, events: int) -> CpuPerEvent | None:
    if not events:
        return None
    database = None
    if before.database is not None and after.database is not None:
        database = (after.database - before.database) / events * 1e6
    return CpuPerEvent(
        (after.server - before.server) / events * 1e6, database, (after.load - before.load) / events * 1e6
    )


def process_cpu(pid: int, *, reaped_children: bool = False) -> float:
    """A process's user and system CPU seconds, with those of its children it has waited for if asked."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    # Fields 14-17 of /proc/PID/stat (here from 0 after the command name): utime, stime, cutime, cstime.
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        try:
            pending += [
                int(child) for child in Path(f"/proc/{current}/task/{current}/children").read_text().split()
            ]
        except FileNotFoundError:
            continue
    return found


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


# ---------------------------------------------------------------------------------------------------------
# Backfill and the COPY limit


def export_file(users: int) -> Path:
    """A gzip NDJSON export shaped like Auth0's, generated once and kept under .data/bench/."""
    path = REPO / ".data" / "bench" / f"export-{users}.json.gz"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with gzip.open(partial, "wt", compresslevel=1) as export:
        for number in range(users):
            local = f"{number:024x}"
            row = {
                "user_id": f"auth0|{local}",
                "email": f"user{number}@example.com",
                "email_verified": number % 2 == 0,
                "name": f"User {number}",
                "nickname": f"user{number}",
                "picture": "https://s.gravatar.com/avatar/0?s=480&r=pg&d=mp",
                "identities": [
                    {
                        "connection": "Username-Password-Authentication",
                        "provider": "auth0",
                        "isSocial": False,
                        "user_id": local,
                    }
                ],
                "app_metadata": {"plan": "pro" if number % 3 else "free"},
                "user_metadata": {},
                "created_at": "2024-01-01T00:00:00.000Z",
                "updated_at": "2024-06-01T00:00:00.000Z",
                "last_login": "2024-06-01T00:00:00.000Z",
                "logins_count": number % 50,
                "blocked": False,
            }
            export.write(json.dumps(row, separators=(",", ":")) + "\n")
    partial.rename(path)
    return path


@dataclass(frozen=True)
class Backfill:
    relay: float  # users per second, `relay backfill --file` end to end
    copy_limit: float  # COPY into a staging table plus one INSERT … SELECT into a plain table
    copy_into_users: float  # the same, with the INSERT into the relay's own `users` table


def copy_limit(conninfo: str, psql: str, export: Path, users: int) -> tuple[float, float]:
    """Users per second for `gunzip | psql COPY` into jsonb plus one INSERT … SELECT, into a plain table
    (the COPY limit) and into the relay's `users` table, whose trigger derives the typed columns and whose
    five secondary indexes serve the copy's queries: what the server does with the relay's schema at best."""
    schema = "bench_copy_limit"
    drop_schema(conninfo, schema)
    asyncio.run(migrate(conninfo, schema))
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLE {}.staging (line jsonb)").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL("CREATE TABLE {}.plain (user_id text PRIMARY KEY, profile jsonb NOT NULL)").format(
                sql.Identifier(schema)
            )
        )
    copy = f"\\copy {schema}.staging (line) FROM STDIN WITH (FORMAT csv, QUOTE e'\\x01', DELIMITER e'\\x02')"
    started = time.perf_counter()
    with subprocess.Popen(["gunzip", "-c", str(export)], stdout=subprocess.PIPE) as gunzip:
        subprocess.run(
            [psql, conninfo, "-q", "-v", "ON_ERROR_STOP=1", "-c", copy], stdin=gunzip.stdout, check=True
        )
    copied = time.perf_counter() - started

    def insert_seconds(table: str) -> float:
        insert = (
            f"INSERT INTO {schema}.{table} (user_id, profile) "
            f"SELECT line ->> 'user_id', line FROM {schema}.staging"
        )
        # The relay's trigger finds its helper function on the search path, as the relay's sessions do.
        options = ["-c", f"SET search_path TO {schema}", "-c", insert]
        began = time.perf_counter()
        subprocess.run([psql, conninfo, "-q", "-v", "ON_ERROR_STOP=1", *options], check=True)
        return time.perf_counter() - began

    plain, into_users = insert_seconds("plain"), insert_seconds("users")
    drop_schema(conninfo, schema)
    return users / (copied + plain), users / (copied + into_users)


def relay_backfill(conninfo: str, export: Path, users: int) -> float:
    """Users per second for `relay backfill --file`, as an operator runs it, end to end."""
    schema = "bench_backfill"
    fresh_schema(conninfo, schema, relay=True)
    env = {
        **{key: value for key, value in os.environ.items() if not key.startswith("RELAY_")},
        "DATABASE_URL": conninfo,
        "RELAY_DB_SCHEMA": schema,
    }
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-m", "relay.cli", "backfill", "--file", str(export)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"relay backfill failed: {completed.stderr[-2000:]}")
    with psycopg.connect(conninfo, options=f"-c search_path={schema}") as conn:
        row = conn.execute("SELECT count(*) FROM users").fetchone()
    if not row or row[0] != users:
        raise RuntimeError(f"relay backfill stored {row[0] if row else 0} users of {users}")
    drop_schema(conninfo, schema)
    return users / seconds


# ---------------------------------------------------------------------------------------------------------
# The database


def database() -> tuple[str, str, str]:
    """The conninfo to measure against, what it is, and a psql client for it."""
    from relay.embedded import start_embedded

    server = start_embedded(REPO / ".data" / "bench")  # also the psql client, from the same wheel
    url = os.environ.get("DATABASE_URL") or server.conninfo
    with psycopg.connect(url) as conn:
        version = conn.info.server_version
    where = "DATABASE_URL" if os.environ.get("DATABASE_URL") else "embedded"
    return url, f"{where} ({version // 10000}.{version % 10000})", str(server.psql)


def local_postmaster(conninfo: str) -> int | None:
    """The PostgreSQL server's main process, when it runs on this machine (its CPU time is then counted)."""
    with psycopg.connect(conninfo) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
    try:
        stat = Path(f"/proc/{row[0] if row else 0}/stat").read_text()
    except FileNotFoundError:
        return None  # PostgreSQL runs elsewhere (or in a container with its own process ids)
    parent = int(stat.rsplit(")", 1)[1].split()[1])
    command = Path(f"/proc/{parent}/cmdline").read_bytes().decode(errors="replace")
    return parent if "postgres" in command else None


def memory_gib() -> float:
    with open("/proc/meminfo") as meminfo:
        return int(meminfo.readline().split()[1]) / 1024 / 1024


def fresh_schema(conninfo: str, schema: str, *, relay: bool) -> None:
    drop_schema(conninfo, schema)
    if relay:
        asyncio.run(migrate(conninfo, schema))
        return
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        conn.execute((BENCH_DIR / "guide" / "schema.sql").read_text())


def drop_schema(conninfo: str, schema: str) -> None:
    """A run's tables go once it is measured, with a checkpoint: left behind, they would keep autovacuum and
    the checkpointer busy on the cores the next run measures."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        conn.execute("CHECKPOINT")


def drop_bench_schemas(conninfo: str) -> None:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        found = conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'bench%%'").fetchall()
        for (schema,) in found:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
        conn.execute("CHECKPOINT")


def count_missing(conninfo: str, schema: str, acknowledged: list[str]) -> int:
    with psycopg.connect(conninfo, options=f"-c search_path={schema}") as conn:
        row = conn.execute(
            "SELECT count(*) FROM unnest(%s::text[]) AS acked(event_id) "
            "WHERE NOT EXISTS (SELECT 1 FROM processed_events p WHERE p.event_id = acked.event_id)",
            [acknowledged],
        ).fetchone()
    return int(row[0]) if row else -1


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ---------------------------------------------------------------------------------------------------------
# The report: ratios first


def report(
    runs: list[Run],
    soak: Run | None,
    backfills: list[Backfill],
    sqs_rates: dict[int, SqsRates],
    args: argparse.Namespace,
) -> None:
    by_round: dict[int, dict[str, Run]] = {}
    for run in runs:
        by_round.setdefault(run.round, {})[run.server] = run

    def median_ratio(numerator: str, denominator: str) -> tuple[float, list[float]]:
        ratios = [
            servers[numerator].events_per_second / servers[denominator].events_per_second
            for servers in by_round.values()
            if servers[denominator].events_per_second
        ]
        return statistics.median(ratios), ratios

    def median_of(server: str, value: Callable[[Run], float]) -> float:
        return statistics.median(value(servers[server]) for servers in by_round.values())

    print("\nRatios (median of the rounds; each round's ratio in brackets):")
    rows = [
        (f"relay / {GUIDE}", *median_ratio(RELAY, GUIDE), ">= 1.5"),
        (f"relay / {BARE_N}", *median_ratio(RELAY, BARE_N), ">= 0.8"),
        (f"relay / {BARE_1}", *median_ratio(RELAY, BARE_1), ""),
        (f"relay / {ONE_TX}", *median_ratio(RELAY, ONE_TX), ""),
        (f"{HISTORY} / relay", *median_ratio(HISTORY, RELAY), ""),
        (f"relay / {FEED_OFF}", *median_ratio(RELAY, FEED_OFF), ""),
    ]
    if sqs_rates:
        ratios = [rates.relay / rates.bare for rates in sqs_rates.values()]
        rows.append(("relay SQS consumer / bare loop, same moto", statistics.median(ratios), ratios, ""))
    if backfills:
        ratios = [backfill.relay / backfill.copy_limit for backfill in backfills]
        rows.append(("backfill / COPY limit", statistics.median(ratios), ratios, ">= 0.5"))
        ratios = [backfill.relay / backfill.copy_into_users for backfill in backfills]
        rows.append(("backfill / COPY into the relay's users table", statistics.median(ratios), ratios, ""))
    for name, ratio, each, target in rows:
        shown = ", ".join(f"{value:.2f}" for value in each)
        print(f"  {name:<44} {ratio:5.2f}  [{shown}]  {('target ' + target) if target else ''}")
    lost = sum(run.lost or 0 for run in runs + ([soak] if soak else []))
    p99 = median_of(RELAY, lambda r: r.p99_ms)
    print(f"  {f'relay p99 latency, {args.connections} connections':<44} {p99:5.1f} ms  target <= 50")
    print(f"  {'acknowledged events lost':<44} {lost:5d}     target 0")
    if soak and len(soak.rss_mib) >= 8:
        quarter, end = soak.rss_mib[len(soak.rss_mib) // 4], soak.rss_mib[-1]
        label = f"relay memory over {len(soak.rss_mib)} s, all processes"
        growth = f"{quarter:.1f} MiB at a quarter, {end:.1f} MiB at the end ({end - quarter:+.1f} MiB)"
        print(f"  {label:<44} {growth}")

    report_cpu(by_round)

    print("\nThis machine, this run (absolute figures compare with nothing measured on another day):")
    print(
        f"  {'server':<34}{'round':>6}{'events/s':>10}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}"
        f"{'refused':>9}{'lost':>6}"
    )
    for run in sorted(runs + ([soak] if soak else []), key=lambda r: (SERVERS.index(r.server), r.round)):
        lost_text = "-" if run.lost is None else str(run.lost)
        label = "memory" if run.round == 0 else str(run.round)
        print(
            f"  {run.server:<34}{label:>6}{run.events_per_second:>10.0f}{run.p50_ms:>8.1f}{run.p99_ms:>8.1f}"
            f"{run.max_ms:>8.1f}{run.refused:>9}{lost_text:>6}"
        )
    for number, rates in sqs_rates.items():
        print(f"  SQS round {number}: relay {rates.relay:,.1f} events/s, bare loop {rates.bare:,.1f}/s")
    for number, backfill in enumerate(backfills, start=1):
        print(
            f"  backfill round {number}: relay backfill {backfill.relay:,.0f} users/s, COPY limit "
            f"{backfill.copy_limit:,.0f} users/s, COPY into the relay's users table "
            f"{backfill.copy_into_users:,.0f} users/s"
        )


def report_cpu(by_round: dict[int, dict[str, Run]]) -> None:
    """Where each server's CPU went, per event, and the relay / bare ratio the CPU alone would allow: with
    every core busy, events per second go as the inverse of all the CPU an event costs, wrk's included. The
    last figure bounds what any relay can reach here: one whose processes spent no more than the bare app,
    with PostgreSQL still doing its work for each event on the same cores."""

    def median_cpu(server: str, part: Callable[[CpuPerEvent], float | None]) -> float | None:
        values = [
            value
            for servers in by_round.values()
            if (cpu := servers[server].cpu) is not None and (value := part(cpu)) is not None
        ]
        return statistics.median(values) if values else None

    print("\nCPU per event, microseconds (median of the rounds):")
    print(f"  {'server':<34}{'server':>9}{'PostgreSQL':>12}{'wrk':>8}{'all':>8}")
    for server in SERVERS:
        parts = [
            median_cpu(server, part)
            for part in (
                lambda cpu: cpu.server,
                lambda cpu: cpu.database,
                lambda cpu: cpu.load,
                lambda cpu: cpu.total,
            )
        ]
        shown = [f"{value:.0f}" if value is not None else "-" for value in parts]
        print(f"  {server:<34}{shown[0]:>9}{shown[1]:>12}{shown[2]:>8}{shown[3]:>8}")
    relay, bare = median_cpu(RELAY, lambda cpu: cpu.total), median_cpu(BARE_N, lambda cpu: cpu.total)
    database = median_cpu(RELAY, lambda cpu: cpu.database)
    if relay and bare and database is not None:
        print(f"  relay / {BARE_N} that the CPU allows: {bare / relay:.2f}")
        print(f"    were PostgreSQL's work free: {bare / (relay - database):.2f}")
        print(f"    were the relay's processes as cheap as the bare app's: {bare / (bare + database):.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
