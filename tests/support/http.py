"""The relay as it is deployed: `relay serve` (and the operator commands) as real processes, and requests
carrying real credentials, signed with Standard Webhooks or bearing a webhook token."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from relay.settings import decode_signing_secret
from relay.signing import sign
from tests.support import REPO
from tests.support.database import Database

ROUTES = ("action", "webhook")

# Fixed test secrets (Standard Webhooks format); relay_environment configures every credential kind.
SIGNING_SECRET = "whsec_dGVzdC1zaWduaW5nLXNlY3JldC1mb3ItdGhlLXJlbGF5LTAx"
OTHER_SECRET = "whsec_YW5vdGhlci1zaWduaW5nLXNlY3JldC1mb3ItdGhlLXJlbGF5"
WEBHOOK_TOKEN = "test-bearer-token-0123456789"
SECOND_WEBHOOK_TOKEN = "second-token-abcdefghij"
WEBHOOK_BASIC = "auth0:basic-password-0123"
WEBHOOK_HEADER = ("X-Relay-Key", "custom-header-secret-0123")
# Request headers that carry a credential: a dead letter must never keep them.
SECRET_HEADERS = ("authorization", "webhook-signature", WEBHOOK_HEADER[0].lower())


def signed_headers(
    body: bytes, event_id: str, *, secret: str = SIGNING_SECRET, timestamp: int | None = None
) -> dict[str, str]:
    """Standard Webhooks headers for `body`, as the Action sends them."""
    stamp = int(time.time()) if timestamp is None else timestamp
    return {
        "content-type": "application/json",
        "webhook-id": event_id,
        "webhook-timestamp": str(stamp),
        "webhook-signature": sign(decode_signing_secret(secret, "test"), event_id, stamp, body),
    }


def credentials(route: str, body: bytes, event_id: str) -> dict[str, str]:
    """Valid credentials for `route`: a Standard Webhooks signature, or the bearer token."""
    if route == "action":
        return signed_headers(body, event_id)
    return {"content-type": "application/json", "authorization": f"Bearer {WEBHOOK_TOKEN}"}


def deliver(
    client: httpx.Client, route: str, body: bytes, event_id: str = "evt_6SfwXrtm8nVcjzzNCFFH1L"
) -> httpx.Response:
    """Posts `body` to `/events/{route}` with valid credentials (`event_id` is the signed `webhook-id`)."""
    return client.post(f"/events/{route}", content=body, headers=credentials(route, body, event_id))


def outcomes(response: httpx.Response) -> list[str]:
    """The outcome of each event of a 200 answer, in order."""
    assert response.status_code == 200, response.text
    return [answer["outcome"] for answer in response.json()["events"]]


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if not match or match[1] != name:
            continue
        found = ",".join(sorted(part for part in (match[2] or "").split(",") if part))
        if found == wanted:
            return float(match[3])
    return 0.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def relay_environment(conninfo: str, schema: str, **overrides: str) -> dict[str, str]:
    """The environment of a relay process wired to a test database, with every credential kind set, one
    worker process, and WARNING logs (`overrides` change any of it)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RELAY_", "AUTH0_"))}
    env.update(
        {
            "DATABASE_URL": conninfo,
            "RELAY_DB_SCHEMA": schema,
            "RELAY_SIGNING_SECRETS": f"{SIGNING_SECRET},{OTHER_SECRET}",
            "RELAY_WEBHOOK_TOKENS": f"{WEBHOOK_TOKEN},{SECOND_WEBHOOK_TOKEN}",
            "RELAY_WEBHOOK_BASIC": WEBHOOK_BASIC,
            "RELAY_WEBHOOK_HEADER": f"{WEBHOOK_HEADER[0]}:{WEBHOOK_HEADER[1]}",
            "RELAY_LOG_LEVEL": "WARNING",
            "RELAY_WORKERS": "1",
        }
    )
    env.update(overrides)
    return env


@dataclass
class RelayProcess:
    url: str
    process: subprocess.Popen[bytes]
    log: Path  # what the process writes, stdout and stderr together
    _kept: str | None = None  # the log, kept once the process has stopped and the file is gone

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=15)

    def output(self) -> str:
        """Everything the process wrote so far (all of it, once it has stopped)."""
        return self._kept if self._kept is not None else self.log.read_text(errors="replace")


@contextlib.contextmanager
def running_relay(env: Mapping[str, str], *, startup_seconds: float = 30) -> Iterator[RelayProcess]:
    """`relay serve` as a separate process, the way it is deployed; stopped (SIGTERM) on exit.

    Its output goes to a file, not a pipe: a pipe nobody reads would stall a relay that logs a lot.
    """
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="relay-") as directory:
        log = Path(directory) / "relay.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "relay.cli", "serve"],
                env=dict(env, RELAY_PORT=str(port), RELAY_HOST="127.0.0.1"),
                cwd=REPO,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        relay = RelayProcess(f"http://127.0.0.1:{port}", process, log)
        try:
            deadline = time.monotonic() + startup_seconds
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"relay exited with {process.returncode}:\n{relay.output()}")
                try:
                    if httpx.get(f"{relay.url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"relay did not start in time:\n{relay.output()}")
                time.sleep(0.05)
            yield relay
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            relay._kept = relay.output()


def relay_command(database: Database, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`relay <args>` run to completion against `database`, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "relay.cli", *args],
        env=relay_environment(database.conninfo, database.schema, **env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
