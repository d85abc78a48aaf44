"""Faults under load, with real processes and real PostgreSQL: PostgreSQL restarted, the relay killed or
stopped, two relays racing on the same users, and slow or oversized requests beside normal ones.

The load is a handful of concurrent senders posting distinct, signed events and, like Auth0, retrying what
was refused (a 503, or no answer at all) with the same event id. Whatever happens, every event a sender saw
acknowledged must be in the ledger with its user row, and no event may be half-applied. Each test is bounded
in events and seconds and stops every process it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from relay.embedded import start_embedded
from relay.migrations import migrate
from tests.support.database import Database
from tests.support.events import encode, new_users
from tests.support.http import WEBHOOK_TOKEN, relay_environment, running_relay, signed_headers
from tests.support.reference import assert_copy_matches, conflicting_history, to_cloudevents

pytestmark = pytest.mark.integration

SENDERS = 8
# Uvicorn's graceful-shutdown budget in `relay serve`.
GRACE_SECONDS = 10
# How long the Action waits for an answer (RELAY_TIMEOUT_MS' default): a slower answer is no answer.
ACTION_TIMEOUT_SECONDS = 8


# ---------------------------------------------------------------------------------------------------------
# The load generator


@dataclass
class Sent:
    """One event and everything its sender saw while delivering it."""

    event_id: str
    body: bytes
    route: str = "action"
    answers: list[int | str] = field(default_factory=list)  # status codes, or the transport error's name
    outcomes: list[str] = field(default_factory=list)  # from the 200 answer

    @property
    def acknowledged(self) -> bool:
        return 200 in self.answers

    @property
    def refused_then_accepted(self) -> bool:
        return self.acknowledged and self.answers[0] != 200


class Load:
    """Concurrent senders over `deliveries`; used as a context manager so the threads always stop.

    `stop_taking()` lets senders finish (and retry) the event in hand but take no new one; `abandon()` makes
    them give up at once, as Auth0 does once its retries are spent.
    """

    def __init__(
        self,
        urls: list[str],
        deliveries: Iterable[Sent],
        *,
        senders: int = SENDERS,
        retry_pause: float = 0.05,
    ) -> None:
        self.urls = urls
        self._pending = iter(deliveries)
        self._lock = threading.Lock()
        self._taking = threading.Event()
        self._taking.set()
        self._abandoned = threading.Event()
        self._retry_pause = retry_pause
        self.taken: list[Sent] = []
        self.retry_after_headers: list[str | None] = []
        self._threads = [threading.Thread(target=self._send, daemon=True) for _ in range(senders)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop_taking()
        self.join(timeout=30)
        self.abandon()
        self.join(timeout=15)
        assert not any(thread.is_alive() for thread in self._threads), "a sender did not stop"

    def stop_taking(self) -> None:
        self._taking.clear()

    def abandon(self) -> None:
        self._taking.clear()
        self._abandoned.set()

    def join(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def acknowledged(self) -> list[Sent]:
        with self._lock:
            return [delivery for delivery in self.taken if delivery.acknowledged]

    def answers(self) -> list[int | str]:
        with self._lock:
            return [answer for delivery in self.taken for answer in delivery.answers]

    def wait_until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.02)

    def _next(self) -> Sent | None:
        with self._lock:
            delivery = next(self._pending, None)
            if delivery is not None:
                self.taken.append(delivery)
            return delivery

    def _send(self) -> None:
        chooser = random.Random()
        with httpx.Client(timeout=10) as client:
            while self._taking.is_set():
                delivery = self._next()
                if delivery is None:
                    return
                while not self._abandoned.is_set():
                    if self._attempt(client, chooser.choice(self.urls), delivery):
                        break
                    time.sleep(self._retry_pause)

    def _attempt(self, client: httpx.Client, url: str, delivery: Sent) -> bool:
        """One POST; True when there is nothing more to do for this delivery."""
        if delivery.route == "action":
            headers = signed_headers(delivery.body, delivery.event_id)
        else:
            headers = {"content-type": "application/json", "authorization": f"Bearer {WEBHOOK_TOKEN}"}
        try:
            response = client.post(f"{url}/events/{delivery.route}", content=delivery.body, headers=headers)
        except httpx.TransportError as error:
            delivery.answers.append(type(error).__name__)
            return False
        delivery.answers.append(response.status_code)
        if response.status_code == 503:
            with self._lock:
                self.retry_after_headers.append(response.headers.get("retry-after"))
            return False
        if response.status_code == 200:
            delivery.outcomes += [event["outcome"] for event in response.json()["events"]]
        return True


def distinct_users(prefix: str, count: int = 20_000) -> Iterator[Sent]:
    """A user.created for a new user each time: one event per user, so each row tells of one event."""
    for event in new_users(prefix, count):
        yield Sent(event["id"], encode(event))


def assert_nothing_acknowledged_is_lost_and_nothing_half_applied(
    database: Database, load: Load, prefix: str
) -> dict[str, str]:
    """Every acknowledged event is in the ledger and its user row; every ledger row's event was applied
    whole (the row carries it), and every user row has its ledger row. Returns the ledger."""
    ledger = dict(database.query("SELECT event_id, outcome FROM processed_events"))
    users = {
        user_id: (email, last_event_id)
        for user_id, email, last_event_id in database.query("SELECT user_id, email, last_event_id FROM users")
    }
    sent = {delivery.event_id for delivery in load.taken}
    acknowledged = {delivery.event_id for delivery in load.acknowledged()}

    assert acknowledged - ledger.keys() == set(), "acknowledged but not committed"
    assert ledger.keys() <= sent
    assert set(ledger.values()) == {"applied"}
    for event_id in ledger:
        number = int(event_id.removeprefix(f"evt_{prefix}"))
        assert users.get(f"auth0|{prefix}-{number}") == (f"user{number}@{prefix}.example", event_id)
    assert len(users) == len(ledger)
    return ledger


# ---------------------------------------------------------------------------------------------------------
# PostgreSQL restarted under load


def test_postgresql_restart_under_load_answers_503_then_recovers_and_loses_nothing(tmp_path: Path) -> None:
    server = start_embedded(tmp_path / "restarted", stop_at_exit=False)
    prefix = "pgr" + secrets.token_hex(3)
    try:
        asyncio.run(migrate(server.conninfo, "faults"))
        database = Database(server.conninfo, "faults")
        env = relay_environment(server.conninfo, "faults", RELAY_DB_TIMEOUT_SECONDS="1")
        with running_relay(env) as relay, Load([relay.url], distinct_users(prefix)) as load:
            load.wait_until(lambda: len(load.acknowledged()) >= 200, 20, "200 acknowledged events")

            server.handle.stop()
            stopped_at = len(load.answers())
            load.wait_until(lambda: load.answers()[stopped_at:].count(503) >= 20, 15, "503s while it is down")
            time.sleep(1)
            server.handle.start()

            recovered_at = len(load.acknowledged())
            load.wait_until(lambda: len(load.acknowledged()) >= recovered_at + 300, 30, "recovery")
            load.stop_taking()
            assert load.join(timeout=30), "refused events were not all accepted after the restart"
            with relay.client() as client:
                assert client.get("/readyz").status_code == 200

        answers = load.answers()
        assert set(answers) == {200, 503}, "the relay itself stayed up: every request gets an answer"
        assert load.retry_after_headers
        assert all(header and int(header) > 0 for header in load.retry_after_headers)
        assert all(delivery.acknowledged for delivery in load.taken), "a sender gave up"
        ledger = assert_nothing_acknowledged_is_lost_and_nothing_half_applied(database, load, prefix)

        retried = [delivery for delivery in load.taken if delivery.refused_then_accepted]
        assert len(retried) >= SENDERS
        for delivery in retried:
            # Once in the ledger. The answer that got through may say `duplicate` when the commit an earlier
            # attempt was waiting for did happen but its answer was lost with the connection.
            assert ledger[delivery.event_id] == "applied"
            assert delivery.outcomes[-1] in ("applied", "duplicate")
        assert len(ledger) == len(load.taken)
    finally:
        server.handle.stop()


# ---------------------------------------------------------------------------------------------------------
# The relay killed, or stopped, under load


def test_relay_killed_with_sigkill_under_load_has_committed_every_acknowledged_event(
    database: Database,
) -> None:
    prefix = "kil" + secrets.token_hex(3)
    with (
        running_relay(relay_environment(database.conninfo, database.schema)) as relay,
        Load([relay.url], distinct_users(prefix)) as load,
    ):
        load.wait_until(lambda: len(load.acknowledged()) >= 400, 20, "400 acknowledged events")
        relay.process.kill()
        relay.process.wait(timeout=10)
        load.abandon()
    assert relay.process.returncode == -signal.SIGKILL
    ledger = assert_nothing_acknowledged_is_lost_and_nothing_half_applied(database, load, prefix)
    assert len(ledger) >= 400


@pytest.mark.parametrize("workers", [1, 2], ids=["one process", "two worker processes"])
def test_sigterm_under_load_commits_what_was_acknowledged_and_exits_0(
    database: Database, workers: int
) -> None:
    """With worker processes, the parent passes SIGTERM on; each worker commits its own accepted batches."""
    prefix = "trm" + secrets.token_hex(3)
    env = relay_environment(database.conninfo, database.schema, RELAY_WORKERS=str(workers))
    with running_relay(env) as relay, Load([relay.url], distinct_users(prefix)) as load:
        load.wait_until(lambda: len(load.acknowledged()) >= 400, 20, "400 acknowledged events")
        relay.process.send_signal(signal.SIGTERM)
        try:
            # Bounded by uvicorn's graceful-shutdown budget, after which it stops waiting for requests.
            relay.process.wait(timeout=GRACE_SECONDS + 5)
        finally:
            load.abandon()
    ledger = assert_nothing_acknowledged_is_lost_and_nothing_half_applied(database, load, prefix)
    assert len(ledger) >= 400
    assert relay.process.returncode == 0, f"exit status {relay.process.returncode}\n{relay.output()[-2000:]}"


# ---------------------------------------------------------------------------------------------------------
# Two relays, one database, conflicting events for the same users


def test_two_relays_on_one_database_converge_on_conflicting_events_without_errors(
    database: Database,
) -> None:
    chooser = random.Random(secrets.randbits(32))
    prefix = secrets.token_hex(4)
    history = conflicting_history(chooser, users=5, events=240)
    events = to_cloudevents(history, prefix)
    # Every event once, a third of them two or three times, all shuffled; each attempt goes to either relay.
    deliveries = [
        Sent(event["id"], encode(event), route=chooser.choice(["action", "webhook"]))
        for event in events
        for _ in range(1 if chooser.random() < 0.66 else chooser.randint(2, 3))
    ]
    chooser.shuffle(deliveries)

    env = relay_environment(database.conninfo, database.schema)
    with running_relay(env) as first, running_relay(env) as second:
        with Load([first.url, second.url], deliveries) as load:
            assert load.join(timeout=60), "the deliveries were not all answered in time"
        answers = load.answers()

    assert answers.count(200) == len(answers) == len(deliveries), sorted(set(map(str, answers)))
    assert_copy_matches(database, events, prefix)


# ---------------------------------------------------------------------------------------------------------
# Slow clients and oversized bodies beside normal requests


@contextlib.contextmanager
def trickling_clients(url: str, count: int, stop: threading.Event) -> Iterator[list[socket.socket]]:
    """Clients that open a request and send it a byte at a time, some in the headers, some in the body."""
    address = urlsplit(url)
    head = (
        "POST /events/webhook HTTP/1.1\r\nHost: relay\r\n"
        f"Authorization: Bearer {WEBHOOK_TOKEN}\r\nContent-Type: application/json\r\n"
        "Content-Length: 100000\r\n\r\n"
    ).encode()
    sockets = []
    for number in range(count):
        sock = socket.create_connection((address.hostname, address.port), timeout=5)
        sock.sendall(head if number % 2 else head[:10])  # half stall in the headers, half in the body
        sockets.append(sock)

    def trickle() -> None:
        while not stop.wait(0.2):
            for sock in sockets:
                with contextlib.suppress(OSError):
                    sock.send(b"x")

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        yield sockets
    finally:
        stop.set()
        thread.join(timeout=5)
        for sock in sockets:
            sock.close()


def oversized_sender(url: str, stop: threading.Event, statuses: list[int | str]) -> None:
    big = b'{"padding": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    headers = {"content-type": "application/json", "authorization": f"Bearer {WEBHOOK_TOKEN}"}
    with httpx.Client(base_url=url, timeout=10) as client:
        while not stop.is_set():
            chunked = len(statuses) % 2 == 1
            content: Any = iter([big[i : i + 65536] for i in range(0, len(big), 65536)]) if chunked else big
            try:
                statuses.append(client.post("/events/webhook", content=content, headers=headers).status_code)
            except httpx.TransportError as error:
                statuses.append(type(error).__name__)


def test_slow_clients_and_oversized_bodies_do_not_starve_normal_requests(database: Database) -> None:
    prefix = "slw" + secrets.token_hex(3)
    stop = threading.Event()
    oversized: list[int | str] = []
    with running_relay(relay_environment(database.conninfo, database.schema)) as relay:
        big_senders = [
            threading.Thread(target=oversized_sender, args=(relay.url, stop, oversized), daemon=True)
            for _ in range(2)
        ]
        # Normal senders wait as long as the Action does, no longer: a request starved past that is lost.
        with (
            trickling_clients(relay.url, 40, stop),
            httpx.Client(base_url=relay.url, timeout=ACTION_TIMEOUT_SECONDS) as client,
        ):
            for thread in big_senders:
                thread.start()
            time.sleep(0.5)  # let the slow and oversized requests take hold first
            normal = list(itertools.islice(distinct_users(prefix), 40))
            for delivery in normal:
                headers = signed_headers(delivery.body, delivery.event_id)
                try:
                    response = client.post("/events/action", content=delivery.body, headers=headers)
                    delivery.answers.append(response.status_code)
                except httpx.TransportError as error:
                    delivery.answers.append(type(error).__name__)
                time.sleep(0.05)
            stop.set()
        for thread in big_senders:
            thread.join(timeout=15)
        assert relay.process.poll() is None, "the relay died"

    assert [delivery.answers for delivery in normal] == [[200]] * len(normal)
    assert 413 in oversized
    assert set(oversized) <= {413} | {name for name in oversized if isinstance(name, str)}
    ledger = database.query("SELECT event_id FROM processed_events")
    assert {row[0] for row in ledger} == {delivery.event_id for delivery in normal}
