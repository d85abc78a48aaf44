"""deploy/gateway/nginx.conf, as shipped, with a real nginx in front of a real relay: signed events reach the
relay unchanged through TLS and the stripped path prefix, a client trickling its header is cut by nginx, a
body over the relay's limit is refused by nginx, and the internal routes cannot be reached through it.

Only the lines the file marks EDIT (and its log paths) are changed, to a loopback address, a certificate made
for the test and this relay's port; an EDIT line that no longer reads as expected fails the test.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from relay.settings import Settings
from tests.support import REPO
from tests.support.database import Database, assert_stored_as_sent, row_counts
from tests.support.events import cloudevent, encode
from tests.support.http import RelayProcess, free_port, signed_headers

pytestmark = pytest.mark.integration

NGINX_CONF = REPO / "deploy" / "gateway" / "nginx.conf"
PREFIX = "/auth0-sync"
HEADER_TIMEOUT_SECONDS = 10  # client_header_timeout in nginx.conf


@dataclass
class Gateway:
    url: str
    tls: ssl.SSLContext
    port: int

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=self.tls, timeout=15)


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    certificate, key = directory / "relay.crt", directory / "relay.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(certificate)),
        ],
        check=True,
        capture_output=True,
    )
    return certificate, key


def configured(text: str, replacements: dict[str, str]) -> str:
    for shipped, replacement in replacements.items():
        assert text.count(shipped) == 1, f"nginx.conf should hold {shipped!r} exactly once"
        text = text.replace(shipped, replacement)
    return text


@pytest.fixture(scope="module")
def gateway(relay: RelayProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("nginx")
    certificate, key = self_signed_certificate(directory)
    port = free_port()
    relay_address = relay.url.removeprefix("http://")
    config = directory / "nginx.conf"
    config.write_text(
        configured(
            NGINX_CONF.read_text(),
            {
                "listen 443 ssl;": f"listen 127.0.0.1:{port} ssl;",
                "server 127.0.0.1:8000;": f"server {relay_address};",
                "/etc/nginx/tls/relay.crt": str(certificate),
                "/etc/nginx/tls/relay.key": str(key),
                "/var/log/nginx/auth0-relay.error.log": str(directory / "error.log"),
                "/var/log/nginx/auth0-relay.access.log": str(directory / "access.log"),
            },
        )
    )
    checked = subprocess.run(["nginx", "-t", "-c", str(config), "-p", str(directory)], capture_output=True)
    assert checked.returncode == 0, checked.stderr.decode()
    nginx = subprocess.Popen(
        [
            "nginx",
            "-c",
            str(config),
            "-p",
            str(directory),
            "-g",
            f"daemon off; pid {directory / 'nginx.pid'};",
        ],
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert nginx.poll() is None, nginx.stderr.read().decode() if nginx.stderr else ""
            assert time.monotonic() < deadline, "nginx did not start listening"
            time.sleep(0.05)
        yield Gateway(
            f"https://127.0.0.1:{port}{PREFIX}", ssl.create_default_context(cafile=certificate), port
        )
    finally:
        nginx.terminate()
        nginx.wait(timeout=10)


def requests_the_relay_answered(relay: RelayProcess) -> float:
    """Every answer the relay counted on its event routes, read from the relay directly."""
    text = httpx.get(f"{relay.url}/metrics").text
    return sum(float(value) for value in re.findall(r"^relay_http_requests_total\{.*\} (\S+)$", text, re.M))


def test_a_signed_event_goes_through_unchanged_and_is_applied(
    gateway: Gateway, clean_database: Database
) -> None:
    event = cloudevent("user.created", name="Zoë Ångström ✓")
    # Spacing and escapes as no JSON encoder would redo them: a gateway that re-encoded the body would
    # break the signature, which covers its exact bytes.
    body = encode(event).replace(b'","', b'",  "').replace("Zoë".encode(), b"Zo\\u00eb") + b"\n"

    with gateway.client() as client:
        answer = client.post("/events/action", content=body, headers=signed_headers(body, event["id"]))

    assert answer.status_code == 200, answer.text
    assert answer.json()["events"][0]["outcome"] == "applied"
    assert_stored_as_sent(clean_database, event)


def test_a_body_of_exactly_the_relays_limit_passes_and_one_byte_more_is_refused_by_nginx(
    gateway: Gateway, relay: RelayProcess, clean_database: Database
) -> None:
    limit = Settings().max_body_bytes  # the relay process runs with the default RELAY_MAX_BODY_BYTES
    event = cloudevent("user.created", user_metadata={"padding": ""})
    event["data"]["object"]["user_metadata"]["padding"] = "x" * (limit - len(encode(event)))
    at_limit = encode(event)
    assert len(at_limit) == limit
    over_limit = at_limit[:-1] + b" }"

    with gateway.client() as client:
        accepted = client.post(
            "/events/action", content=at_limit, headers=signed_headers(at_limit, event["id"])
        )
        answered_before = requests_the_relay_answered(relay)
        refused = client.post(
            "/events/action", content=over_limit, headers=signed_headers(over_limit, event["id"])
        )

    assert accepted.status_code == 200, accepted.text
    assert refused.status_code == 413
    assert "nginx" in refused.text  # nginx's own page: the relay never saw the request
    assert requests_the_relay_answered(relay) == answered_before
    assert row_counts(clean_database)["processed_events"] == 1


@pytest.mark.parametrize("prefix", ["", PREFIX])
@pytest.mark.parametrize("route", ["/metrics", "/healthz", "/readyz"])
def test_the_internal_routes_are_not_reachable_through_the_gateway(
    gateway: Gateway, prefix: str, route: str
) -> None:
    with httpx.Client(verify=gateway.tls) as client:
        answer = client.get(f"https://127.0.0.1:{gateway.port}{prefix}{route}")

    assert answer.status_code == 404
    assert "relay_" not in answer.text and "ready" not in answer.text


def test_a_client_trickling_its_header_is_cut_by_nginx_and_never_reaches_the_relay(
    gateway: Gateway, relay: RelayProcess
) -> None:
    answered_before = requests_the_relay_answered(relay)
    connected = time.monotonic()
    with (
        socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as raw,
        gateway.tls.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(f"POST {PREFIX}/events/action HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ".encode())
        cut_after = trickle_until_cut(tls, give_up_after=3 * HEADER_TIMEOUT_SECONDS)

    assert cut_after is not None, "nginx kept a trickling header open"
    assert HEADER_TIMEOUT_SECONDS - 1 <= cut_after - connected <= HEADER_TIMEOUT_SECONDS + 3
    assert requests_the_relay_answered(relay) == answered_before


def trickle_until_cut(tls: ssl.SSLSocket, *, give_up_after: float) -> float | None:
    """Sends one header byte every half second; when the server ended the request, or None."""
    tls.settimeout(0.5)
    started = time.monotonic()
    while time.monotonic() - started < give_up_after:
        try:
            tls.sendall(b"x")
            tls.recv(4096)  # closed (b""), or answered before the header was complete: cut either way
            return time.monotonic()
        except TimeoutError:  # nothing from the server for half a second (TLS session tickets aside)
            continue
        except OSError:  # reset, or the TLS session torn down
            return time.monotonic()
    return None
