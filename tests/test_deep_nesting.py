"""Issue 10, item 2: a profile nested deeply (~980 levels, and far deeper) through every path.

msgspec's nesting limit is Python's recursion limit less the depth of the call that decodes or encodes, so
the depth at which a body stops being usable differs from one path to the next (on Python 3.11: about 975
levels at the live routes, fewer inside catch-up). Whatever the depth, every path must come to an end it
can answer for: applied as sent, or kept as a dead letter, and never a 500, a crash, a stall, or one event
stopping the others. A profile that some path stored must also stay usable by every later event of its user.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay.auth0.catch_up import catch_up, cursor_stream
from relay.auth0.management import Management
from relay.cli import main
from relay.store import Pool
from tests.support.auth0 import AUTH0_DOMAIN, management_api
from tests.support.database import Database, dead_letters, insert_dead_letter, outcomes_recorded
from tests.support.events import BASE_TIME, cloudevent, encode, export_row, user_event
from tests.support.events_api import CREDENTIALS, EVENTS_URL, message, no_wait, stream_response
from tests.support.http import ROUTES, deliver, relay_command, relay_environment, running_relay

pytestmark = pytest.mark.integration

# The depth issue 10 reported, depths around Python's recursion limit, and depths far beyond it that still
# fit in RELAY_MAX_BODY_BYTES (six bytes a level).
DEPTHS = (980, 1_000, 5_000, 40_000)
STREAM = cursor_stream(AUTH0_DOMAIN)


def nested(depth: int) -> bytes:
    """`{"a":{"a":…1…}}`, `depth` objects deep, as bytes: the standard library cannot encode it."""
    return b'{"a":' * depth + b"1" + b"}" * depth


def with_nested_metadata(event: dict[str, Any], depth: int) -> bytes:
    """`event` encoded with its `user_metadata` replaced by `nested(depth)`."""
    body = encode({**event, "data": {"object": {**event["data"]["object"], "user_metadata": "NESTED"}}})
    assert body.count(b'"NESTED"') == 1
    return body.replace(b'"NESTED"', nested(depth))


def nested_user_event(
    tag: str, depth: int, kind: str = "created", at: int = 0
) -> tuple[dict[str, Any], bytes]:
    """A `user.{kind}` event of `auth0|{tag}` whose user_metadata is nested `depth` deep, and its body."""
    event = cloudevent(
        f"user.{kind}",
        id=f"evt_{tag}",
        user_id=f"auth0|{tag}",
        time=BASE_TIME + timedelta(seconds=at),
        email=f"{tag}@example.com",
    )
    return event, with_nested_metadata(event, depth)


def plain_user_event(tag: str, kind: str = "created", at: int = 0, **fields: Any) -> dict[str, Any]:
    return cloudevent(
        f"user.{kind}",
        id=f"evt_{tag}",
        user_id=f"auth0|{tag}",
        time=BASE_TIME + timedelta(seconds=at),
        email=f"{tag}@example.com",
        **fields,
    )


def stored_metadata_is(database: Database, user_id: str, depth: int) -> bool:
    """Whether the user's user_metadata, and the same field of its profile, are `nested(depth)` exactly
    (compared by PostgreSQL, as jsonb)."""
    [(same,)] = database.query(
        "SELECT user_metadata = %(sent)s::jsonb AND profile -> 'user_metadata' = %(sent)s::jsonb"
        " FROM users WHERE user_id = %(user_id)s",
        {"sent": nested(depth).decode(), "user_id": user_id},
    )
    return bool(same)


# ---------------------------------------------------------------------------------------------------------
# The live routes


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("depth", DEPTHS)
def test_deeply_nested_metadata_on_a_live_route_is_dead_lettered_or_applied_never_a_500(
    client: httpx.Client, clean_database: Database, route: str, depth: int
) -> None:
    event, body = nested_user_event(f"deep{depth}", depth)
    response = deliver(client, route, body, event["id"])

    assert response.status_code == 200, response.text
    [answer] = response.json()["events"]
    user_id = event["data"]["object"]["user_id"]
    if answer["outcome"] == "dead_lettered":
        # Too deep to read at all, the envelope included: the answer cannot name the event.
        assert answer.get("id") in (None, event["id"])
        [letter] = dead_letters(clean_database)
        assert (letter.id, letter.body, letter.error) == (answer["dead_letter_id"], body, answer["error"])
        assert clean_database.query("SELECT count(*) FROM users") == [(0,)]
        assert outcomes_recorded(clean_database) == {}
    else:
        assert answer == {"id": event["id"], "outcome": "applied"}
        assert stored_metadata_is(clean_database, user_id, depth)


@pytest.mark.parametrize("depth", DEPTHS)
def test_a_deeply_nested_event_in_a_webhook_array_is_set_aside_alone(
    client: httpx.Client, clean_database: Database, depth: int
) -> None:
    event, body = nested_user_event(f"deep{depth}", depth)
    before, after = plain_user_event("before"), plain_user_event("after")
    response = deliver(client, "webhook", b"[" + encode(before) + b"," + body + b"," + encode(after) + b"]")

    assert response.status_code == 200, response.text
    first, middle, last = response.json()["events"]
    assert (first, last) == (
        {"id": before["id"], "outcome": "applied"},
        {"id": after["id"], "outcome": "applied"},
    )
    assert middle["outcome"] in ("applied", "dead_lettered"), middle
    assert middle.get("id") in (None, event["id"])
    if middle["outcome"] == "dead_lettered":
        [letter] = dead_letters(clean_database)
        assert letter.body == body  # its own bytes only
    assert clean_database.query(
        "SELECT count(*) FROM users WHERE user_id IN (%s, %s)",
        [before["data"]["object"]["user_id"], after["data"]["object"]["user_id"]],
    ) == [(2,)]


@pytest.mark.parametrize("route", ROUTES)
def test_every_profile_a_live_route_stores_is_merged_again_by_later_events_of_its_user(
    client: httpx.Client, clean_database: Database, route: str
) -> None:
    """Around the depth where the live route stops accepting a profile: each one it stored is read back,
    merged and written again (the nested metadata intact) when a later update of its user arrives."""
    stored = []
    for depth in range(955, 995):
        event, body = nested_user_event(f"sweep{depth}", depth)
        response = deliver(client, route, body, event["id"])
        assert response.status_code == 200, response.text
        [answer] = response.json()["events"]
        assert answer["outcome"] in ("applied", "dead_lettered"), answer
        if answer["outcome"] == "applied":
            stored.append(depth)
    assert stored, "no nested profile was stored at all: the sweep no longer covers the limit"

    for depth in stored:
        later = user_event("updated", f"evt_later{depth}", 60_000, f"auth0|sweep{depth}", name="Later")
        response = deliver(client, route, encode(later), later["id"])
        assert response.json()["events"] == [{"id": later["id"], "outcome": "applied"}], depth
        user_id = f"auth0|sweep{depth}"
        assert clean_database.query("SELECT name FROM users WHERE user_id = %s", [user_id]) == [("Later",)]
        assert stored_metadata_is(clean_database, user_id, depth), depth


# ---------------------------------------------------------------------------------------------------------
# relay catch-up


def catch_up_stream(depth: int) -> tuple[str, list[dict[str, Any]], bytes]:
    """An ordinary event, the nested one, another ordinary event, and a heartbeat to end on."""
    first, last = plain_user_event("first", at=1), plain_user_event("last", at=3)
    _, body = nested_user_event(f"deep{depth}", depth, at=2)
    text = "".join(
        [
            message("b2Zmc2V0LTAx", first),
            message("b2Zmc2V0LTAy", body),
            message("b2Zmc2V0LTAz", last),
            message("b2Zmc2V0LTA0"),
        ]
    )
    return text, [first, last], body


def assert_caught_up_past_the_nested_event(
    database: Database, ordinary: list[dict[str, Any]], depth: int
) -> None:
    assert outcomes_recorded(database) == {event["id"]: "applied" for event in ordinary}
    assert database.query("SELECT count(*) FROM users") == [(2,)]
    [letter] = dead_letters(database)
    assert letter.route == "catch-up"
    assert f"evt_deep{depth}".encode() in letter.body
    assert letter.error
    assert database.query("SELECT stream, cursor FROM event_cursors") == [(STREAM, "b2Zmc2V0LTA0")]


@pytest.mark.anyio
@pytest.mark.parametrize("depth", DEPTHS)
async def test_catch_up_sets_a_deeply_nested_event_aside_and_goes_on(
    pool: Pool, database: Database, depth: int
) -> None:
    text, ordinary, _ = catch_up_stream(depth)
    with management_api() as auth0:
        auth0.get(EVENTS_URL).mock(side_effect=lambda request: stream_response(text, chunk_size=4096))

        report = await catch_up(
            Management(CREDENTIALS),
            pool,
            database.settings,
            since=datetime.fromisoformat("2025-01-01T00:00:00Z"),
            idle_seconds=0.3,
            sleep=no_wait,
        )

    assert (dict(report.outcomes), report.cursor) == ({"applied": 2, "dead_lettered": 1}, "b2Zmc2V0LTA0")
    assert_caught_up_past_the_nested_event(database, ordinary, depth)


def test_the_catch_up_command_ends_normally_past_a_deeply_nested_event(
    relay_env: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    text, ordinary, _ = catch_up_stream(980)
    with management_api() as auth0:
        auth0.get(EVENTS_URL).mock(side_effect=lambda request: stream_response(text, chunk_size=4096))

        status = main(["catch-up", "--since", "2025-01-01T00:00:00Z", "--idle-seconds", "0.3"])

    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "Traceback" not in captured.err
    assert captured.out.strip().startswith(
        "catch-up done: 3 events (2 applied, 0 duplicate, 1 dead-lettered)"
    )
    assert_caught_up_past_the_nested_event(relay_env, ordinary, 980)


# ---------------------------------------------------------------------------------------------------------
# relay dead-letters replay


def test_replaying_every_letter_reports_the_nested_ones_and_resolves_the_letters_after_them(
    database: Database,
) -> None:
    """Oldest first: each nested letter (alone, and inside an array) is followed by an ordinary one, which
    must still be replayed and resolved."""
    letters: dict[int, tuple[str, str | None]] = {}  # id -> (kind, the event an ordinary letter applies)
    for depth in DEPTHS:
        _, body = nested_user_event(f"deep{depth}", depth)
        letters[insert_dead_letter(database, body)] = ("nested", None)
        ordinary = plain_user_event(f"after{depth}")
        letters[insert_dead_letter(database, encode(ordinary))] = ("ordinary", ordinary["id"])
    _, body = nested_user_event("deep_in_array", 980)
    letters[insert_dead_letter(database, b"[" + body + b"]")] = ("nested", None)
    ordinary = plain_user_event("after_array")
    letters[insert_dead_letter(database, encode(ordinary))] = ("ordinary", ordinary["id"])

    replayed = relay_command(database, "dead-letters", "replay")

    assert "Traceback" not in replayed.stderr, replayed.stderr
    lines = {
        int(line.split(":")[0].removeprefix("dead letter ")): line
        for line in replayed.stdout.splitlines()
        if line.startswith("dead letter ")
    }
    assert sorted(lines) == sorted(letters), replayed.stdout
    stored = {letter.id: letter for letter in dead_letters(database)}
    for letter_id, (kind, event_id) in letters.items():
        if kind == "ordinary":
            assert lines[letter_id] == f"dead letter {letter_id}: resolved: {event_id} applied"
            assert stored[letter_id].resolved
        else:
            assert lines[letter_id].startswith(f"dead letter {letter_id}: failing: "), lines[letter_id]
            assert len(lines[letter_id]) > len(f"dead letter {letter_id}: failing: ")
            assert not stored[letter_id].resolved
            assert stored[letter_id].error != "an older relay version could not decode this"
    applied = [event_id for kind, event_id in letters.values() if kind == "ordinary"]
    assert outcomes_recorded(database) == dict.fromkeys(applied, "applied")


def test_replaying_a_nested_letter_by_id_reports_it_and_goes_on_to_the_next_id(database: Database) -> None:
    _, body = nested_user_event("deep", 980)
    nested_id = insert_dead_letter(database, body)
    ordinary = plain_user_event("ordinary")
    ordinary_id = insert_dead_letter(database, encode(ordinary))

    replayed = relay_command(database, "dead-letters", "replay", str(nested_id), str(ordinary_id))

    assert "Traceback" not in replayed.stderr, replayed.stderr
    lines = replayed.stdout.splitlines()
    assert lines[0].startswith(f"dead letter {nested_id}: failing: ")
    assert lines[1] == f"dead letter {ordinary_id}: resolved: {ordinary['id']} applied"
    assert outcomes_recorded(database) == {ordinary["id"]: "applied"}


# ---------------------------------------------------------------------------------------------------------
# A profile the backfill stored, read back by live events


def assert_each_takes_a_live_update(database: Database, depths: dict[str, int]) -> None:
    """Each user (user_id -> how deep its user_metadata nests) takes a newer partial update on a live route:
    its stored profile is read back, merged and written again, the nested metadata intact."""
    env = relay_environment(database.conninfo, database.schema)
    with running_relay(env) as relay, relay.client() as client:
        for number, user_id in enumerate(sorted(depths)):
            later = user_event("updated", f"evt_live{number:04d}", NEWEST, user_id, name="Live")
            response = deliver(client, "webhook", encode(later))
            assert response.json()["events"] == [{"id": later["id"], "outcome": "applied"}], user_id
    for user_id, depth in depths.items():
        assert database.query("SELECT name FROM users WHERE user_id = %s", [user_id]) == [("Live",)]
        assert stored_metadata_is(database, user_id, depth), user_id


# Later than every event and export row these tests make.
NEWEST = BASE_TIME + timedelta(days=400)


def test_every_user_the_backfill_stores_can_still_take_live_events(
    database: Database, tmp_path: Path
) -> None:
    """The backfill checks a row in a shallow call and writes it in SQL without decoding it again, so it must
    not store a profile nested deeper than the live relay can read back: that user could never be updated
    again (each of its events would be set aside)."""
    rows, depths = [], {}
    for depth in [1, 100, 500, 511, 512, 600, 900, *range(940, 1_002, 2)]:
        user_id = f"auth0|backfilled{depth}"
        depths[user_id] = depth
        row = export_row(user_id, BASE_TIME, user_metadata="NESTED")
        rows.append(encode(row).replace(b'"NESTED"', nested(depth)))
    export = tmp_path / "users.json"
    export.write_bytes(b"\n".join(rows) + b"\n")

    loaded = relay_command(database, "backfill", "--file", str(export))
    assert loaded.returncode == 0, loaded.stderr
    stored = [user_id for (user_id,) in database.query("SELECT user_id FROM users")]
    assert stored, "the backfill stored none of the rows"
    rejected = dead_letters(database)
    assert len(stored) + len(rejected) == len(rows)
    for letter in rejected:
        assert "nested" in letter.error, letter.error

    assert_each_takes_a_live_update(database, {user_id: depths[user_id] for user_id in stored})


def test_every_user_a_replay_stores_can_still_take_live_events(database: Database) -> None:
    """Replay decodes and writes in a process of its own, at call depths of its own: what it stores must
    still be readable where the live relay merges users."""
    depths = {}
    for depth in range(955, 995):
        event, body = nested_user_event(f"replayed{depth}", depth)
        depths[event["data"]["object"]["user_id"]] = depth
        insert_dead_letter(database, body)

    replayed = relay_command(database, "dead-letters", "replay")
    assert "Traceback" not in replayed.stderr, replayed.stderr
    stored = [user_id for (user_id,) in database.query("SELECT user_id FROM users")]
    assert stored, "the replay stored none of the letters"

    assert_each_takes_a_live_update(database, {user_id: depths[user_id] for user_id in stored})
