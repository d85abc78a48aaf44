"""`RELAY_WORKERS`: `relay serve` runs that many worker processes on one socket, each with its own pool and
group committer, and events are applied whichever worker takes them.

Which worker took a request is read from the operating system, not from the relay: the connection's server
end is a socket that one worker process holds open (`/proc/<pid>/fd` and `/proc/net/tcp`, so Linux only).
Stopping workers under load is in test_faults.py.
"""

from __future__ import annotations

import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.database import Database, outcomes_recorded
from tests.support.events import encode, new_users
from tests.support.http import RelayProcess, metric, relay_environment, running_relay, signed_headers

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

CONNECTIONS = 20  # concurrent connections per round
ROUNDS = 5  # rounds at most, until both workers have served


def child_processes(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # the field after the state is the parent
                children.append(int(entry.name))
    return children


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            found = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(fd))
        except OSError:
            continue
        if found:
            inodes.add(found[1])
    return inodes


def server_socket_inode(server_port: int, client_port: int) -> str:
    """The inode of the server end of the loopback connection from `client_port`."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
            return inode
    raise AssertionError(f"no connection from port {client_port} to {server_port}")


def post_on_connections_of_their_own(relay: RelayProcess, events: list[dict[str, Any]]) -> dict[str, int]:
    """Posts each event on a fresh connection, all at once; the worker process that answered each one."""
    clients = [httpx.Client(base_url=relay.url, timeout=15) for _ in events]
    try:

        def post(client: httpx.Client, event: dict[str, Any]) -> int:
            body = encode(event)
            response = client.post("/events/action", content=body, headers=signed_headers(body, event["id"]))
            assert response.json() == {"events": [{"id": event["id"], "outcome": "applied"}]}
            _, port = response.extensions["network_stream"].get_extra_info("client_addr")
            return int(port)

        with ThreadPoolExecutor(max_workers=len(events)) as threads:
            client_ports = list(threads.map(post, clients, events))
        # The connections are still open (keep-alive): each one's server end is held by one worker.
        server_port = int(relay.url.rsplit(":", 1)[1])
        holders = {pid: socket_inodes(pid) for pid in child_processes(relay.process.pid)}
        served = {}
        for event, client_port in zip(events, client_ports, strict=True):
            inode = server_socket_inode(server_port, client_port)
            [served[event["id"]]] = [pid for pid, inodes in holders.items() if inode in inodes]
        return served
    finally:
        for client in clients:
            client.close()


def post_until_both_workers_served(relay: RelayProcess, prefix: str) -> dict[str, int]:
    """Rounds of new users' events until two worker processes have each answered some; which one answered
    each event."""
    events = list(new_users(prefix, CONNECTIONS * ROUNDS))
    served: dict[str, int] = {}
    for start in range(0, len(events), CONNECTIONS):
        served |= post_on_connections_of_their_own(relay, events[start : start + CONNECTIONS])
        if len(set(served.values())) >= 2:
            break
    return served


def test_two_worker_processes_both_serve_events_and_every_event_is_applied(database: Database) -> None:
    env = relay_environment(database.conninfo, database.schema, RELAY_WORKERS="2")
    with running_relay(env) as relay:
        served = post_until_both_workers_served(relay, "wrk")
        workers = set(child_processes(relay.process.pid)) & set(served.values())

    assert len(workers) == 2, f"only process {workers} served"
    assert outcomes_recorded(database) == dict.fromkeys(served, "applied")


def test_a_scrape_of_either_worker_counts_the_events_of_both(database: Database) -> None:
    """Each worker keeps its metrics in files the others read (prometheus_client's multiprocess mode), so
    whichever worker answers a scrape, the counters are the relay's, not that one process's."""
    env = relay_environment(database.conninfo, database.schema, RELAY_WORKERS="2")
    with running_relay(env) as relay:
        served = post_until_both_workers_served(relay, "met")
        # A fresh connection for each scrape: either worker may accept it.
        scrapes = [httpx.get(f"{relay.url}/metrics", timeout=15).text for _ in range(10)]
        served_by_both = len(set(served.values())) == 2

    assert served_by_both, "one worker took every connection; nothing to add up"
    for scrape in scrapes:
        assert metric(scrape, "relay_events_total", type="user.created", outcome="applied") == len(served)
        assert metric(scrape, "relay_http_requests_total", path="/events/action", status_code="200") == len(
            served
        )
