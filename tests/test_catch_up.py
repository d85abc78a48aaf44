"""`relay catch-up`: the Events API played by respx as a real server-sent event stream, delivered in chunks
that split lines, applied to real PostgreSQL through the same handlers as live traffic, and held to the same
allow-lists: an event from another tenant or stream is passed over, never stored."""

from __future__ import annotations

import asyncio
import io
import json
from datetime import datetime
from typing import Any

import httpx
import pytest

from relay.auth0.catch_up import catch_up, cursor_stream
from relay.auth0.management import Management
from relay.cli import main
from relay.cli.progress import StatusLine
from relay.events import decode_body
from relay.operations import Replayed, replay_dead_letters
from relay.pipeline import Delivery
from tests.support.auth0 import ACCESS_TOKEN, AUTH0_DOMAIN, management_api
from tests.support.database import NOTHING_STORED, Database, dead_letters, row_counts
from tests.support.events import cloudevent, encode, fixture
from tests.support.events_api import CREDENTIALS, EVENTS_URL, message, no_wait, stream_response

USER_ID = "auth0|679fb1b1e809445f129bc18d"
STREAM = cursor_stream(AUTH0_DOMAIN)
EXPIRED_MESSAGE = "the stored cursor has expired: run `relay backfill`, then `relay catch-up --since <time>`"
SINCE = datetime.fromisoformat("2025-02-01T00:00:00Z")
TENANT, EVENT_STREAM = "acme", "est_38ANnv8pQhqsZrX2VFbftv"  # the fixtures' a0tenant and a0stream


def undecodable_update() -> dict[str, Any]:
    return cloudevent("user.updated", id="evt_Undecodable0000000001", user_id=...)


async def run_catch_up(pool: Any, database: Database, **options: Any) -> tuple[Any, str]:
    progress = io.StringIO()
    report = await catch_up(
        Management(CREDENTIALS),
        pool,
        database.settings,
        idle_seconds=0.3,
        progress=StatusLine(progress).show,
        sleep=no_wait,
        **options,
    )
    return report, progress.getvalue()


@pytest.mark.anyio
async def test_events_streamed_in_chunks_are_applied_and_the_cursor_stored_then_resumed(
    pool: Any, pipeline: Any, database: Database
) -> None:
    created, updated, deleted = (
        fixture("user.created"),
        fixture("user.updated"),
        fixture("user.deleted.minimal"),
    )
    # Received live before the outage: the Events API replays it, and the ledger knows it.
    [live] = await pipeline.commit([Delivery("action", decode_body(encode(created)))])
    assert [result.outcome for result in live] == ["applied"]
    first_run = "".join(
        [
            message("b2Zmc2V0LTAx", created),
            message("b2Zmc2V0LTAy"),
            message("b2Zmc2V0LTAz", updated),
            message("b2Zmc2V0LTA0", undecodable_update()),
            message("b2Zmc2V0LTA1", deleted),
            ": heartbeat\n\n",
            message("b2Zmc2V0LTA2"),  # offset-only after the last event: the cursor moves on
        ]
    )
    with management_api() as auth0:
        route = auth0.get(EVENTS_URL).mock(side_effect=lambda request: stream_response(first_run))

        report, progress = await run_catch_up(
            pool, database, since=datetime.fromisoformat("2025-02-01T00:00:00Z"), batch_max_events=2
        )

    request = route.calls[0].request
    assert request.url.params.get_list("event_type") == ["user.created", "user.updated", "user.deleted"]
    assert request.url.params["from_timestamp"] == "2025-02-01T00:00:00Z"
    assert "from" not in request.url.params
    assert request.headers["authorization"] == f"Bearer {ACCESS_TOKEN}"
    assert request.headers["accept"] == "text/event-stream"

    assert report.received == 4
    assert dict(report.outcomes) == {"duplicate": 1, "applied": 1, "dead_lettered": 1, "tombstoned": 1}
    assert report.cursor == "b2Zmc2V0LTA2"
    assert database.query("SELECT stream, cursor FROM event_cursors") == [(STREAM, "b2Zmc2V0LTA2")]
    assert database.query(
        "SELECT email, deleted_at IS NOT NULL FROM users WHERE user_id = %s", [USER_ID]
    ) == [("Jane.Doe@Example.com", True)]
    assert database.query("SELECT event_id, outcome FROM processed_events ORDER BY event_time") == [
        (created["id"], "applied"),
        (updated["id"], "applied"),
        (deleted["id"], "tombstoned"),
    ]
    [(route_name, body, error)] = database.query("SELECT route, body, error FROM dead_letters")
    assert (route_name, json.loads(body)) == ("catch-up", undecodable_update())
    assert error == "user.updated data.object is not an Auth0 user: Object missing required field `user_id`"
    # Batches of two commit one after the other, each storing the cursor it reached.
    assert "catch-up: 2 events (1 applied, 1 duplicate); cursor b2Zmc2V0LTAz" in progress
    assert progress.rstrip().endswith("cursor b2Zmc2V0LTA2")

    # The next run goes on from the stored cursor, and Auth0's replay of an event it had sent is a duplicate.
    second_run = message("b2Zmc2V0LTA1", deleted) + message("b2Zmc2V0LTA3")
    with management_api() as auth0:
        route = auth0.get(EVENTS_URL).mock(side_effect=lambda request: stream_response(second_run))

        report, _ = await run_catch_up(pool, database)

    assert route.calls[0].request.url.params["from"] == "b2Zmc2V0LTA2"
    assert "from_timestamp" not in route.calls[0].request.url.params
    assert (report.received, dict(report.outcomes), report.cursor) == (1, {"duplicate": 1}, "b2Zmc2V0LTA3")
    assert database.query("SELECT cursor FROM event_cursors") == [("b2Zmc2V0LTA3",)]


def test_the_command_catches_up_then_stops_when_idle(
    relay_env: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    created, updated = fixture("user.created"), fixture("user.updated")
    body = message("MTAx", created) + message("MTAy", updated) + message("MTAz")
    with management_api() as auth0:
        auth0.get(EVENTS_URL).mock(side_effect=lambda request: stream_response(body))

        status = main(["catch-up", "--since", "2025-02-01T00:00:00Z", "--idle-seconds", "0.3"])

    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert captured.out.strip() == "catch-up done: 2 events (2 applied, 0 duplicate); cursor MTAz"
    assert "catch-up: 2 events (2 applied, 0 duplicate); cursor MTAz" in captured.err
    assert relay_env.query("SELECT email FROM live_users") == [("Jane.Doe@Example.com",)]
    assert relay_env.query("SELECT cursor FROM event_cursors") == [("MTAz",)]


def test_without_a_stored_cursor_the_command_asks_for_since(
    relay_env: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    with management_api():
        status = main(["catch-up"])

    assert status == 1
    assert "relay catch-up: no stored cursor yet: pass --since <time>" in capsys.readouterr().err


def test_an_expired_cursor_tells_the_operator_to_backfill(
    relay_env: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    relay_env.query(
        "INSERT INTO event_cursors (stream, cursor) VALUES (%s, %s)", [STREAM, "c3RhbGUtY3Vyc29y"]
    )
    with management_api() as auth0:
        route = auth0.get(EVENTS_URL).mock(
            return_value=httpx.Response(410, json={"statusCode": 410, "message": "The offset has expired"})
        )

        status = main(["catch-up", "--idle-seconds", "0.3"])

    assert status == 1
    assert route.calls[0].request.url.params["from"] == "c3RhbGUtY3Vyc29y"
    assert f"relay catch-up: {EXPIRED_MESSAGE}" in capsys.readouterr().err
    assert relay_env.query("SELECT cursor FROM event_cursors") == [("c3RhbGUtY3Vyc29y",)]


@pytest.mark.anyio
async def test_a_cursor_expired_error_message_in_the_stream_is_the_same_advice(
    pool: Any, database: Database
) -> None:
    database.query("INSERT INTO event_cursors (stream, cursor) VALUES (%s, %s)", [STREAM, "b2xk"])
    error = {"error": {"code": "cursor_expired", "message": "offset is too old"}}
    body = f"event: error\ndata: {json.dumps(error)}\n\n"
    with management_api() as auth0:
        auth0.get(EVENTS_URL).mock(side_effect=lambda request: stream_response(body, stay_open=False))

        with pytest.raises(
            Exception, match="the stored cursor has expired \\(cursor_expired: offset is too old\\)"
        ):
            await run_catch_up(pool, database)


@pytest.mark.anyio
async def test_rate_limited_connection_waits_for_retry_after_then_streams(
    pool: Any, database: Database
) -> None:
    waits: list[float] = []

    async def recording_sleep(seconds: float) -> None:
        waits.append(seconds)
        await asyncio.sleep(0)

    body = message("MQ", fixture("user.created")) + message("Mg")
    with management_api() as auth0:
        route = auth0.get(EVENTS_URL).mock(
            side_effect=[
                httpx.Response(429, headers={"Retry-After": "7"}, json={"message": "Too Many Requests"}),
                stream_response(body),
            ]
        )
        report = await catch_up(
            Management(CREDENTIALS),
            pool,
            database.settings,
            since=datetime.fromisoformat("2025-02-01T00:00:00+00:00"),
            idle_seconds=0.3,
            progress=StatusLine(io.StringIO()).show,
            sleep=recording_sleep,
        )

    assert route.call_count == 2
    assert waits == [7.0]
    assert (dict(report.outcomes), report.cursor) == ({"applied": 1}, "Mg")
    assert database.query("SELECT count(*) FROM live_users") == [(1,)]


@pytest.mark.anyio
async def test_a_stream_closed_by_auth0_is_reopened_from_the_last_offset(
    pool: Any, database: Database
) -> None:
    """Auth0 closes connections every few minutes to balance load; the reader goes on where it was."""
    created, updated = fixture("user.created"), fixture("user.updated")
    bodies = {
        None: (message("Zmlyc3Q", created) + message("c2Vjb25k"), False),
        "c2Vjb25k": (message("dGhpcmQ", updated), True),
    }

    def answer(request: httpx.Request) -> httpx.Response:
        text, stay_open = bodies[request.url.params.get("from")]
        return stream_response(text, stay_open=stay_open)

    with management_api() as auth0:
        route = auth0.get(EVENTS_URL).mock(side_effect=answer)

        report, _ = await run_catch_up(
            pool, database, since=datetime.fromisoformat("2025-02-01T00:00:00+00:00")
        )

    assert [call.request.url.params.get("from") for call in route.calls] == [None, "c2Vjb25k"]
    assert (dict(report.outcomes), report.cursor) == ({"applied": 2}, "dGhpcmQ")
    assert database.query("SELECT email FROM users") == [("Jane.Doe@Example.com",)]


def test_a_refused_token_scope_names_read_events(relay_env: Any, capsys: pytest.CaptureFixture[str]) -> None:
    with management_api() as auth0:
        auth0.get(EVENTS_URL).mock(
            return_value=httpx.Response(
                403, json={"statusCode": 403, "error": "Forbidden", "message": "Insufficient scope"}
            )
        )

        status = main(["catch-up", "--since", "2025-02-01T00:00:00Z", "--idle-seconds", "0.3"])

    assert status == 1
    err = capsys.readouterr().err
    assert "Auth0 refused to read the Events API (403 Forbidden: Insufficient scope)" in err
    assert "read:events" in err


# ---------------------------------------------------------------------------------------------------------
# Messages that hold no event


@pytest.mark.anyio
async def test_a_message_whose_offset_is_not_a_string_still_gives_up_its_event(
    pool: Any, database: Database
) -> None:
    """Each member of a message is read on its own: an offset of an unexpected type costs the offset only."""
    created = fixture("user.created")
    data = json.dumps({"offset": 17, "event": created})
    body = f"event: user.created\nid: MQ\ndata: {data}\n\n" + message("Mg")
    with management_api() as auth0:
        auth0.get(EVENTS_URL).mock(side_effect=lambda request: stream_response(body))

        report, _ = await run_catch_up(pool, database, since=SINCE)

    assert (dict(report.outcomes), report.cursor) == ({"applied": 1}, "Mg")
    assert database.query("SELECT email FROM live_users") == [(created["data"]["object"]["email"],)]
    assert dead_letters(database) == []


NO_EVENT_MESSAGES = {
    "no event member": (
        json.dumps({"offset": "MQ"}),
        "Events API 'user.created' message has no event",
        "the Events API message has no event",
    ),
    "an event that is not an object": (
        json.dumps({"offset": "MQ", "event": ["user.created"]}),
        "Events API 'user.created' message holds an event that is not a JSON object",
        "the Events API message holds an event that is not a JSON object",
    ),
    "data that is not JSON": (
        '{"offset": "MQ", "event": {"id": "evt_cut_short',
        "Events API 'user.created' message could not be read: Input data was truncated",
        "the letter could not be read: Input data was truncated",
    ),
}


@pytest.mark.anyio
@pytest.mark.parametrize("case", sorted(NO_EVENT_MESSAGES))
async def test_a_message_holding_no_event_is_kept_and_its_replay_reports_it_not_replayable(
    pool: Any, database: Database, case: str
) -> None:
    data, error, why = NO_EVENT_MESSAGES[case]
    body = f"event: user.created\nid: MQ\ndata: {data}\n\n" + message("Mg", fixture("user.created"))
    with management_api() as auth0:
        auth0.get(EVENTS_URL).mock(side_effect=lambda request: stream_response(body))

        report, _ = await run_catch_up(pool, database, since=SINCE)

    assert (dict(report.outcomes), report.cursor) == ({"dead_lettered": 1, "applied": 1}, "Mg")
    [letter] = dead_letters(database)
    assert (letter.route, letter.body, letter.error, letter.resolved) == (
        "catch-up",
        data.encode(),
        error,
        False,
    )

    replays = [replayed async for replayed in replay_dead_letters(pool, [], database.settings)]

    assert replays == [Replayed(letter.id, "not replayable", why)]
    assert dead_letters(database) == [letter]  # left exactly as it was, for a person to read and resolve


# ---------------------------------------------------------------------------------------------------------
# The allow-lists


def other_tenant_event(number: int, **changes: Any) -> dict[str, Any]:
    """A user.created of tenant `acme-dev`; `changes` as `cloudevent()` takes them."""
    fields = {"user_id": f"auth0|dev-{number}", "email": f"dev{number}@acme-dev.example", **changes}
    return cloudevent("user.created", id=f"evt_OtherTenant{number:011d}", a0tenant="acme-dev", **fields)


@pytest.mark.anyio
async def test_events_from_outside_the_allow_lists_are_passed_over_counted_and_never_stored(
    pool: Any, database: Database
) -> None:
    created, updated = fixture("user.created"), fixture("user.updated")
    other_stream = cloudevent(
        "user.created",
        id="evt_OtherStream0000000001",
        user_id="auth0|s-1",
        a0stream="est_0therStream0000000000",
    )
    no_tenant = cloudevent("user.created", id="evt_NoTenant000000000001", user_id="auth0|n-1", a0tenant=...)
    # Undecodable: had it been ours, it would be a dead letter; another tenant's, it is not kept at all.
    broken = other_tenant_event(3, user_id=...)
    stream = "".join(
        [
            message("MDE", created),
            message("MDI", other_tenant_event(1)),
            message("MDM", other_tenant_event(2)),
            message("MDQ", other_stream),
            message("MDU", updated),
            message("MDY", broken),
            message("MDc", no_tenant),
            message("MDg"),
        ]
    )
    settings = database.with_settings(
        allowed_tenants=frozenset({TENANT}), allowed_streams=frozenset({EVENT_STREAM})
    )
    with management_api() as auth0:
        auth0.get(EVENTS_URL).mock(side_effect=lambda request: stream_response(stream))

        report = await catch_up(
            Management(CREDENTIALS),
            pool,
            settings,
            since=SINCE,
            idle_seconds=0.3,
            sleep=no_wait,
            batch_max_events=1,
        )

    assert (report.received, dict(report.outcomes)) == (2, {"applied": 2})
    assert dict(report.refused) == {"not in RELAY_ALLOWED_TENANTS": 4, "not in RELAY_ALLOWED_STREAMS": 1}
    assert report.describe() == (
        "2 events (2 applied, 0 duplicate); 5 refused (4 not in RELAY_ALLOWED_TENANTS, "
        "1 not in RELAY_ALLOWED_STREAMS); cursor MDg"
    )
    assert database.query("SELECT user_id, email FROM users") == [(USER_ID, "Jane.Doe@Example.com")]
    assert database.query("SELECT event_id FROM processed_events ORDER BY event_time") == [
        (created["id"],),
        (updated["id"],),
    ]
    assert row_counts(database) == {"users": 1, "processed_events": 2, "dead_letters": 0}
    assert database.query("SELECT cursor FROM event_cursors") == [("MDg",)]


def test_the_command_refuses_another_tenants_events_and_goes_on_past_them(
    relay_env: Database, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RELAY_ALLOWED_TENANTS", TENANT)
    only_theirs = message("MQ", other_tenant_event(1)) + message("Mg", other_tenant_event(2))
    with management_api() as auth0:
        auth0.get(EVENTS_URL).mock(side_effect=lambda request: stream_response(only_theirs))

        status = main(["catch-up", "--since", "2025-02-01T00:00:00Z", "--idle-seconds", "0.3"])

    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert captured.out.strip() == (
        "catch-up done: 0 events (0 applied, 0 duplicate); 2 refused (not in RELAY_ALLOWED_TENANTS); "
        "cursor Mg"
    )
    assert row_counts(relay_env) == NOTHING_STORED
    assert relay_env.query("SELECT cursor FROM event_cursors") == [("Mg",)]

    # The next run reads on from past them, and applies what is ours.
    ours = message("Mw", fixture("user.created")) + message("NA")
    with management_api() as auth0:
        route = auth0.get(EVENTS_URL).mock(side_effect=lambda request: stream_response(ours))

        status = main(["catch-up", "--idle-seconds", "0.3"])

    assert status == 0, capsys.readouterr().err
    assert route.calls[0].request.url.params["from"] == "Mg"
    assert capsys.readouterr().out.strip() == "catch-up done: 1 events (1 applied, 0 duplicate); cursor NA"
    assert relay_env.query("SELECT user_id FROM users") == [(USER_ID,)]


@pytest.mark.anyio
async def test_events_of_a_tenant_other_than_the_schemas_are_refused_like_the_allow_lists(
    pool: Any, database: Database
) -> None:
    """The schema holds the tenant that delivered first (pinned by the live relay before the outage);
    catch-up passes over another tenant's events as the live routes refuse them, with no allow-list set."""
    database.query("INSERT INTO tenant (name) VALUES (%s)", [TENANT])
    stream = message("MQ", other_tenant_event(1)) + message("Mg", fixture("user.created")) + message("Mw")
    with management_api() as auth0:
        auth0.get(EVENTS_URL).mock(side_effect=lambda request: stream_response(stream))

        report, _ = await run_catch_up(pool, database, since=SINCE)

    assert report.describe() == (
        "1 events (1 applied, 0 duplicate); 1 refused (of a tenant other than the schema's); cursor Mw"
    )
    assert database.query("SELECT user_id FROM users") == [(USER_ID,)]
    assert row_counts(database) == {"users": 1, "processed_events": 1, "dead_letters": 0}
    assert database.query("SELECT name FROM tenant") == [(TENANT,)]


@pytest.mark.anyio
async def test_the_first_tenant_catch_up_reads_is_pinned_when_none_is(pool: Any, database: Database) -> None:
    stream = message("MQ", fixture("user.created")) + message("Mg", other_tenant_event(1)) + message("Mw")
    with management_api() as auth0:
        auth0.get(EVENTS_URL).mock(side_effect=lambda request: stream_response(stream))

        report, _ = await run_catch_up(pool, database, since=SINCE)

    assert (dict(report.outcomes), dict(report.refused)) == (
        {"applied": 1},
        {"of a tenant other than the schema's": 1},
    )
    assert database.query("SELECT name FROM tenant") == [(TENANT,)]
