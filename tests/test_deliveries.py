"""`relay deliveries` and `relay redeliver` against the event-stream endpoints played by respx: both shapes
Auth0 is documented to answer the deliveries list with, paging, and what 202 and 409 mean to an operator."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from relay.cli import main
from tests.support.auth0 import ACCESS_TOKEN, AUTH0_DOMAIN, AUTH0_ENVIRONMENT, MANAGEMENT_API, management_api

DOMAIN = AUTH0_DOMAIN
API = MANAGEMENT_API
STREAM_ID = "est_8Zq2Lw4Xn6Pv0Rt3Ys5Uk7"
DELIVERIES = f"{API}/event-streams/{STREAM_ID}/deliveries"


@pytest.fixture(autouse=True)
def auth0_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in AUTH0_ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AUTH0_EVENT_STREAM_ID", raising=False)
    monkeypatch.setenv("RELAY_LOG_LEVEL", "WARNING")


@pytest.fixture
def auth0() -> Any:
    with management_api() as router:
        yield router


def delivery(event_id: str, event_type: str, time: str, *errors: str) -> dict[str, Any]:
    """A failed delivery as Auth0 lists it; `event.data` is a string in Auth0's API description."""
    return {
        "id": event_id,
        "event_stream_id": STREAM_ID,
        "status": "failed",
        "event_type": event_type,
        "attempts": [
            {"status": "failed", "timestamp": f"{time[:-1]}.{number}Z", "error_message": error}
            for number, error in enumerate(errors, start=1)
        ],
        "event": {
            "id": event_id,
            "source": f"urn:auth0:{DOMAIN}",
            "specversion": "1.0",
            "type": event_type,
            "time": time,
            "data": json.dumps({"object": {"user_id": "auth0|1"}}),
        },
    }


FIRST = delivery(
    "evt_Aaaaaaaaaaaaaaaaaaaaa1", "user.created", "2026-05-01T10:00:00Z", "timeout", "503 from relay"
)
SECOND = delivery(
    "evt_Bbbbbbbbbbbbbbbbbbbbb2", "user.deleted", "2026-05-01T10:05:00Z", "connect ECONNREFUSED"
)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_deliveries_as_a_bare_array_are_listed_in_a_table(
    auth0: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    route = auth0.get(DELIVERIES).mock(return_value=httpx.Response(200, json=[SECOND, FIRST]))

    status, out, err = run(
        capsys,
        *("deliveries", "--stream-id", STREAM_ID, "--since", "2026-05-01T09:30:00.250+02:00"),
        *("--until", "2026-05-02", "--types", "user.created, user.deleted"),
    )

    assert status == 0, err
    assert dict(route.calls[0].request.url.params) == {
        "statuses": "failed",
        "take": "100",
        "date_from": "2026-05-01T07:30:00Z",  # UTC, whole seconds: what Auth0 accepts
        "date_to": "2026-05-02T00:00:00Z",
        "event_types": "user.created,user.deleted",
    }
    lines = out.splitlines()
    assert lines[0].split() == [
        "EVENT",
        "ID",
        "TYPE",
        "EVENT",
        "TIME",
        "ATTEMPTS",
        "LAST",
        "ATTEMPT",
        "LAST",
        "ERROR",
    ]
    assert lines[1].split() == [
        "evt_Aaaaaaaaaaaaaaaaaaaaa1",
        "user.created",
        "2026-05-01T10:00:00Z",
        "2",
        "2026-05-01T10:00:00.2Z",
        "503",
        "from",
        "relay",
    ]
    assert lines[2].split()[:4] == ["evt_Bbbbbbbbbbbbbbbbbbbbb2", "user.deleted", "2026-05-01T10:05:00Z", "1"]
    assert lines[2].endswith("connect ECONNREFUSED")
    assert "2 failed deliveries for event stream est_8Zq2Lw4Xn6Pv0Rt3Ys5Uk7" in out
    assert "relay redeliver" in out


def test_deliveries_in_pages_of_an_object_follow_next(auth0: Any, capsys: pytest.CaptureFixture[str]) -> None:
    route = auth0.get(DELIVERIES).mock(
        side_effect=[
            httpx.Response(200, json={"deliveries": [FIRST], "next": "cGFnZS0y"}),
            httpx.Response(200, json={"deliveries": [SECOND], "next": None}),
        ]
    )

    status, out, _ = run(capsys, "deliveries", "--stream-id", STREAM_ID)

    assert status == 0
    assert [call.request.url.params.get("from") for call in route.calls] == [None, "cGFnZS0y"]
    assert "evt_Aaaaaaaaaaaaaaaaaaaaa1" in out and "evt_Bbbbbbbbbbbbbbbbbbbbb2" in out
    assert "2 failed deliveries" in out


def test_a_full_bare_array_page_goes_on_from_its_last_delivery(
    auth0: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    page = [
        delivery(
            f"evt_{number:022d}", "user.updated", f"2026-05-01T10:{number // 60:02d}:{number % 60:02d}Z", "x"
        )
        for number in range(100)
    ]
    route = auth0.get(DELIVERIES).mock(
        side_effect=[httpx.Response(200, json=page), httpx.Response(200, json=[page[-1], FIRST])]
    )

    status, out, _ = run(capsys, "deliveries", "--stream-id", STREAM_ID)

    assert status == 0
    assert [call.request.url.params.get("from") for call in route.calls] == [None, page[-1]["id"]]
    assert "101 failed deliveries" in out  # the delivery both pages hold is listed once


def test_a_healthy_stream_found_by_name_has_no_failed_deliveries(
    auth0: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    auth0.get(f"{API}/event-streams", params={"take": "100"}).mock(
        return_value=httpx.Response(
            200,
            json={
                "eventStreams": [
                    {"id": "est_Other0000000000000000", "name": "another-stream", "status": "enabled"},
                    {"id": STREAM_ID, "name": "user-sync-relay", "status": "enabled"},
                ],
                "next": None,
            },
        )
    )
    route = auth0.get(DELIVERIES).mock(return_value=httpx.Response(200, json=[]))

    status, out, _ = run(capsys, "deliveries")

    assert status == 0
    assert route.call_count == 1
    assert out.strip() == f"no failed deliveries for event stream {STREAM_ID}"


def test_an_unknown_stream_name_says_how_to_name_the_stream(
    auth0: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    auth0.get(f"{API}/event-streams").mock(return_value=httpx.Response(200, json={"eventStreams": []}))

    status, _, err = run(capsys, "deliveries", "--stream-name", "missing")

    assert status == 1
    assert "no event stream is named 'missing'; pass --stream-id (or set AUTH0_EVENT_STREAM_ID)" in err


def test_redeliver_one_event(
    auth0: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTH0_EVENT_STREAM_ID", STREAM_ID)
    route = auth0.post(f"{API}/event-streams/{STREAM_ID}/redeliver/evt_Aaaaaaaaaaaaaaaaaaaaa1").mock(
        return_value=httpx.Response(202)
    )

    status, out, err = run(capsys, "redeliver", "--event-id", "evt_Aaaaaaaaaaaaaaaaaaaaa1")

    assert status == 0, err
    assert route.calls[0].request.headers["authorization"] == f"Bearer {ACCESS_TOKEN}"
    assert out.strip() == (
        f"Auth0 accepted: event {FIRST['id']} will be delivered again to event stream {STREAM_ID}"
    )


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(202),
        httpx.Response(202, json={"date_from": "2026-05-01T00:00:00Z", "statuses": ["failed"]}),
    ],
    ids=["empty", "echoed-filters"],
)
def test_redeliver_many_by_time_and_type(
    auth0: Any, capsys: pytest.CaptureFixture[str], answer: httpx.Response
) -> None:
    route = auth0.post(f"{API}/event-streams/{STREAM_ID}/redeliver").mock(return_value=answer)

    status, out, err = run(
        capsys,
        "redeliver",
        "--stream-id",
        STREAM_ID,
        "--since",
        "2026-05-01T00:00:00Z",
        "--types",
        "user.created",
    )

    assert status == 0, err
    assert json.loads(route.calls[0].request.content) == {
        "statuses": ["failed"],
        "date_from": "2026-05-01T00:00:00Z",
        "event_types": ["user.created"],
    }
    assert out.strip() == (
        f"Auth0 accepted: the failed deliveries of event stream {STREAM_ID} (from 2026-05-01T00:00:00Z, "
        "of type user.created) will be delivered again"
    )


def test_redeliver_one_event_refused_with_409_is_explained(
    auth0: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    auth0.post(f"{API}/event-streams/{STREAM_ID}/redeliver/evt_Aaaaaaaaaaaaaaaaaaaaa1").mock(
        return_value=httpx.Response(
            409, json={"statusCode": 409, "error": "Conflict", "message": "Cannot redeliver"}
        )
    )

    status, _, err = run(
        capsys, "redeliver", "--stream-id", STREAM_ID, "--event-id", "evt_Aaaaaaaaaaaaaaaaaaaaa1"
    )

    assert status == 1
    assert "relay redeliver: Auth0 cannot redeliver event evt_Aaaaaaaaaaaaaaaaaaaaa1 (409)" in err
    assert "`relay deliveries` lists the failed ones" in err


def test_redeliver_many_refused_with_409_is_explained(auth0: Any, capsys: pytest.CaptureFixture[str]) -> None:
    auth0.post(f"{API}/event-streams/{STREAM_ID}/redeliver").mock(
        return_value=httpx.Response(409, json={"statusCode": 409, "error": "Conflict"})
    )

    status, _, err = run(capsys, "redeliver", "--stream-id", STREAM_ID)

    assert status == 1
    assert "relay redeliver: Auth0 cannot redeliver these events now (409)" in err


def test_a_missing_scope_is_named(auth0: Any, capsys: pytest.CaptureFixture[str]) -> None:
    auth0.post(f"{API}/event-streams/{STREAM_ID}/redeliver").mock(
        return_value=httpx.Response(
            403, json={"statusCode": 403, "error": "Forbidden", "message": "Insufficient scope"}
        )
    )

    status, _, err = run(capsys, "redeliver", "--stream-id", STREAM_ID)

    assert status == 1
    assert "the application needs the scope update:event_deliveries" in err


def test_a_rate_limited_list_waits_then_succeeds(auth0: Any, capsys: pytest.CaptureFixture[str]) -> None:
    auth0.get(DELIVERIES).mock(
        side_effect=[httpx.Response(429, headers={"Retry-After": "0"}), httpx.Response(200, json=[FIRST])]
    )

    status, out, _ = run(capsys, "deliveries", "--stream-id", STREAM_ID)

    assert status == 0
    assert "rate limited by Auth0 while trying to list the event stream's failed deliveries" in out
    assert "1 failed deliveries" in out


def test_an_event_id_cannot_be_combined_with_filters(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_status:
        main(["redeliver", "--event-id", "evt_1", "--since", "2026-05-01"])

    assert exit_status.value.code == 2
    assert "--event-id cannot be combined with --since, --until or --types" in capsys.readouterr().err
