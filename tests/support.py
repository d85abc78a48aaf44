"""Helpers shared by the tests: event builders, signing, and a relay running as a real process."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from relay.signing import sign

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).parent.parent

# A fixed test secret (Standard Webhooks format) and the key it stands for.
SIGNING_SECRET = "whsec_dGVzdC1zaWduaW5nLXNlY3JldC1mb3ItdGhlLXJlbGF5LTAx"
OTHER_SECRET = "whsec_YW5vdGhlci1zaWduaW5nLXNlY3JldC1mb3ItdGhlLXJlbGF5"
WEBHOOK_TOKEN = "test-bearer-token-0123456789"
WEBHOOK_BASIC = "auth0:basic-password-0123"
WEBHOOK_HEADER = ("X-Relay-Key", "custom-header-secret-0123")

# The Auth0 tenant the Management API tests pretend to talk to (respx answers for it).
AUTH0_DOMAIN = "acme.us.auth0.com"
AUTH0_ENVIRONMENT = {
    "AUTH0_DOMAIN": AUTH0_DOMAIN,
    "AUTH0_CLIENT_ID": "m2m-client-id-0123",
    "AUTH0_CLIENT_SECRET": "m2m-client-secret-abcdefghijklmnop",
}


def fixture(name: str) -> dict[str, Any]:
    """One of the JSON fixtures, e.g. `fixture("user.created")`."""
    loaded: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return loaded


def signing_key(secret: str = SIGNING_SECRET) -> bytes:
    from relay.settings import decode_signing_secret

    return decode_signing_secret(secret, "test")


def signed_headers(
    body: bytes, event_id: str, *, secret: str = SIGNING_SECRET, timestamp: int | None = None
) -> dict[str, str]:
    stamp = int(time.time()) if timestamp is None else timestamp
    return {
        "content-type": "application/json",
        "webhook-id": event_id,
        "webhook-timestamp": str(stamp),
        "webhook-signature": sign(signing_key(secret), event_id, stamp, body),
    }


def encode(event: Mapping[str, Any] | list[Any]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def relay_environment(conninfo: str, schema: str, **overrides: str) -> dict[str, str]:
    """The environment of a relay process wired to a test database, with every credential kind set."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RELAY_")}
    env.update(
        {
            "DATABASE_URL": conninfo,
            "RELAY_DB_SCHEMA": schema,
            "RELAY_SIGNING_SECRETS": f"{SIGNING_SECRET},{OTHER_SECRET}",
            "RELAY_WEBHOOK_TOKENS": f"{WEBHOOK_TOKEN},second-token-abcdefghij",
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

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=15)


@contextlib.contextmanager
def running_relay(env: Mapping[str, str], *, startup_seconds: float = 30) -> Iterator[RelayProcess]:
    """`relay serve` as a separate process, the way it is deployed; stopped (SIGTERM) on exit."""
    port = free_port()
    full_env = dict(env, RELAY_PORT=str(port), RELAY_HOST="127.0.0.1")
    process = subprocess.Popen(
        [sys.executable, "-m", "relay.cli", "serve"],
        env=full_env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_seconds
        while True:
            if process.poll() is not None:
                output = process.stdout.read().decode() if process.stdout else ""
                raise RuntimeError(f"relay exited with {process.returncode}:\n{output}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("relay did not start in time")
            time.sleep(0.05)
        yield RelayProcess(url, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
