"""`relay deploy-eventbridge` against a Management API played by respx: the exact requests, in order, and
what it prints (the partner event source name the CloudFormation stack takes)."""

from typing import Any

import pytest
import respx

from relay.cli import main
from relay.cli.deploy import deploy_eventbridge
from tests.support.auth0 import (
    ACCESS_TOKEN,
    AUTH0_CLIENT_SECRET,
    AUTH0_DOMAIN,
    AUTH0_ENVIRONMENT,
    MANAGEMENT_API,
    TOKEN_REQUEST,
    management_api,
    requests_made,
    streams_page,
)

API = MANAGEMENT_API
NAME = "user-sync-relay"
STREAM_ID = "est_2Vd7Hk9Pq4Lm8Nx3Rt6Ws1"
ACCOUNT = "123456789012"
REGION = "eu-west-1"
PARTNER_SOURCE = "aws.partner/auth0.com/acme-5e0a7c1d-2b3f-4e6a-9c8d-7f1e2d3c4b5a/auth0.events"
LIST_STREAMS = ("GET", "/api/v2/event-streams", {"take": "100"}, None)
SUBSCRIPTIONS = [
    {"event_type": "user.created"},
    {"event_type": "user.updated"},
    {"event_type": "user.deleted"},
]
DESTINATION = {"type": "eventbridge", "configuration": {"aws_account_id": ACCOUNT, "aws_region": REGION}}
NEXT_STEP = (
    "next: deploy deploy/aws/eventbridge-sqs.yaml with PartnerEventSourceName set to it "
    f"(in AWS account {ACCOUNT}, {REGION}), then run relay serve with RELAY_SQS_QUEUE_URL"
)


def stream(**changes: Any) -> dict[str, Any]:
    """The stream as Auth0 describes it, the partner event source included."""
    described = {
        "id": STREAM_ID,
        "name": NAME,
        "subscriptions": SUBSCRIPTIONS,
        "destination": {
            "type": "eventbridge",
            "configuration": {
                "aws_account_id": ACCOUNT,
                "aws_region": REGION,
                "aws_partner_event_source": PARTNER_SOURCE,
            },
        },
        "status": "enabled",
        "created_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:00:00Z",
    }
    return described | changes


@pytest.fixture
def auth0():
    with management_api(assert_all_called=True) as mock:
        yield mock


def deploy(**options: Any) -> int:
    return deploy_eventbridge(
        AUTH0_ENVIRONMENT, aws_account_id=ACCOUNT, aws_region=REGION, sleep=lambda _seconds: None, **options
    )


def test_dry_run_on_a_fresh_tenant_only_reads(auth0, capsys):
    auth0.get(f"{API}/event-streams").respond(200, json=streams_page())

    assert deploy(dry_run=True) == 0
    assert requests_made(auth0) == [TOKEN_REQUEST, LIST_STREAMS]
    assert capsys.readouterr().out.splitlines() == [
        f"Auth0 tenant {AUTH0_DOMAIN} (dry run: nothing will be written)",
        f"Event stream '{NAME}': not found; would create it (EventBridge, AWS account {ACCOUNT}, {REGION}, "
        "user.created, user.updated, user.deleted, enabled)",
        "dry run: nothing was written",
    ]


def test_fresh_tenant_creates_the_stream_and_prints_its_partner_event_source(auth0, capsys):
    auth0.get(f"{API}/event-streams").respond(200, json=streams_page())
    auth0.post(f"{API}/event-streams").respond(201, json=stream())

    assert deploy() == 0
    assert requests_made(auth0) == [
        TOKEN_REQUEST,
        LIST_STREAMS,
        (
            "POST",
            "/api/v2/event-streams",
            {},
            {"name": NAME, "subscriptions": SUBSCRIPTIONS, "destination": DESTINATION, "status": "enabled"},
        ),
    ]
    assert all(call.request.headers["authorization"] == f"Bearer {ACCESS_TOKEN}" for call in auth0.calls[1:])
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        f"Auth0 tenant {AUTH0_DOMAIN}",
        f"Event stream '{NAME}': not found; creating it (EventBridge, AWS account {ACCOUNT}, {REGION}, "
        "user.created, user.updated, user.deleted, enabled)",
        f"Event stream '{NAME}': created ({STREAM_ID}), enabled",
        "done",
        f"partner event source: {PARTNER_SOURCE}",
        NEXT_STEP,
    ]
    assert AUTH0_CLIENT_SECRET not in captured.out + captured.err


def test_nothing_to_change_writes_nothing_and_still_prints_the_source(auth0, capsys, monkeypatch):
    for name, value in AUTH0_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    auth0.get(f"{API}/event-streams").respond(200, json=streams_page(stream()))

    assert main(["deploy-eventbridge", "--aws-account-id", ACCOUNT, "--aws-region", REGION]) == 0
    assert requests_made(auth0) == [TOKEN_REQUEST, LIST_STREAMS]
    assert capsys.readouterr().out.splitlines()[-4:] == [
        f"Event stream '{NAME}' ({STREAM_ID}): up to date (EventBridge, AWS account {ACCOUNT}, {REGION}, "
        "user.created, user.updated, user.deleted, enabled)",
        "nothing to change",
        f"partner event source: {PARTNER_SOURCE}",
        NEXT_STEP,
    ]


def test_a_disabled_stream_missing_a_subscription_is_updated(auth0, capsys):
    auth0.get(f"{API}/event-streams").respond(
        200, json=streams_page(stream(status="disabled", subscriptions=SUBSCRIPTIONS[:2]))
    )
    auth0.patch(f"{API}/event-streams/{STREAM_ID}").respond(200, json=stream())

    assert deploy() == 0
    assert requests_made(auth0) == [
        TOKEN_REQUEST,
        LIST_STREAMS,
        (
            "PATCH",
            f"/api/v2/event-streams/{STREAM_ID}",
            {},
            {"subscriptions": SUBSCRIPTIONS, "status": "enabled"},
        ),
    ]
    assert (
        f"Event stream '{NAME}' ({STREAM_ID}): updating subscriptions +user.deleted; "
        "status disabled → enabled" in capsys.readouterr().out.splitlines()
    )


@pytest.mark.parametrize(
    ("held", "said"),
    [
        (
            {"aws_account_id": "999999999999", "aws_region": REGION},
            "sends to AWS account 999999999999 in eu-west-1",
        ),
        (
            {"aws_account_id": ACCOUNT, "aws_region": "us-east-1"},
            f"sends to AWS account {ACCOUNT} in us-east-1",
        ),
    ],
    ids=["another account", "another region"],
)
def test_a_stream_sending_elsewhere_is_reported_never_replaced(auth0, capsys, held, said):
    auth0.get(f"{API}/event-streams").respond(
        200, json=streams_page(stream(destination={"type": "eventbridge", "configuration": held}))
    )

    assert deploy() == 1
    assert requests_made(auth0) == [TOKEN_REQUEST, LIST_STREAMS]
    error = capsys.readouterr().err
    assert said in error
    assert "cannot change an EventBridge stream's account or region" in error


def test_a_missing_scope_is_named(auth0, capsys):
    auth0.get(f"{API}/event-streams").respond(200, json=streams_page())
    auth0.post(f"{API}/event-streams").respond(
        403,
        json={
            "statusCode": 403,
            "error": "Forbidden",
            "message": "Insufficient scope, expected any of: create:event_streams",
            "errorCode": "insufficient_scope",
        },
    )

    assert deploy() == 1
    assert capsys.readouterr().err.strip() == (
        "relay deploy-eventbridge: Auth0 refused to create the event stream (403 insufficient_scope: "
        "Insufficient scope, expected any of: create:event_streams): the application needs the scope "
        "create:event_streams; grant it in the Dashboard: Applications > APIs > Auth0 Management API > "
        "Machine To Machine Applications"
    )


@pytest.mark.parametrize(
    ("arguments", "said"),
    [
        (["--aws-account-id", "1234", "--aws-region", REGION], "expected a 12-digit AWS account id"),
        (["--aws-account-id", ACCOUNT, "--aws-region", "mars-1"], "expected an AWS region Auth0 can send"),
    ],
)
def test_bad_arguments_stop_before_any_request(capsys, arguments, said):
    with respx.mock(assert_all_mocked=True) as router, pytest.raises(SystemExit) as exit:
        main(["deploy-eventbridge", *arguments])
    assert exit.value.code == 2
    assert router.calls.call_count == 0
    assert said in capsys.readouterr().err


def test_missing_credentials_are_named(monkeypatch, capsys):
    for name in AUTH0_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    with respx.mock(assert_all_mocked=True) as router:
        status = main(["deploy-eventbridge", "--aws-account-id", ACCOUNT, "--aws-region", REGION])
    assert status == 2
    assert router.calls.call_count == 0
    assert "AUTH0_DOMAIN: not set" in capsys.readouterr().err
