"""What operators reach for first: the version (`relay --version`, `/readyz`, `relay_build_info`),
`python -m relay`, and every secret variable read from a file instead (`NAME_FILE`, as Docker and Kubernetes
mount them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from relay.cli import main
from relay.settings import SECRET_VARIABLES, ConfigError, Settings
from tests.support import PROJECT_VERSION, REPO
from tests.support.auth0 import AUTH0_ENVIRONMENT, MANAGEMENT_API, management_api, requests_made
from tests.support.database import Database, user_row
from tests.support.events import encode, fixture
from tests.support.http import (
    SIGNING_SECRET,
    WEBHOOK_BASIC,
    WEBHOOK_TOKEN,
    metric,
    relay_environment,
    running_relay,
    signed_headers,
)

# The relay's own secret variables, with a valid value each (the Auth0 commands' are tested further down).
RELAY_SECRETS = {
    "DATABASE_URL": "postgresql://relay:pass-word@db.internal:5432/relay",
    "RELAY_SIGNING_SECRETS": SIGNING_SECRET,
    "RELAY_WEBHOOK_TOKENS": WEBHOOK_TOKEN,
    "RELAY_WEBHOOK_BASIC": WEBHOOK_BASIC,
    "RELAY_WEBHOOK_HEADER": "X-Relay-Key:header-secret",
}


def run_relay(*args: str, module: str = "relay.cli", **variables: str) -> subprocess.CompletedProcess[str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("RELAY_", "AUTH0_", "DATABASE_URL"))
    }
    env.update(variables)
    return subprocess.run(
        [sys.executable, "-m", module, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("module", ["relay", "relay.cli"])
def test_version_is_the_one_in_pyproject(module: str) -> None:
    finished = run_relay("--version", module=module)

    assert finished.returncode == 0, finished.stderr
    assert finished.stdout == f"relay {PROJECT_VERSION}\n"


def test_python_dash_m_relay_is_the_console_script() -> None:
    finished = run_relay("--help", module="relay")

    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.startswith("usage: relay ")
    assert "dead-letters" in finished.stdout


def write_secret(directory: Path, name: str, value: str) -> str:
    path = directory / name.lower()
    path.write_text(value + "\n")  # as `echo` and most secret stores write it
    return str(path)


def test_every_relay_secret_read_from_a_file_equals_the_variable_set_directly(tmp_path: Path) -> None:
    from_files = {
        f"{name}_FILE": write_secret(tmp_path, name, value) for name, value in RELAY_SECRETS.items()
    }

    assert Settings.from_env(from_files) == Settings.from_env(RELAY_SECRETS)
    assert set(RELAY_SECRETS) <= set(SECRET_VARIABLES)


@pytest.mark.parametrize("name", SECRET_VARIABLES)
def test_a_secret_set_both_ways_is_refused_naming_both(tmp_path: Path, name: str) -> None:
    environ = {name: "direct-value", f"{name}_FILE": write_secret(tmp_path, name, "file-value")}

    with pytest.raises(ConfigError) as error:
        Settings.from_env(environ)

    assert str(error.value) == f"{name} and {name}_FILE are both set: keep one of them"


def test_an_unreadable_secret_file_is_named_with_the_reason(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-file"

    with pytest.raises(ConfigError) as error:
        Settings.from_env({"RELAY_WEBHOOK_TOKENS_FILE": str(missing)})

    assert str(error.value) == (
        f"RELAY_WEBHOOK_TOKENS_FILE: cannot read {str(missing)!r}: No such file or directory"
    )


def test_a_malformed_secret_from_a_file_is_reported_under_its_variable_without_the_value(
    tmp_path: Path,
) -> None:
    path = write_secret(tmp_path, "signing", "whsec_c2hvcnQtczNjcmV0")  # 12 bytes: too short

    with pytest.raises(ConfigError) as error:
        Settings.from_env({"RELAY_SIGNING_SECRETS_FILE": path})

    assert str(error.value).startswith("RELAY_SIGNING_SECRETS: ")
    assert "c2hvcnQtczNjcmV0" not in str(error.value)


def test_relay_serve_with_a_secret_set_both_ways_stops_in_one_line(tmp_path: Path) -> None:
    finished = run_relay(
        "serve",
        DATABASE_URL="postgresql://relay@127.0.0.1:1/unused",
        RELAY_WEBHOOK_TOKENS=WEBHOOK_TOKEN,
        RELAY_WEBHOOK_TOKENS_FILE=write_secret(tmp_path, "tokens", "another-token-0123456789"),
    )

    assert finished.returncode == 2
    assert finished.stderr == (
        "relay: configuration error: RELAY_WEBHOOK_TOKENS and RELAY_WEBHOOK_TOKENS_FILE are both set: "
        "keep one of them\n"
    )


@pytest.mark.integration
def test_a_relay_with_every_secret_in_files_serves_signed_events_from_two_workers(
    database: Database, tmp_path: Path
) -> None:
    """The serving process hands the database URL to its worker processes: the file must not make them see
    the secret set both ways."""
    env = relay_environment(database.conninfo, database.schema, RELAY_WORKERS="2")
    for name in ("DATABASE_URL", "RELAY_SIGNING_SECRETS", "RELAY_WEBHOOK_TOKENS"):
        env[f"{name}_FILE"] = write_secret(tmp_path, name, env.pop(name))
    for name in ("RELAY_WEBHOOK_BASIC", "RELAY_WEBHOOK_HEADER"):
        del env[name]
    created = fixture("user.created")
    body = encode(created)

    with running_relay(env) as relay, relay.client() as client:
        signed = client.post("/events/action", content=body, headers=signed_headers(body, created["id"]))
        bearer = client.post(
            "/events/webhook", content=body, headers={"authorization": f"Bearer {WEBHOOK_TOKEN}"}
        )
        ready = client.get("/readyz")
        metrics = client.get("/metrics").text

    assert [signed.status_code, bearer.status_code] == [200, 200], relay.output()
    assert [signed.json()["events"][0]["outcome"], bearer.json()["events"][0]["outcome"]] == [
        "applied",
        "duplicate",
    ]
    assert user_row(database, created["data"]["object"]["user_id"]) is not None
    assert ready.status_code == 200
    assert ready.json()["version"] == PROJECT_VERSION
    assert metric(metrics, "relay_build_info", version=PROJECT_VERSION, python=python_version()) == 1


def python_version() -> str:
    return ".".join(map(str, sys.version_info[:3]))


def test_an_auth0_command_sends_the_client_secret_read_from_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in AUTH0_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    # Registered with monkeypatch first, so that whatever the command puts in the environment is undone.
    monkeypatch.delenv("AUTH0_CLIENT_SECRET")
    monkeypatch.setenv(
        "AUTH0_CLIENT_SECRET_FILE", write_secret(tmp_path, "client", "client-secret-from-file")
    )
    stream = "est_8Zq2Lw4Xn6Pv0Rt3Ys5Uk7"

    with management_api() as router:
        router.get(f"{MANAGEMENT_API}/event-streams/{stream}/deliveries").mock(
            return_value=httpx.Response(200, json=[])
        )
        status = main(["deliveries", "--stream-id", stream])
        made = requests_made(router)

    assert status == 0, capsys.readouterr().err
    method, path, _, form = made[0]
    assert (method, path, form["client_secret"]) == ("POST", "/oauth/token", "client-secret-from-file")
