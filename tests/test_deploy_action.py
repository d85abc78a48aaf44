"""`relay deploy-action` against a Management API played by respx: the exact requests, in order."""

import hashlib
import hmac
import json
from typing import Any

import httpx
import pytest
import respx

from relay.cli import main
from relay.cli.deploy import deploy_action
from tests.support import REPO
from tests.support.auth0 import (
    ACCESS_TOKEN,
    AUTH0_CLIENT_SECRET,
    AUTH0_DOMAIN,
    AUTH0_ENVIRONMENT,
    MANAGEMENT_API,
    TOKEN_REQUEST,
    management_api,
    mock_token,
    requests_made,
    streams_page,
)
from tests.support.http import OTHER_SECRET, SIGNING_SECRET

DOMAIN = AUTH0_DOMAIN
API = MANAGEMENT_API
RELAY_URL = "https://relay.example.net/auth0-sync"
NAME = "user-sync-relay"
ACTION_ID = "7a1c3e5f-0b2d-4f6a-8c9e-1d3f5a7b9c0e"
STREAM_ID = "est_8Zq2Lw4Xn6Pv0Rt3Ys5Uk7"
OTHER_ACTION_ID = "00000000-1111-4222-8333-444444444444"
SOURCE = (REPO / "action" / "forward-to-relay.js").read_text()
FINGERPRINT_PREFIX = "// relay deploy-action: secrets fingerprint (HMAC keyed by the signing secret) "

ENVIRONMENT = {**AUTH0_ENVIRONMENT, "RELAY_URL": RELAY_URL, "RELAY_SIGNING_SECRET": SIGNING_SECRET}
ROTATING = {**ENVIRONMENT, "RELAY_SIGNING_SECRET_PREVIOUS": OTHER_SECRET}
SECRET_VALUES = (RELAY_URL, SIGNING_SECRET, OTHER_SECRET, AUTH0_CLIENT_SECRET)

FIND_ACTION = (
    "GET",
    "/api/v2/actions/actions",
    {"actionName": NAME, "triggerId": "event-stream", "page": "0", "per_page": "50"},
    None,
)
READ_ACTION = ("GET", f"/api/v2/actions/actions/{ACTION_ID}", {}, None)
DEPLOY_ACTION = ("POST", f"/api/v2/actions/actions/{ACTION_ID}/deploy", {}, None)
LIST_STREAMS = ("GET", "/api/v2/event-streams", {"take": "100"}, None)
SUBSCRIPTIONS = [
    {"event_type": "user.created"},
    {"event_type": "user.updated"},
    {"event_type": "user.deleted"},
]


def secrets_list(environment: dict[str, str]) -> list[dict[str, str]]:
    names = ("RELAY_URL", "RELAY_SIGNING_SECRET", "RELAY_SIGNING_SECRET_PREVIOUS")
    return [{"name": name, "value": environment[name]} for name in names if name in environment]


def expected_code(environment: dict[str, str]) -> str:
    """The source, then an HMAC (keyed by the signing secret) over every secret's name and value."""
    pairs = sorted((item["name"], item["value"]) for item in secrets_list(environment))
    message = json.dumps(pairs, separators=(",", ":")).encode()
    digest = hmac.new(environment["RELAY_SIGNING_SECRET"].encode(), message, hashlib.sha256).hexdigest()
    return f"{SOURCE.rstrip()}\n\n{FINGERPRINT_PREFIX}{digest}\n"


def action(environment: dict[str, str] = ENVIRONMENT, **changes: Any) -> dict[str, Any]:
    """The Action as Auth0 describes it (secret values are never returned)."""
    described = {
        "id": ACTION_ID,
        "name": NAME,
        "supported_triggers": [{"id": "event-stream", "version": "v1"}],
        "code": expected_code(environment),
        "runtime": "node22",
        "secrets": [
            {"name": item["name"], "updated_at": "2026-01-01T00:00:00Z"} for item in secrets_list(environment)
        ],
        "dependencies": [],
        "status": "built",
        "all_changes_deployed": True,
    }
    return described | changes


def stream(**changes: Any) -> dict[str, Any]:
    described = {
        "id": STREAM_ID,
        "name": NAME,
        "subscriptions": SUBSCRIPTIONS,
        "destination": {"type": "action", "configuration": {"action_id": ACTION_ID}},
        "status": "enabled",
        "created_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:00:00Z",
    }
    return described | changes


def actions_page(*actions: dict[str, Any]) -> dict[str, Any]:
    return {"total": len(actions), "page": 0, "per_page": 50, "actions": list(actions)}


@pytest.fixture
def auth0():
    """The tenant's API, with a working token endpoint; every route a test adds must be called."""
    with management_api(assert_all_called=True) as mock:
        yield mock


class Waits:
    """Stands in for time.sleep, so polling and Retry-After cost no time; remembers what was asked."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.seconds.append(seconds)


def deploy(environment: dict[str, str] = ENVIRONMENT, **options: Any) -> tuple[int, Waits]:
    waits = Waits()
    return deploy_action(environment, sleep=waits, **options), waits


def assert_no_secret_printed(captured: Any) -> None:
    for value in SECRET_VALUES:
        assert value not in captured.out
        assert value not in captured.err


def assert_secrets_only_in_action_writes(mock: respx.MockRouter) -> None:
    for call in mock.calls:
        request = call.request
        writes_action = request.method in ("POST", "PATCH") and request.url.path.startswith(
            "/api/v2/actions/actions"
        )
        if not writes_action:
            for value in (RELAY_URL, SIGNING_SECRET, OTHER_SECRET):
                assert value.encode() not in request.content


def fresh_tenant(auth0: respx.MockRouter, build: list[httpx.Response]) -> dict[str, respx.Route]:
    return {
        "find": auth0.get(f"{API}/actions/actions").respond(200, json=actions_page()),
        "create": auth0.post(f"{API}/actions/actions").respond(
            201, json=action(status="pending", all_changes_deployed=False)
        ),
        "read": auth0.get(f"{API}/actions/actions/{ACTION_ID}").mock(side_effect=build),
    }


def test_fresh_tenant_creates_builds_deploys_and_binds_a_stream(auth0, capsys):
    fresh_tenant(
        auth0,
        build=[
            httpx.Response(200, json=action(status="pending", all_changes_deployed=False)),
            httpx.Response(200, json=action(status="built", all_changes_deployed=False)),
        ],
    )
    auth0.post(f"{API}/actions/actions/{ACTION_ID}/deploy").respond(
        202, json={"id": "ver_1", "action_id": ACTION_ID, "number": 1, "status": "built", "deployed": True}
    )
    auth0.get(f"{API}/event-streams").respond(200, json=streams_page())
    auth0.post(f"{API}/event-streams").respond(201, json=stream())

    status, waits = deploy()

    assert status == 0
    assert requests_made(auth0) == [
        TOKEN_REQUEST,
        FIND_ACTION,
        (
            "POST",
            "/api/v2/actions/actions",
            {},
            {
                "name": NAME,
                "supported_triggers": [{"id": "event-stream", "version": "v1"}],
                "code": expected_code(ENVIRONMENT),
                "runtime": "node22",
                "secrets": [
                    {"name": "RELAY_URL", "value": RELAY_URL},
                    {"name": "RELAY_SIGNING_SECRET", "value": SIGNING_SECRET},
                ],
            },
        ),
        READ_ACTION,
        READ_ACTION,
        DEPLOY_ACTION,
        LIST_STREAMS,
        (
            "POST",
            "/api/v2/event-streams",
            {},
            {
                "name": NAME,
                "subscriptions": SUBSCRIPTIONS,
                "destination": {"type": "action", "configuration": {"action_id": ACTION_ID}},
                "status": "enabled",
            },
        ),
    ]
    assert all(call.request.headers["authorization"] == f"Bearer {ACCESS_TOKEN}" for call in auth0.calls[1:])
    assert waits.seconds == [1.0]
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        f"Auth0 tenant {DOMAIN}",
        f"Action '{NAME}': not found; creating it (trigger event-stream v1, runtime node22, "
        "secrets RELAY_URL, RELAY_SIGNING_SECRET)",
        f"Action '{NAME}': created ({ACTION_ID})",
        f"Action '{NAME}': build pending (0 s)",
        f"Action '{NAME}': build built (0 s)",
        f"Action '{NAME}': deployed version 1",
        f"Event stream '{NAME}': not found; creating it (Action {ACTION_ID}, user.created, user.updated, "
        "user.deleted, enabled)",
        f"Event stream '{NAME}': created ({STREAM_ID}), enabled",
        "done",
    ]
    assert_no_secret_printed(captured)
    assert_secrets_only_in_action_writes(auth0)


def test_existing_action_is_updated_with_the_whole_secrets_list_when_a_secret_changes(auth0, capsys):
    # Auth0 holds the Action as deployed before the rotation began (one signing secret, the old one).
    before_rotation = {**ENVIRONMENT, "RELAY_SIGNING_SECRET": OTHER_SECRET}
    auth0.get(f"{API}/actions/actions").respond(200, json=actions_page(action(before_rotation)))
    auth0.patch(f"{API}/actions/actions/{ACTION_ID}").respond(
        200, json=action(ROTATING, status="pending", all_changes_deployed=False)
    )
    auth0.get(f"{API}/actions/actions/{ACTION_ID}").respond(
        200, json=action(ROTATING, status="built", all_changes_deployed=False)
    )
    auth0.post(f"{API}/actions/actions/{ACTION_ID}/deploy").respond(202, json={"id": "ver_2", "number": 2})
    auth0.get(f"{API}/event-streams").respond(200, json=streams_page(stream()))

    status, _ = deploy(ROTATING)

    assert status == 0
    assert requests_made(auth0) == [
        TOKEN_REQUEST,
        FIND_ACTION,
        (
            "PATCH",
            f"/api/v2/actions/actions/{ACTION_ID}",
            {},
            {
                "supported_triggers": [{"id": "event-stream", "version": "v1"}],
                "code": expected_code(ROTATING),
                "runtime": "node22",
                "secrets": [
                    {"name": "RELAY_URL", "value": RELAY_URL},
                    {"name": "RELAY_SIGNING_SECRET", "value": SIGNING_SECRET},
                    {"name": "RELAY_SIGNING_SECRET_PREVIOUS", "value": OTHER_SECRET},
                ],
            },
        ),
        READ_ACTION,
        DEPLOY_ACTION,
        LIST_STREAMS,
    ]
    captured = capsys.readouterr()
    assert (
        f"Action '{NAME}' ({ACTION_ID}): secrets changed; updating it with the whole secrets list "
        "(RELAY_URL, RELAY_SIGNING_SECRET, RELAY_SIGNING_SECRET_PREVIOUS)"
    ) in captured.out
    assert f"Action '{NAME}' ({ACTION_ID}): deployed version 2" in captured.out
    assert f"Event stream '{NAME}' ({STREAM_ID}): up to date" in captured.out
    assert_no_secret_printed(captured)
    assert_secrets_only_in_action_writes(auth0)


def test_a_changed_secret_value_alone_is_seen_through_the_fingerprint(auth0, capsys):
    # Same secret names as before; only RELAY_URL's value differs, and Auth0 never shows values.
    moved = {**ENVIRONMENT, "RELAY_URL": "https://relay-2.example.net"}
    auth0.get(f"{API}/actions/actions").respond(200, json=actions_page(action(ENVIRONMENT)))
    update = auth0.patch(f"{API}/actions/actions/{ACTION_ID}").respond(
        200, json=action(moved, status="pending")
    )
    auth0.get(f"{API}/actions/actions/{ACTION_ID}").respond(200, json=action(moved))
    auth0.post(f"{API}/actions/actions/{ACTION_ID}/deploy").respond(202, json={"id": "ver_5", "number": 5})
    auth0.get(f"{API}/event-streams").respond(200, json=streams_page(stream()))

    assert deploy(moved)[0] == 0

    sent = json.loads(update.calls.last.request.content)
    assert sent["secrets"] == secrets_list(moved)
    assert sent["code"] == expected_code(moved) != expected_code(ENVIRONMENT)
    out = capsys.readouterr().out
    assert f"Action '{NAME}' ({ACTION_ID}): secrets changed; updating it" in out
    assert "relay-2.example.net" not in out


def test_changed_code_or_runtime_is_updated_too(auth0, capsys):
    outdated = action(code="exports.onExecuteEventStream = async () => {};", runtime="node18")
    auth0.get(f"{API}/actions/actions").respond(200, json=actions_page(outdated))
    update = auth0.patch(f"{API}/actions/actions/{ACTION_ID}").respond(200, json=action(status="pending"))
    auth0.get(f"{API}/actions/actions/{ACTION_ID}").respond(200, json=action())
    auth0.post(f"{API}/actions/actions/{ACTION_ID}/deploy").respond(202, json={"id": "ver_3", "number": 3})
    auth0.get(f"{API}/event-streams").respond(200, json=streams_page(stream()))

    assert deploy()[0] == 0

    sent = json.loads(update.calls.last.request.content)
    assert sent["code"] == expected_code(ENVIRONMENT)
    assert sent["runtime"] == "node22"
    assert sent["secrets"] == secrets_list(ENVIRONMENT)
    assert "code, runtime (node18 → node22), secrets changed" in capsys.readouterr().out


def test_existing_stream_with_other_subscriptions_gets_exactly_the_three_user_events(auth0, capsys):
    auth0.get(f"{API}/actions/actions").respond(200, json=actions_page(action()))
    other_subscriptions = [{"event_type": "user.created"}, {"event_type": "organization.created"}]
    auth0.get(f"{API}/event-streams").respond(
        200, json=streams_page(stream(name="someone-elses"), stream(subscriptions=other_subscriptions))
    )
    auth0.patch(f"{API}/event-streams/{STREAM_ID}").respond(200, json=stream())

    status, _ = deploy()

    assert status == 0
    assert requests_made(auth0) == [
        TOKEN_REQUEST,
        FIND_ACTION,
        LIST_STREAMS,
        ("PATCH", f"/api/v2/event-streams/{STREAM_ID}", {}, {"subscriptions": SUBSCRIPTIONS}),
    ]
    out = capsys.readouterr().out
    assert f"Action '{NAME}' ({ACTION_ID}): up to date and deployed" in out
    assert (
        f"Event stream '{NAME}' ({STREAM_ID}): updating subscriptions +user.deleted +user.updated "
        "-organization.created"
    ) in out


def test_existing_stream_pointing_elsewhere_and_disabled_is_repointed_and_enabled(auth0):
    auth0.get(f"{API}/actions/actions").respond(200, json=actions_page(action()))
    elsewhere = {"type": "action", "configuration": {"action_id": OTHER_ACTION_ID}}
    auth0.get(f"{API}/event-streams").respond(
        200, json=streams_page(stream(destination=elsewhere, status="disabled"))
    )
    update = auth0.patch(f"{API}/event-streams/{STREAM_ID}").respond(200, json=stream())

    assert deploy()[0] == 0

    assert json.loads(update.calls.last.request.content) == {
        "destination": {"type": "action", "configuration": {"action_id": ACTION_ID}},
        "status": "enabled",
    }


def test_failed_build_prints_auth0s_error_and_deploys_nothing(auth0, capsys):
    fresh_tenant(
        auth0,
        build=[
            httpx.Response(
                200,
                json=action(
                    status="failed",
                    all_changes_deployed=False,
                    errors=[{"id": "build_failure", "msg": "SyntaxError: Unexpected token '}'"}],
                ),
            )
        ],
    )

    status, _ = deploy()

    assert status == 1
    assert [method_and_path[:2] for method_and_path in requests_made(auth0)] == [
        ("POST", "/oauth/token"),
        ("GET", "/api/v2/actions/actions"),
        ("POST", "/api/v2/actions/actions"),
        ("GET", f"/api/v2/actions/actions/{ACTION_ID}"),
    ]
    captured = capsys.readouterr()
    assert captured.err == (
        "relay deploy-action: Auth0 could not build the Action: "
        "build_failure: SyntaxError: Unexpected token '}'\n"
    )
    assert_no_secret_printed(captured)


def test_a_build_that_never_finishes_stops_at_the_timeout(auth0, capsys):
    pending = httpx.Response(200, json=action(status="building", all_changes_deployed=False))
    fresh_tenant(auth0, build=[pending] * 3)

    status, waits = deploy(build_timeout=3, poll_interval=1)

    assert status == 1
    assert waits.seconds == [1, 1]
    assert "the Action was not built within 3 s (status building)" in capsys.readouterr().err


def test_429_is_retried_after_retry_after(auth0, capsys):
    auth0.get(f"{API}/actions/actions").mock(
        side_effect=[
            httpx.Response(
                429, headers={"Retry-After": "1"}, json={"statusCode": 429, "error": "Too Many Requests"}
            ),
            httpx.Response(200, json=actions_page(action())),
        ]
    )
    auth0.get(f"{API}/event-streams").respond(200, json=streams_page(stream()))

    status, waits = deploy()

    assert status == 0
    assert requests_made(auth0) == [TOKEN_REQUEST, FIND_ACTION, FIND_ACTION, LIST_STREAMS]
    assert waits.seconds == [1.0]
    out = capsys.readouterr().out
    assert "rate limited by Auth0 while trying to look up the Action; retrying in 1 s" in out
    assert out.endswith("nothing to change\n")


def test_429_gives_up_after_a_bounded_number_of_attempts(auth0, capsys):
    limited = httpx.Response(429, headers={"Retry-After": "0"}, json={"error": "Too Many Requests"})
    find = auth0.get(f"{API}/actions/actions").mock(side_effect=[limited] * 5)

    status, waits = deploy()

    assert status == 1
    assert find.call_count == 5
    assert waits.seconds == [0, 0, 0, 0]
    assert "still rate limiting after 5 attempts" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (
            httpx.Response(401, json={"error": "access_denied", "error_description": "Unauthorized"}),
            "Auth0 refused the client credentials (401 access_denied: Unauthorized); check AUTH0_CLIENT_ID "
            "and AUTH0_CLIENT_SECRET. To look up the Action the application needs the Management API scope "
            "read:actions",
        ),
        (
            httpx.Response(
                403,
                json={
                    "error": "access_denied",
                    "error_description": f'Client is not authorized to access "https://{DOMAIN}/api/v2/".',
                },
            ),
            "the application is not authorized for the Auth0 Management API. To look up the Action it needs "
            "the scope read:actions",
        ),
    ],
)
def test_refused_token_names_the_scope(answer, expected, capsys):
    with respx.mock(assert_all_called=True) as auth0:
        mock_token(auth0, answer)

        status, _ = deploy()

    assert status == 1
    captured = capsys.readouterr()
    assert expected in captured.err
    assert len(captured.err.splitlines()) == 1
    assert_no_secret_printed(captured)


@pytest.mark.parametrize("status_code", [401, 403])
def test_refused_request_names_the_missing_scope(auth0, capsys, status_code):
    auth0.get(f"{API}/actions/actions").respond(200, json=actions_page())
    auth0.post(f"{API}/actions/actions").respond(
        status_code,
        json={
            "statusCode": status_code,
            "error": "Forbidden",
            "message": "Insufficient scope, expected any of: create:actions",
            "errorCode": "insufficient_scope",
        },
    )

    status, _ = deploy()

    assert status == 1
    assert capsys.readouterr().err == (
        f"relay deploy-action: Auth0 refused to create the Action ({status_code} insufficient_scope: "
        "Insufficient scope, expected any of: create:actions): the application needs the scope "
        "create:actions; grant it in the Dashboard: Applications > APIs > Auth0 Management API > "
        "Machine To Machine Applications\n"
    )


def test_second_run_with_nothing_changed_writes_nothing(capsys):
    """Run once against an empty tenant, then again against the tenant as the first run left it."""
    with management_api(assert_all_called=True) as auth0:
        routes = fresh_tenant(auth0, build=[httpx.Response(200, json={"id": ACTION_ID, "status": "built"})])
        auth0.post(f"{API}/actions/actions/{ACTION_ID}/deploy").respond(
            202, json={"id": "ver_1", "number": 1}
        )
        auth0.get(f"{API}/event-streams").respond(200, json=streams_page())
        created_stream = auth0.post(f"{API}/event-streams").respond(201, json=stream())
        assert deploy()[0] == 0
        sent_action = json.loads(routes["create"].calls.last.request.content)
        sent_stream = json.loads(created_stream.calls.last.request.content)
    capsys.readouterr()

    as_left = {
        "id": ACTION_ID,
        "name": sent_action["name"],
        "supported_triggers": sent_action["supported_triggers"],
        "code": sent_action["code"],
        "runtime": sent_action["runtime"],
        "secrets": [{"name": item["name"]} for item in sent_action["secrets"]],
        "status": "built",
        "all_changes_deployed": True,
    }
    with management_api(assert_all_called=True) as auth0:
        auth0.get(f"{API}/actions/actions").respond(200, json=actions_page(as_left))
        auth0.get(f"{API}/event-streams").respond(200, json=streams_page({"id": STREAM_ID, **sent_stream}))

        status, _ = deploy()

        assert requests_made(auth0) == [TOKEN_REQUEST, FIND_ACTION, LIST_STREAMS]
    assert status == 0
    assert capsys.readouterr().out.splitlines() == [
        f"Auth0 tenant {DOMAIN}",
        f"Action '{NAME}' ({ACTION_ID}): up to date and deployed",
        f"Event stream '{NAME}' ({STREAM_ID}): up to date (Action {ACTION_ID}, user.created, user.updated, "
        "user.deleted, enabled)",
        "nothing to change",
    ]


def test_undeployed_changes_are_deployed_without_an_update(auth0):
    auth0.get(f"{API}/actions/actions").respond(200, json=actions_page(action(all_changes_deployed=False)))
    auth0.get(f"{API}/actions/actions/{ACTION_ID}").respond(200, json=action(all_changes_deployed=False))
    auth0.post(f"{API}/actions/actions/{ACTION_ID}/deploy").respond(202, json={"id": "ver_4", "number": 4})
    auth0.get(f"{API}/event-streams").respond(200, json=streams_page(stream()))

    assert deploy()[0] == 0

    assert requests_made(auth0) == [TOKEN_REQUEST, FIND_ACTION, READ_ACTION, DEPLOY_ACTION, LIST_STREAMS]


def test_dry_run_on_a_fresh_tenant_prints_the_plan_and_only_reads(auth0, capsys):
    auth0.get(f"{API}/actions/actions").respond(200, json=actions_page())
    auth0.get(f"{API}/event-streams").respond(200, json=streams_page())

    status, waits = deploy(dry_run=True)

    assert status == 0
    assert requests_made(auth0) == [TOKEN_REQUEST, FIND_ACTION, LIST_STREAMS]
    assert waits.seconds == []
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        f"Auth0 tenant {DOMAIN} (dry run: nothing will be written)",
        f"Action '{NAME}': not found; would create it (trigger event-stream v1, runtime node22, "
        "secrets RELAY_URL, RELAY_SIGNING_SECRET)",
        f"Action '{NAME}': would wait for the build, then deploy it",
        f"Event stream '{NAME}': not found; would create it (the new Action, user.created, user.updated, "
        "user.deleted, enabled)",
        "dry run: nothing was written",
    ]
    assert_no_secret_printed(captured)


def test_dry_run_with_everything_outdated_only_reads(auth0, capsys):
    auth0.get(f"{API}/actions/actions").respond(
        200, json=actions_page(action({**ENVIRONMENT, "RELAY_SIGNING_SECRET": OTHER_SECRET}))
    )
    auth0.get(f"{API}/event-streams").respond(
        200, json=streams_page(stream(subscriptions=[{"event_type": "user.created"}], status="disabled"))
    )

    status, _ = deploy(ROTATING, dry_run=True)

    assert status == 0
    assert all(method == "GET" for method, *_ in requests_made(auth0)[1:])
    out = capsys.readouterr().out
    assert f"Action '{NAME}' ({ACTION_ID}): secrets changed; would update it" in out
    assert f"Event stream '{NAME}' ({STREAM_ID}): would update subscriptions" in out
    assert "status disabled → enabled" in out


def test_command_line_dry_run_uses_the_names_given(auth0, capsys, monkeypatch):
    for name, value in ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    find = auth0.get(f"{API}/actions/actions").respond(200, json=actions_page())
    auth0.get(f"{API}/event-streams").respond(200, json=streams_page())

    status = main(["deploy-action", "--dry-run", "--name", "sync-a", "--stream-name", "sync-a-stream"])

    assert status == 0
    assert find.calls.last.request.url.params["actionName"] == "sync-a"
    out = capsys.readouterr().out
    assert "Action 'sync-a': not found; would create it" in out
    assert "Event stream 'sync-a-stream': not found; would create it" in out


def test_missing_variables_are_named_one_line_each(monkeypatch, capsys):
    for name in (*ENVIRONMENT, "RELAY_SIGNING_SECRET_PREVIOUS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AUTH0_DOMAIN", DOMAIN)

    with respx.mock() as auth0:
        status = main(["deploy-action"])
        assert not auth0.calls

    assert status == 2
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[:2] for line in lines] == [
        ["relay", " configuration error"],
    ] * 4
    assert [line.split(": ")[2] for line in lines] == [
        "AUTH0_CLIENT_ID",
        "AUTH0_CLIENT_SECRET",
        "RELAY_URL",
        "RELAY_SIGNING_SECRET",
    ]


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("RELAY_URL", "http://relay.example.net", "RELAY_URL: expected the relay's https:// base URL"),
        (
            "RELAY_URL",
            "https://relay.example.net/?token=abc",
            "RELAY_URL: expected the relay's https:// base URL",
        ),
        ("RELAY_SIGNING_SECRET", "not-a-whsec-secret", "RELAY_SIGNING_SECRET: "),
        ("RELAY_SIGNING_SECRET_PREVIOUS", "whsec_c2hvcnQ=", "RELAY_SIGNING_SECRET_PREVIOUS: "),
        ("AUTH0_DOMAIN", "https://acme.us.auth0.com/api/v2/", "AUTH0_DOMAIN: expected a host name"),
    ],
)
def test_malformed_variables_are_refused_before_any_request(monkeypatch, capsys, variable, value, message):
    for name, good in ENVIRONMENT.items():
        monkeypatch.setenv(name, good)
    monkeypatch.setenv(variable, value)

    with respx.mock() as auth0:
        status = main(["deploy-action"])
        assert not auth0.calls

    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith(f"relay: configuration error: {message}")
    assert len(err.splitlines()) == 1
    if "SECRET" in variable:
        assert value not in err


def test_accepts_the_domain_with_scheme_and_trailing_slash(auth0):
    auth0.get(f"{API}/actions/actions").respond(200, json=actions_page(action()))
    auth0.get(f"{API}/event-streams").respond(200, json=streams_page(stream()))

    status, _ = deploy({**ENVIRONMENT, "AUTH0_DOMAIN": f"https://{DOMAIN}/"})

    assert status == 0
    assert requests_made(auth0)[0] == TOKEN_REQUEST
