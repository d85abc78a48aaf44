"""Metrics and structured logs: what an operator needs to see trouble before Auth0 disables the stream.

Auth0 disables a stream after 500 consecutive or 5000 total failed deliveries, so the signals that matter
are the relay's answers on its event routes, what became of each event, why requests were refused, how far
behind the events are, and whether PostgreSQL keeps up (batches, commit time, queue depth, pool). They are
counted by the relay itself, at a few microseconds a request; `/metrics` is served by Litestar's Prometheus
plugin. Logs are JSON lines: one per committed batch and one per refusal at INFO, one per request at DEBUG.
They never carry a profile field, a credential or a signature: only ids, types, outcomes and timings.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import platform
import sys
import time
from collections.abc import Iterable
from typing import Any, Protocol

import msgspec
from prometheus_client import Counter, Gauge, Histogram, multiprocess

from relay import __version__

BUILD_INFO = Gauge(
    "relay_build_info",
    "Always 1; the labels say which relay version, on which Python, this process runs.",
    ["version", "python"],
    multiprocess_mode="max",  # one series for all worker processes, not one per process
)
BUILD_INFO.labels(__version__, platform.python_version()).set(1)
REQUESTS = Counter(
    "relay_http_requests_total",
    "Answers on the event routes, by path and status code.",
    ["path", "status_code"],
)
EVENTS = Counter(
    "relay_events_total",
    "Events by type and outcome (applied, tombstoned, stale, duplicate, test, ignored, dead_lettered).",
    ["type", "outcome"],
)
AUTH_FAILURES = Counter(
    "relay_auth_failures_total", "Requests refused with 401, by route and reason.", ["route", "reason"]
)
UNAVAILABLE = Counter(
    "relay_unavailable_total",
    "Requests answered 503, by cause (database, saturated, not_migrated, internal).",
    ["cause"],
)
BATCH_SIZE = Histogram(
    "relay_batch_events",
    "Events committed per transaction.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
COMMIT_SECONDS = Histogram(
    "relay_commit_seconds",
    "Time to apply and commit one batch.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
ACK_SECONDS = Histogram(
    "relay_ack_seconds",
    "From a request's arrival to its answer, for requests that carried events.",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
EVENT_LAG_SECONDS = Histogram(
    "relay_event_lag_seconds",
    "At each commit, now minus the `time` of its oldest user event: how far behind Auth0 the copy runs.",
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800, 3600, 86400),
)
SQS_RECEIVED = Counter("relay_sqs_messages_received_total", "Messages received from the SQS queue.")
SQS_DELETED = Counter(
    "relay_sqs_messages_deleted_total", "Messages deleted from the SQS queue, each after its event committed."
)
SQS_REFUSED = Counter(
    "relay_sqs_messages_refused_total",
    "Messages left in the queue for its redrive policy, by reason (not_eventbridge, log_stream_event, "
    "source_not_allowed, origin_not_allowed, other_tenant).",
    ["reason"],
)
SQS_LAG_SECONDS = Histogram(
    "relay_sqs_lag_seconds",
    "From a message's arrival in the queue (SentTimestamp) to its deletion: how far behind the consumer is.",
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800, 3600, 86400),
)

_POOL_GAUGES = {
    key: Gauge(f"relay_db_{key}", help_text, multiprocess_mode="livesum")
    for key, help_text in (
        ("pool_size", "Connections the pools hold, busy or idle."),
        ("pool_available", "Idle connections ready for a batch."),
        ("requests_waiting", "Callers waiting for a connection."),
        ("requests_errors", "Connection requests that failed (timeouts, refused), since start."),
        ("connections_lost", "Connections found broken, since start."),
        ("connections_errors", "Failed attempts to open a connection, since start."),
    )
}
QUEUE_EVENTS = Gauge(
    "relay_queue_events",
    "Events waiting for a commit (503 beyond RELAY_QUEUE_MAX_EVENTS per worker).",
    multiprocess_mode="livesum",
)
# How often the gauges above are read from the pool and the pipeline.
RUNTIME_SAMPLE_SECONDS = 1.0


class _PoolWithStats(Protocol):
    """The store's pool, as far as the gauges need it."""

    def get_stats(self) -> dict[str, int]: ...


async def sample_runtime_forever(pool: _PoolWithStats, queue: Any) -> None:
    """Keeps the pool and queue gauges current; `queue` has a `queued_events` attribute (the pipeline). With
    several worker processes, each sets its own and a scrape sees their sum."""
    while True:
        stats = pool.get_stats()
        for key, gauge in _POOL_GAUGES.items():
            gauge.set(stats.get(key, 0))
        QUEUE_EVENTS.set(queue.queued_events)
        await asyncio.sleep(RUNTIME_SAMPLE_SECONDS)


def in_worker_processes() -> bool:
    """Whether worker processes share metrics through files (prometheus_client's multiprocess mode)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def forget_this_process() -> None:
    """Drops this worker's gauges from the shared figures as it stops; its counters stay counted."""
    if in_worker_processes():
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


_request_counters: dict[tuple[str, int], Any] = {}


def count_request(path: str, status: int) -> None:
    counter = _request_counters.get((path, status))
    if counter is None:
        counter = _request_counters[(path, status)] = REQUESTS.labels(path, str(status))
    counter.inc()


def count_events(results: Iterable[tuple[str, str]]) -> None:
    """Counts (type, outcome) pairs, one label look-up per distinct pair."""
    for (event_type, outcome), count in collections.Counter(results).items():
        EVENTS.labels(event_type, outcome).inc(count)


def observe_lag(oldest_event_time: float) -> None:
    EVENT_LAG_SECONDS.observe(max(0.0, time.time() - oldest_event_time))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's `fields`, if any."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info and record.exc_info[0] is not None:
            line["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
        return msgspec.json.encode(line).decode()


def configure_logging(level: str) -> None:
    """JSON lines on stderr for the relay, uvicorn and the pool, at `level`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.formatter.converter = time.gmtime  # type: ignore[union-attr]
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # httpx logs every request URL at INFO; an export's download URL carries a signed token.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
