"""`make bench`: the relay's throughput, measured side by side in one run on this machine.

Three runs, each against a fresh schema and the real server process, loaded by wrk with pre-signed, distinct
events on 64 connections:
  1. ceiling: the same server, authentication and decoding, acknowledging without touching PostgreSQL;
  2. one transaction per event (RELAY_BATCH_MAX_EVENTS=1);
  3. group commit (the defaults);
then a longer group-commit run that samples the relay's memory. After every run with a database, each event
wrk saw acknowledged is looked up in `processed_events`: the count missing is printed, and must be 0.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gzip
import hashlib
import hmac
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql

from relay.migrations import migrate

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
SECRET_KEY = b"benchmark-signing-key-0123456789abcdef"
SECRET = "whsec_" + base64.b64encode(SECRET_KEY).decode()
# Events generated per second of load: above what each kind of run reaches here, so wrk never wraps around
# (the summary says so if it ever does).
EVENTS_PER_SECOND_BUDGET = {"ceiling": 16_000, "relay": 8_000}


@dataclass
class RunResult:
    name: str
    events_per_second: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    peak_rss_mib: float = 0.0
    refused: int = 0
    socket_errors: int = 0
    wrapped: int = 0
    acknowledged: int = 0
    lost: int | None = None
    rss_samples_mib: list[float] = field(default_factory=list)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=20, help="length of each comparison run")
    parser.add_argument("--soak-seconds", type=int, default=60, help="length of the memory run (0 skips it)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument(
        "--backfill-users", type=int, default=1_000_000, help="size of the generated export (0 skips it)"
    )
    args = parser.parse_args()

    if shutil.which("wrk") is None:
        print("bench: wrk is not installed (make bench installs it with apt-get)", file=sys.stderr)
        return 2
    conninfo, where = database()
    print(f"machine: {os.cpu_count()} cores, {memory_gib():.0f} GiB; PostgreSQL: {where}")
    print(f"load: wrk, {args.threads} threads, {args.connections} connections, {args.seconds} s per run\n")

    runs = [
        ("ceiling (no database)", "ceiling", {}, args.seconds),
        ("one transaction per event", "relay", {"RELAY_BATCH_MAX_EVENTS": "1"}, args.seconds),
        ("group commit", "relay", {}, args.seconds),
    ]
    if args.soak_seconds:
        runs.append(("group commit, memory run", "relay", {}, args.soak_seconds))
    drop_earlier_runs(conninfo)
    results = []
    for name, server, overrides, seconds in runs:
        print(f"running: {name} ...", flush=True)
        results.append(run(name, server, overrides, seconds, conninfo, args))

    print_report(results)
    if args.backfill_users:
        print(f"\nrunning: backfill of a generated {args.backfill_users:,}-user export ...", flush=True)
        print_backfill(backfill(conninfo, args.backfill_users))
    return 0 if all(result.lost in (0, None) for result in results) else 1


def database() -> tuple[str, str]:
    if os.environ.get("DATABASE_URL"):
        url = os.environ["DATABASE_URL"]
        with psycopg.connect(url) as conn:
            return url, f"DATABASE_URL ({conn.info.server_version})"
    from relay.embedded import start_embedded

    server = start_embedded(REPO / ".data" / "bench")
    with psycopg.connect(server.conninfo) as conn:
        return server.conninfo, f"embedded ({conn.info.server_version})"


def memory_gib() -> float:
    with open("/proc/meminfo") as meminfo:
        return int(meminfo.readline().split()[1]) / 1024 / 1024


def fresh_schema(conninfo: str, schema: str) -> None:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    asyncio.run(migrate(conninfo, schema))


def drop_earlier_runs(conninfo: str) -> None:
    """Earlier runs' tables would keep autovacuum busy on the cores this run measures."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        found = conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'bench%%'").fetchall()
        for (schema,) in found:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
        conn.execute("CHECKPOINT")


def write_events(prefix: Path, count: int, threads: int, run_tag: str) -> None:
    """Signed, distinct `user.created` events, split across one file per wrk thread."""
    now = int(time.time())
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(now))
    files = [open(f"{prefix}.{thread}.events", "w") for thread in range(threads)]  # noqa: SIM115
    try:
        for number in range(count):
            event_id = f"evt_{run_tag}{number:016d}"
            user = f"{run_tag}{number:012d}"
            body = json.dumps(
                {
                    "specversion": "1.0",
                    "type": "user.created",
                    "source": "urn:auth0:bench.us.auth0.com",
                    "id": event_id,
                    "time": stamp,
                    "data": {
                        "object": {
                            "user_id": f"auth0|{user}",
                            "email": f"user{number}@example.com",
                            "email_verified": False,
                            "name": f"Bench User {number}",
                            "nickname": f"user{number}",
                            "identities": [
                                {
                                    "connection": "Username-Password-Authentication",
                                    "provider": "auth0",
                                    "isSocial": False,
                                    "user_id": user,
                                }
                            ],
                            "app_metadata": {"plan": "free"},
                            "user_metadata": {},
                            "created_at": stamp,
                            "updated_at": stamp,
                        }
                    },
                    "a0tenant": "bench",
                    "a0stream": "est_" + "0" * 22,
                },
                separators=(",", ":"),
            )
            signed = f"{event_id}.{now}.{body}".encode()
            signature = base64.b64encode(hmac.new(SECRET_KEY, signed, hashlib.sha256).digest()).decode()
            files[number % threads].write(f"{event_id}\t{now}\tv1,{signature}\t{body}\n")
    finally:
        for file in files:
            file.close()


def run(
    name: str, server: str, overrides: dict[str, str], seconds: int, conninfo: str, args: Any
) -> RunResult:
    result = RunResult(name)
    schema = "bench_" + ("ceiling" if server == "ceiling" else f"run{int(time.time() * 1000) % 10**9}")
    fresh_schema(conninfo, schema)
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as scratch:
        prefix = Path(scratch) / "load"
        write_events(prefix, seconds * EVENTS_PER_SECOND_BUDGET[server], args.threads, schema[-6:])
        port = free_port()
        env = {
            **{key: value for key, value in os.environ.items() if not key.startswith("RELAY_")},
            "DATABASE_URL": conninfo,
            "RELAY_DB_SCHEMA": schema,
            "RELAY_SIGNING_SECRETS": SECRET,
            "RELAY_PORT": str(port),
            "RELAY_LOG_LEVEL": "WARNING",
            **overrides,
        }
        command = (
            [sys.executable, str(BENCH_DIR / "ceiling_server.py")]
            if server == "ceiling"
            else [sys.executable, "-m", "relay.cli", "serve"]
        )
        process = subprocess.Popen(command, env=env, cwd=REPO)
        try:
            wait_until_serving(port, process)
            sampler = RssSampler(process.pid)
            sampler.start()
            load = subprocess.run(
                [
                    "wrk",
                    f"-t{args.threads}",
                    f"-c{args.connections}",
                    f"-d{seconds}s",
                    "--timeout",
                    "10s",
                    "-s",
                    str(BENCH_DIR / "post_events.lua"),
                    f"http://127.0.0.1:{port}",
                    "--",
                    str(prefix),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            sampler.stop()
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
        summary = json.loads(load.stdout.strip().splitlines()[-1])
        acked = [
            line.strip()
            for thread in range(args.threads)
            for line in Path(f"{prefix}.{thread}.acked").read_text().splitlines()
            if line.strip()
        ]
    result.events_per_second = summary["requests"] / summary["seconds"]
    result.p50_ms, result.p99_ms, result.max_ms = summary["p50_ms"], summary["p99_ms"], summary["max_ms"]
    result.refused, result.socket_errors, result.wrapped = (
        summary["refused"],
        summary["socket_errors"],
        summary["wrapped"],
    )
    result.acknowledged = len(acked)
    result.peak_rss_mib = max(sampler.samples, default=0.0)
    result.rss_samples_mib = sampler.samples
    if server != "ceiling":
        result.lost = count_missing(conninfo, schema, acked)
    return result


@dataclass
class BackfillResult:
    users: int
    seconds: float
    peak_rss_mib: float
    rss_samples_mib: list[float]
    stored: int


def export_file(users: int) -> Path:
    """A gzip NDJSON export shaped like Auth0's, generated once and kept under .data/bench/."""
    path = REPO / ".data" / "bench" / f"export-{users}.json.gz"
    if path.exists():
        return path
    partial = path.with_suffix(".partial")
    with gzip.open(partial, "wt", compresslevel=1) as export:
        for number in range(users):
            local = f"{number:024x}"
            export.write(
                json.dumps(
                    {
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
                    },
                    separators=(",", ":"),
                )
                + "\n"
            )
    partial.rename(path)
    return path


def backfill(conninfo: str, users: int) -> BackfillResult:
    """`relay backfill --file` as an operator runs it, timed end to end (gunzip, decode, COPY, merge)."""
    path = export_file(users)
    schema = "bench_backfill"
    fresh_schema(conninfo, schema)
    env = {
        **{key: value for key, value in os.environ.items() if not key.startswith("RELAY_")},
        "DATABASE_URL": conninfo,
        "RELAY_DB_SCHEMA": schema,
        "RELAY_LOG_LEVEL": "WARNING",
    }
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "relay.cli", "backfill", "--file", str(path)],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    sampler = RssSampler(process.pid)
    sampler.start()
    _, errors = process.communicate()
    seconds = time.perf_counter() - started
    sampler.stop()
    if process.returncode != 0:
        raise RuntimeError(f"relay backfill failed: {errors.decode()[-2000:]}")
    with psycopg.connect(conninfo, options=f"-c search_path={schema}") as conn:
        row = conn.execute("SELECT count(*) FROM users").fetchone()
    return BackfillResult(
        users, seconds, max(sampler.samples, default=0.0), sampler.samples, int(row[0]) if row else 0
    )


def print_backfill(result: BackfillResult) -> None:
    print(
        f"backfill: {result.users:,} users in {result.seconds:.1f} s = "
        f"{result.users / result.seconds:,.0f} users/s (target >= 20,000); {result.stored:,} rows stored; "
        f"peak RSS {result.peak_rss_mib:.1f} MiB"
    )
    samples = result.rss_samples_mib
    if len(samples) >= 4:
        print(
            f"backfill memory: {samples[len(samples) // 4]:.1f} MiB at a quarter of the run, "
            f"{samples[-1]:.1f} MiB at the end"
        )


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


def wait_until_serving(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError("server did not start within 30 s")


class RssSampler(threading.Thread):
    """The server's resident memory, once a second."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[float] = []
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(1.0):
            try:
                with open(f"/proc/{self.pid}/status") as status:
                    for line in status:
                        if line.startswith("VmRSS:"):
                            self.samples.append(int(line.split()[1]) / 1024)
            except FileNotFoundError:
                return

    def stop(self) -> None:
        self._stopped.set()
        self.join()


def print_report(results: list[RunResult]) -> None:
    print()
    header = (
        f"{'run':<28}{'events/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
        f"{'peak MiB':>10}{'acked':>9}{'lost':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        lost = "n/a" if r.lost is None else str(r.lost)
        print(
            f"{r.name:<28}{r.events_per_second:>10.0f}{r.p50_ms:>9.1f}{r.p99_ms:>9.1f}{r.max_ms:>9.1f}"
            f"{r.peak_rss_mib:>10.1f}{r.acknowledged:>9}{lost:>6}"
        )
        if r.refused or r.socket_errors or r.wrapped:
            print(f"{'':<28}refused {r.refused}, socket errors {r.socket_errors}, wrapped around {r.wrapped}")
    by_name = {r.name: r for r in results}
    ceiling = by_name["ceiling (no database)"].events_per_second
    single = by_name["one transaction per event"].events_per_second
    group = by_name["group commit"].events_per_second
    print()
    print(f"group commit / ceiling:                    {group / ceiling:.2f}  (target >= 0.60)")
    print(f"group commit / one transaction per event:  {group / single:.2f}  (target >= 2.5)")
    soak = by_name.get("group commit, memory run")
    if soak and len(soak.rss_samples_mib) >= 4:
        quarter = soak.rss_samples_mib[len(soak.rss_samples_mib) // 4]
        print(
            f"memory run: RSS {quarter:.1f} MiB at a quarter of the run, "
            f"{soak.rss_samples_mib[-1]:.1f} MiB at the end ({soak.rss_samples_mib[-1] - quarter:+.1f} MiB)"
        )


if __name__ == "__main__":
    raise SystemExit(main())
