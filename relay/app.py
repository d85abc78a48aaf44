"""`create_app()`: the HTTP shell around `ingest`: routes, lifespan, and truthful status codes.

401 only for a request that is not authentic, 413 for an oversized body, 503 with `Retry-After` when
PostgreSQL cannot take the event now (Auth0 retries 5xx, never 4xx), and 200 only after the commit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import msgspec
import psycopg
from litestar import Litestar, Request, get, post
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.plugins.prometheus import PrometheusConfig, PrometheusController
from litestar.response import Response
from psycopg_pool import AsyncConnectionPool, PoolTimeout, TooManyRequests

from relay.batching import GroupCommitter, Saturated
from relay.ingest import Applier, EventResult, NotAllowed, ingest_body
from relay.migrations import latest_version
from relay.observability import ACK_SECONDS, AUTH_FAILURES, UNAVAILABLE, watch_pool, watch_queue
from relay.settings import Settings
from relay.signing import Rejected, verify_standard_webhook, verify_webhook_credentials
from relay.store import Connection, create_pool, migrated_version

log = logging.getLogger("relay")

# Auth0 retries after 1, 2 and 4 s; a short hint keeps the retry inside that window.
RETRY_AFTER_SECONDS = 2
# Auth0 and the Action send a body at once; anything slower is a client holding a connection open.
BODY_READ_SECONDS = 10
# Connections served at once; beyond it uvicorn answers 503 (Auth0 retries) instead of exhausting sockets.
MAX_CONCURRENT_CONNECTIONS = 1000


@dataclass(slots=True)
class Relay:
    """What the routes share: configuration and the pool, kept on `app.state.relay`."""

    settings: Settings
    pool: AsyncConnectionPool[Connection]
    committer: GroupCommitter
    apply: Applier
    clock: Callable[[], float] = time.time


def _relay(state: State) -> Relay:
    relay: Relay = state.relay
    return relay


def _error(status: int, reason: str, headers: dict[str, str] | None = None) -> Response[dict[str, str]]:
    return Response({"error": reason}, status_code=status, headers=headers)


def _unavailable(reason: str) -> Response[dict[str, str]]:
    return _error(503, reason, {"Retry-After": str(RETRY_AFTER_SECONDS)})


def _accepted(results: list[EventResult]) -> Response[dict[str, Any]]:
    events = [
        {
            key: value
            for key, value in (
                ("id", result.event_id),
                ("outcome", str(result.outcome)),
                ("dead_letter_id", result.dead_letter_id),
                ("error", result.error),
            )
            if value is not None
        }
        for result in results
    ]
    return Response({"events": events}, status_code=200)


async def _ingest(
    request: Request[Any, Any, Any], relay: Relay, route: str, body: bytes, **options: Any
) -> Response[Any]:
    started = time.perf_counter()
    try:
        results = await ingest_body(
            relay.pool,
            relay.apply,
            route=route,
            headers=request.headers,
            body=body,
            allowed_tenants=relay.settings.allowed_tenants,
            allowed_streams=relay.settings.allowed_streams,
            **options,
        )
    except NotAllowed as refused:
        # Authentic, but another tenant's or stream's event: not ours to store, and Auth0 must see a failure.
        AUTH_FAILURES.labels(route, "origin_not_allowed").inc()
        fields = {"route": route, "status": 403, "reason": "origin_not_allowed"}
        log.warning("request refused", extra={"fields": fields})
        return _error(403, refused.reason)
    except Saturated as saturated:
        return _unavailable_because(route, "saturated", "relay saturated; retry later", str(saturated))
    except (PoolTimeout, TooManyRequests):
        detail = f"no database connection within {relay.settings.db_timeout_seconds} s"
        return _unavailable_because(route, "database", "database busy or unavailable; retry later", detail)
    except psycopg.OperationalError as error:
        detail = type(error).__name__
        return _unavailable_because(route, "database", "database unavailable; retry later", detail)
    except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
        # A replica that started before `relay migrate` ran: retryable once an operator migrates.
        detail = f"the relay's tables are missing from schema {relay.settings.db_schema!r}"
        return _unavailable_because(
            route, "not_migrated", "database not migrated: run `relay migrate`", detail
        )
    seconds = time.perf_counter() - started
    ACK_SECONDS.labels(route).observe(seconds)
    log.info(
        "events received",
        extra={
            "fields": {
                "route": route,
                "status": 200,
                "latency_ms": round(seconds * 1000, 2),
                "events": [
                    {"id": r.event_id, "type": r.event_type, "user_id": r.user_id, "outcome": str(r.outcome)}
                    for r in results
                ],
            }
        },
    )
    return _accepted(results)


async def _read_body(request: Request[Any, Any, Any]) -> bytes:
    """The whole body, within BODY_READ_SECONDS: a client trickling it cannot hold a connection forever."""
    try:
        async with asyncio.timeout(BODY_READ_SECONDS):
            return await request.body()
    except TimeoutError:
        raise HTTPException(
            status_code=408, detail=f"body not received within {BODY_READ_SECONDS} s"
        ) from None


def _refused(route: str, rejected: Rejected) -> Response[dict[str, str]]:
    AUTH_FAILURES.labels(route, rejected.code).inc()
    log.warning("request refused", extra={"fields": {"route": route, "status": 401, "reason": rejected.code}})
    return _error(401, rejected.reason)


def _unavailable_because(route: str, cause: str, reason: str, detail: str) -> Response[dict[str, str]]:
    UNAVAILABLE.labels(cause).inc()
    log.warning(
        "answered 503", extra={"fields": {"route": route, "status": 503, "cause": cause, "detail": detail}}
    )
    return _unavailable(reason)


@post("/events/action", status_code=200)
async def receive_from_action(request: Request[Any, Any, Any], state: State) -> Response[Any]:
    """One CloudEvent signed by the Auth0 Action (Standard Webhooks v1)."""
    relay = _relay(state)
    body = await _read_body(request)
    try:
        event_id = verify_standard_webhook(
            request.headers, body, relay.settings.signing_secrets, relay.clock()
        )
    except Rejected as rejected:
        return _refused("action", rejected)
    return await _ingest(request, relay, "action", body, expected_event_id=event_id)


@post("/events/webhook", status_code=200)
async def receive_from_webhook(request: Request[Any, Any, Any], state: State) -> Response[Any]:
    """One CloudEvent, or a JSON array of them, from Auth0's webhook destination."""
    relay = _relay(state)
    settings = relay.settings
    try:
        # Credentials are in the headers: check them before reading a body nobody vouched for.
        verify_webhook_credentials(
            request.headers,
            tokens=settings.webhook_tokens,
            basic=settings.webhook_basic,
            custom_headers=settings.webhook_headers,
        )
    except Rejected as rejected:
        return _refused("webhook", rejected)
    return await _ingest(request, relay, "webhook", await _read_body(request))


@get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive; says nothing of the database, so an orchestrator does not restart us for it."""
    return {"status": "ok"}


@get("/readyz")
async def readyz(state: State) -> Response[Any]:
    """The database answers and carries every migration this version needs."""
    relay = _relay(state)
    expected = latest_version()
    try:
        async with relay.pool.connection() as conn:
            found = await migrated_version(conn)
    except (PoolTimeout, TooManyRequests, psycopg.OperationalError):
        return _unavailable("database unavailable")
    except psycopg.errors.UndefinedTable:
        return _unavailable("database not migrated: run `relay migrate`")
    if found < expected:
        return _unavailable(
            f"database at migration {found}, this relay needs {expected}: run `relay migrate`"
        )
    return Response({"status": "ready", "migration": found}, status_code=200)


def _json_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, str]]:
    # Litestar's own 4xx (413 above all) in the same shape as ours, with nothing internal in it.
    return _error(exc.status_code, str(exc.detail))


def create_app(
    settings: Settings,
    conninfo: str,
    *,
    clock: Callable[[], float] = time.time,
    applier: Applier | None = None,
) -> Litestar:
    """A relay app for `settings`, writing to the database at `conninfo`.

    `applier` replaces the group committer; only the benchmark's ceiling run uses it, to measure the
    HTTP, authentication and decoding path alone. No setting or flag reaches it.
    """
    pool = create_pool(conninfo, settings)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        # Not waiting for a connection: the relay serves (and answers 503) while PostgreSQL comes up.
        await pool.open(wait=False)
        watch_pool(pool)
        committer = GroupCommitter(
            pool,
            settings.delete_mode,
            max_events=settings.batch_max_events,
            max_wait_seconds=settings.batch_max_wait_ms / 1000,
            max_queued_events=settings.queue_max_events,
            flushers=settings.batch_flushers,
        )
        committer.start()
        watch_queue(committer)
        app.state.relay = Relay(
            settings=settings, pool=pool, committer=committer, apply=applier or committer.apply, clock=clock
        )
        try:
            yield
        finally:
            # Every event already accepted is committed before the pool goes away.
            await committer.close()
            await pool.close()

    metrics = PrometheusConfig(app_name="relay", prefix="relay_http", group_path=True)
    return Litestar(
        route_handlers=[receive_from_action, receive_from_webhook, healthz, readyz, PrometheusController],
        middleware=[metrics.middleware],
        lifespan=[lifespan],
        request_max_body_size=settings.max_body_bytes,
        exception_handlers={HTTPException: _json_error},
        type_encoders={msgspec.UnsetType: lambda _: None},
        openapi_config=None,
        logging_config=None,  # the relay's JSON logging is configured once, by the CLI
    )


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def serve(app: Litestar, settings: Settings) -> None:
    """Runs `app` under uvicorn until SIGINT or SIGTERM, then lets in-flight batches commit."""
    import signal

    import uvicorn

    # Uvicorn raises SIGTERM again once its graceful shutdown is over, which would end the process as killed
    # by the signal (status 143); by then every accepted event is committed, so report a clean exit instead.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    uvicorn.run(
        app,
        limit_concurrency=MAX_CONCURRENT_CONNECTIONS,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        log_config=None,  # keep the relay's JSON logging (configured by the CLI)
        access_log=False,
        timeout_graceful_shutdown=10,
    )
