"""Operator commands on the stored data: `relay dead-letters list | show | replay | resolve` and
`relay prune`, run as real processes against real PostgreSQL, as an operator runs them.

Dead letters are made the way the relay makes them (`Pipeline.commit` of an unusable body), or inserted as an
older relay version would have left them: a body the current decoder reads fine, which is what replay is for.
Each route's letters hold their own kind of body: an event body (`action`, `webhook`, `catch-up`), an export
row (`backfill`), or the data of an Events API message that held no event (`catch-up`, not replayable).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

import pytest

from relay.backfill import load_export
from relay.cli import main
from relay.events import decode_body
from relay.operations import Replayed, replay_dead_letters
from relay.pipeline import Delivery, EventResult, Pipeline
from relay.store import Pool, open_pool
from tests.support.database import (
    Database,
    assert_stored_as_sent,
    dead_letter,
    dead_letters,
    insert_dead_letter,
    migrated_schema,
    row_counts,
    user_row,
)
from tests.support.events import (
    BASE_TIME,
    NUMBER_POSTGRESQL_REFUSES,
    REFUSED_NUMBER_ERROR,
    cloudevent,
    encode,
    export_row,
    fixture,
    user_event,
)
from tests.support.http import relay_command

T = TypeVar("T")

pytestmark = pytest.mark.integration

OLD_ERROR = "an older relay version could not decode this"


def numbered(number: int, kind: str = "created", **fields: Any) -> dict[str, Any]:
    """The `user.{kind}` fixture, made the event of user `auth0|ops-{number}`."""
    return cloudevent(
        f"user.{kind}", id=f"evt_ops{kind[0]}{number:018d}", user_id=f"auth0|ops-{number}", **fields
    )


async def commit(pipeline: Pipeline, body: bytes, route: str = "webhook") -> list[EventResult]:
    """The relay's own path from a body to committed outcomes, without HTTP."""
    headers = {"content-type": "application/json"}
    [results] = await pipeline.commit([Delivery(route, decode_body(body), headers)])
    return results


def letter_rows(database: Database) -> list[tuple[int, bytes, str, bool]]:
    return [(letter.id, letter.body, letter.error, letter.resolved) for letter in dead_letters(database)]


# ---------------------------------------------------------------------------------------------------------
# Replay


def test_replay_applies_a_body_the_current_decoder_reads_and_resolves_it(database: Database) -> None:
    event = fixture("user.created")
    letter_id = insert_dead_letter(database, encode(event))

    replayed = relay_command(database, "dead-letters", "replay")

    assert replayed.returncode == 0, replayed.stderr
    assert f"dead letter {letter_id}: resolved: {event['id']} applied" in replayed.stdout
    assert_stored_as_sent(database, event)
    assert database.query("SELECT event_id, outcome FROM processed_events") == [(event["id"], "applied")]
    assert letter_rows(database) == [(letter_id, encode(event), OLD_ERROR, True)]


@pytest.mark.anyio
async def test_replay_resolves_the_letter_in_the_transaction_that_applies_its_events(
    pool: Pool, database: Database
) -> None:
    """Both rows carry the same `now()`: PostgreSQL's time of the one transaction that wrote them both."""
    event = fixture("user.created")
    letter_id = insert_dead_letter(database, encode(event))

    replays = [replayed async for replayed in replay_dead_letters(pool, [letter_id], database.settings)]

    assert replays == [Replayed(letter_id, "resolved", f"{event['id']} applied")]
    [(resolved_at, received_at)] = database.query(
        "SELECT resolved_at, (SELECT received_at FROM processed_events WHERE event_id = %s)"
        " FROM dead_letters WHERE id = %s",
        [event["id"], letter_id],
    )
    assert resolved_at is not None
    assert resolved_at == received_at
    assert_stored_as_sent(database, event)


STILL_FAILING = {
    "undecodable": (
        b'{"id": "evt_broken", "type": "user.created", "time": "not a time"}',
        "not a CloudEvent: Invalid RFC3339 encoded datetime - at `$.time`",
    ),
    "refused by PostgreSQL": (
        encode(numbered(1, user_metadata={"size": NUMBER_POSTGRESQL_REFUSES})),
        f"PostgreSQL refused the event: {REFUSED_NUMBER_ERROR}",
    ),
}


@pytest.mark.anyio
@pytest.mark.parametrize("case", sorted(STILL_FAILING))
async def test_replay_that_still_fails_records_the_new_error_on_the_same_letter_and_keeps_no_copy(
    pipeline: Pipeline, pool: Pool, database: Database, case: str
) -> None:
    body, error = STILL_FAILING[case]
    [result] = await commit(pipeline, body)
    assert (result.outcome, result.error) == ("dead_lettered", error)
    database.query("UPDATE dead_letters SET error = %s", [OLD_ERROR])

    for _ in range(2):
        replays = [replayed async for replayed in replay_dead_letters(pool, [], database.settings)]
        assert replays == [Replayed(result.dead_letter_id, "failing", error)]
        assert letter_rows(database) == [(result.dead_letter_id, body, error, False)]
        assert row_counts(database) == {"users": 0, "processed_events": 0, "dead_letters": 1}


def test_replay_that_still_fails_exits_1_and_says_why(database: Database) -> None:
    body, error = STILL_FAILING["refused by PostgreSQL"]
    letter_id = insert_dead_letter(database, body)

    replayed = relay_command(database, "dead-letters", "replay", str(letter_id))

    assert replayed.returncode == 1
    assert replayed.stdout.splitlines() == [
        f"dead letter {letter_id}: failing: {error}",
        "replayed: 1 failing",
    ]
    assert letter_rows(database) == [(letter_id, body, error, False)]


@pytest.mark.anyio
async def test_replay_of_an_event_already_applied_is_a_duplicate_and_resolves(
    pipeline: Pipeline, database: Database
) -> None:
    event, newer = fixture("user.created"), fixture("user.updated")
    assert [result.outcome for result in await commit(pipeline, encode(event))] == ["applied"]
    assert [result.outcome for result in await commit(pipeline, encode(newer))] == ["applied"]
    letter_id = insert_dead_letter(database, encode(event))

    replayed = relay_command(database, "dead-letters", "replay", str(letter_id))

    assert replayed.returncode == 0, replayed.stderr
    assert f"dead letter {letter_id}: resolved: {event['id']} duplicate" in replayed.stdout
    assert_stored_as_sent(database, newer)
    assert letter_rows(database) == [(letter_id, encode(event), OLD_ERROR, True)]


def test_replay_of_an_array_applies_what_it_can_and_keeps_the_rest_unresolved(database: Database) -> None:
    good = numbered(1)
    bad = {"id": "evt_no_time", "type": "user.updated", "data": {"object": {"user_id": "auth0|x"}}}
    letter_id = insert_dead_letter(database, encode([good, bad]))

    first = relay_command(database, "dead-letters", "replay")
    second = relay_command(database, "dead-letters", "replay")

    assert (first.returncode, second.returncode) == (1, 1)
    assert_stored_as_sent(database, good)
    assert database.query("SELECT event_id FROM processed_events") == [(good["id"],)]
    assert letter_rows(database) == [
        (letter_id, encode([good, bad]), "not a CloudEvent: Object missing required field `time`", False)
    ]


def test_replay_without_ids_takes_every_unresolved_dead_letter_once_and_no_resolved_one(
    database: Database,
) -> None:
    # More than one page of unresolved dead letters, with resolved ones in between that must stay untouched.
    unresolved, resolved = [], []
    for number in range(230):
        event = numbered(number)
        if number % 10 == 3:
            resolved.append(event)
            insert_dead_letter(database, encode(event), resolved_ago=timedelta(hours=1))
        else:
            unresolved.append(event)
            insert_dead_letter(database, encode(event))

    replayed = relay_command(database, "dead-letters", "replay")

    assert replayed.returncode == 0, replayed.stderr
    assert f"replayed: {len(unresolved)} resolved" in replayed.stdout
    ledger = database.query("SELECT event_id, outcome FROM processed_events")
    assert sorted(ledger) == sorted((event["id"], "applied") for event in unresolved)
    assert database.query("SELECT count(*) FROM dead_letters WHERE resolved_at IS NULL") == [(0,)]
    assert row_counts(database) == {
        "users": len(unresolved),
        "processed_events": len(unresolved),
        "dead_letters": 230,
    }


def test_replay_names_an_unknown_or_already_resolved_id_and_applies_neither(database: Database) -> None:
    event = fixture("user.created")
    resolved_id = insert_dead_letter(database, encode(event), resolved_ago=timedelta(minutes=5))

    replayed = relay_command(database, "dead-letters", "replay", str(resolved_id), "999999")

    assert replayed.returncode == 1
    assert f"dead letter {resolved_id}: already resolved" in replayed.stdout
    assert "dead letter 999999: not found" in replayed.stdout
    assert row_counts(database) == {"users": 0, "processed_events": 0, "dead_letters": 1}


def test_replay_with_nothing_unresolved_says_so(database: Database) -> None:
    replayed = relay_command(database, "dead-letters", "replay")
    assert (replayed.returncode, replayed.stdout.strip()) == (0, "no unresolved dead letters")


# ---------------------------------------------------------------------------------------------------------
# Replay of every kind of letter: event bodies, export rows, Events API messages


def with_pool(database: Database, work: Callable[[Pool], Awaitable[T]]) -> T:
    """`work` on the relay's own pool for `database`, from a test that is not itself async."""

    async def run() -> T:
        async with open_pool(database.conninfo, database.settings) as pool:
            return await work(pool)

    return asyncio.run(run())


def apply_live(database: Database, *events: dict[str, Any]) -> list[str]:
    """Events committed one by one through the pipeline, as live deliveries; their outcomes."""

    async def work(pool: Pool) -> list[str]:
        pipeline = Pipeline(pool, database.settings)
        return [result.outcome.value for event in events for result in await commit(pipeline, encode(event))]

    return with_pool(database, work)


ROW_USER = "auth0|ops-row"
ROW_TIME = BASE_TIME + timedelta(hours=1)
# A user's history before the export row (updated at ROW_TIME) is replayed, and what the row then does.
ROW_HISTORIES: dict[str, tuple[list[dict[str, Any]], str]] = {
    "a user the copy does not have": ([], "inserted"),
    "a user last changed before the row": (
        [user_event("created", "evt_row_created", BASE_TIME, **export_row(ROW_USER, BASE_TIME))],
        "merged",
    ),
    "a user renamed after the row": (
        [
            user_event("created", "evt_row_created", BASE_TIME, **export_row(ROW_USER, BASE_TIME)),
            user_event("updated", "evt_row_renamed", ROW_TIME + timedelta(hours=1), ROW_USER, name="Live"),
        ],
        "stale",
    ),
    "a user deleted before the row": (
        [
            user_event("created", "evt_row_created", BASE_TIME, **export_row(ROW_USER, BASE_TIME)),
            user_event("deleted", "evt_row_deleted", ROW_TIME - timedelta(minutes=1), ROW_USER),
        ],
        "merged",
    ),
    "a user deleted after the row": (
        [user_event("deleted", "evt_row_deleted", ROW_TIME + timedelta(minutes=1), ROW_USER)],
        "stale",
    ),
}


@pytest.mark.parametrize("history", sorted(ROW_HISTORIES))
def test_a_backfill_letter_is_replayed_by_the_backfills_own_rules_and_resolved(
    database_server: str, database: Database, history: str
) -> None:
    """The user ends exactly as `relay backfill` loading the same row leaves it (compared on a schema of its
    own), so a replayed row never overwrites anything newer and never revives a deleted user."""
    events, outcome = ROW_HISTORIES[history]
    line = encode(export_row(ROW_USER, ROW_TIME, nickname="from the export"))
    with migrated_schema(database_server) as loaded:
        apply_live(loaded, *events)
        with_pool(loaded, lambda pool: load_export(pool, iter([line]), "soft"))
        expected = user_row(loaded, ROW_USER)
    apply_live(database, *events)
    letter_id = insert_dead_letter(database, line, route="backfill", error=OLD_ERROR)

    replayed = relay_command(database, "dead-letters", "replay")

    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.splitlines() == [
        f"dead letter {letter_id}: resolved: export row of {ROW_USER} {outcome}",
        "replayed: 1 resolved",
    ]
    assert user_row(database, ROW_USER) == expected
    assert letter_rows(database) == [(letter_id, line, OLD_ERROR, True)]
    stored = database.query("SELECT name, nickname, deleted_at IS NOT NULL FROM users")
    if "renamed" in history:
        assert stored == [("Live", "from the export", False)]  # the newer name stays
    elif "deleted" in history:
        assert stored[0][2] is True  # still deleted
    else:
        assert stored == [("User ops-row", "from the export", False)]


BACKFILL_ROWS_STILL_FAILING = {
    "not JSON": (
        b'{"user_id": "auth0|cut-short", "updated_at": "2025-',
        "not an Auth0 user: Input data was truncated",
    ),
    "not versioned": (
        encode({"user_id": "auth0|no-times", "name": "No Times"}),
        "an export row needs updated_at (or created_at) to be versioned",
    ),
    # A number JSON and msgspec take (as 0.0) but beyond what PostgreSQL's numeric holds.
    "refused by PostgreSQL": (
        encode(export_row("auth0|tiny", ROW_TIME, user_metadata={"tiny": "TINY"})).replace(
            b'"TINY"', b"1e-16384"
        ),
        "PostgreSQL refused the row: value overflows numeric format",
    ),
}


@pytest.mark.parametrize("case", sorted(BACKFILL_ROWS_STILL_FAILING))
def test_a_backfill_letter_that_still_fails_keeps_the_new_error_and_no_copy_and_exits_1(
    database: Database, case: str
) -> None:
    line, reason = BACKFILL_ROWS_STILL_FAILING[case]
    letter_id = insert_dead_letter(database, line, route="backfill", error=OLD_ERROR)

    replayed = relay_command(database, "dead-letters", "replay")
    again = relay_command(database, "dead-letters", "replay", str(letter_id))

    assert (replayed.returncode, again.returncode) == (1, 1)
    [letter] = dead_letters(database)
    assert (letter.id, letter.body, letter.error, letter.resolved) == (letter_id, line, reason, False)
    assert replayed.stdout.splitlines() == [
        f"dead letter {letter_id}: failing: {reason}",
        "replayed: 1 failing",
    ]
    assert again.stdout == replayed.stdout
    assert row_counts(database) == {"users": 0, "processed_events": 0, "dead_letters": 1}


def every_kind_of_letter(database: Database) -> dict[str, tuple[int, str]]:
    """One dead letter of each kind a relay keeps, each as it stores them; name -> (id, replay line)."""
    webhook_event, catch_up_event, wrapped_event = numbered(1), numbered(2), numbered(3)
    row = export_row("auth0|ops-row", ROW_TIME)
    letters = {
        "webhook event": (encode(webhook_event), "webhook", f"resolved: {webhook_event['id']} applied"),
        "export row": (encode(row), "backfill", "resolved: export row of auth0|ops-row inserted"),
        "catch-up event": (encode(catch_up_event), "catch-up", f"resolved: {catch_up_event['id']} applied"),
        "message without an event": (
            b'{"offset":"b2Zmc2V0LTA5"}',
            "catch-up",
            "not replayable: the Events API message has no event",
        ),
        "message that could not be read": (
            b'{"offset":"b2Zmc2V0LTEw","event":{"id":"evt_',
            "catch-up",
            "not replayable: the letter could not be read: Input data was truncated",
        ),
        # An older reader gave up on the whole message for its numeric offset; the event in it is fine.
        "message holding an event": (
            encode({"offset": 11, "event": wrapped_event}),
            "catch-up",
            f"resolved: {wrapped_event['id']} applied",
        ),
    }
    return {
        name: (insert_dead_letter(database, body, route=route, error=OLD_ERROR), line)
        for name, (body, route, line) in letters.items()
    }


ADVICE = (
    "not replayable ones are left unresolved: read each with `relay dead-letters show ID`, then mark it "
    "handled with `relay dead-letters resolve ID`"
)


def test_replay_without_ids_takes_every_kind_of_letter_and_reports_the_not_replayable_ones(
    database: Database,
) -> None:
    letters = every_kind_of_letter(database)
    before = {letter.id: letter for letter in dead_letters(database)}

    replayed = relay_command(database, "dead-letters", "replay")

    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert replayed.stdout.splitlines() == [
        *(f"dead letter {letter_id}: {line}" for letter_id, line in letters.values()),
        "replayed: 4 resolved, 2 not replayable",
        ADVICE,
    ]
    assert row_counts(database) == {"users": 4, "processed_events": 3, "dead_letters": 6}
    for name, (letter_id, _) in letters.items():
        if name.startswith("message without") or name.startswith("message that"):
            assert dead_letter(database, letter_id) == before[letter_id]  # left exactly as it was
        else:
            assert dead_letter(database, letter_id).resolved, name

    # Once a person has read them and resolved them, nothing is left to replay.
    for name in ("message without an event", "message that could not be read"):
        assert relay_command(database, "dead-letters", "resolve", str(letters[name][0])).returncode == 0
    assert relay_command(database, "dead-letters", "replay").stdout.strip() == "no unresolved dead letters"


def test_a_failing_letter_stops_no_other_and_exits_1_but_a_not_replayable_one_exits_0(
    database: Database,
) -> None:
    letters = every_kind_of_letter(database)
    failing = insert_dead_letter(database, STILL_FAILING["undecodable"][0], error=OLD_ERROR)
    not_replayable = letters["message without an event"][0]

    everything = relay_command(database, "dead-letters", "replay")
    just_the_message = relay_command(database, "dead-letters", "replay", str(not_replayable))
    with_an_unknown_id = relay_command(database, "dead-letters", "replay", str(not_replayable), "999999")

    assert everything.returncode == 1
    assert f"dead letter {failing}: failing: {STILL_FAILING['undecodable'][1]}" in everything.stdout
    assert "replayed: 4 resolved, 2 not replayable, 1 failing" in everything.stdout
    assert row_counts(database) == {"users": 4, "processed_events": 3, "dead_letters": 7}
    assert (just_the_message.returncode, just_the_message.stdout.splitlines()[:2]) == (
        0,
        [
            f"dead letter {not_replayable}: not replayable: the Events API message has no event",
            "replayed: 1 not replayable",
        ],
    )
    assert with_an_unknown_id.returncode == 1
    assert "dead letter 999999: not found" in with_an_unknown_id.stdout


@pytest.mark.parametrize("route", ["webhook", "catch-up"])
def test_replaying_another_tenants_event_into_a_schema_pinned_to_one_fails_and_keeps_it(
    database: Database, route: str
) -> None:
    """A replay meets the schema's tenant as a new delivery does: not ours to apply, so it stays a letter."""
    database.query("INSERT INTO tenant (name) VALUES ('acme')")
    theirs = cloudevent(a0tenant="globex")
    letter_id = insert_dead_letter(database, encode(theirs), route=route, error=OLD_ERROR)

    replayed = relay_command(database, "dead-letters", "replay")

    refusal = (
        f"schema {database.schema!r} holds the users of tenant 'acme', not 'globex': "
        "give each tenant a RELAY_DB_SCHEMA of its own"
    )
    assert replayed.returncode == 1
    [line, summary] = replayed.stdout.splitlines()
    assert line.startswith(f"dead letter {letter_id}: failing: schema {database.schema!r} holds the users")
    assert summary == "replayed: 1 failing"
    assert letter_rows(database) == [(letter_id, encode(theirs), refusal, False)]
    assert row_counts(database) == {"users": 0, "processed_events": 0, "dead_letters": 1}


def test_replay_help_names_every_status_and_what_the_exit_status_means(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["dead-letters", "replay", "--help"])

    shown = capsys.readouterr().out
    assert exited.value.code == 0
    for status in ("resolved", "failing", "not replayable", "already resolved", "not found"):
        assert f"\n  {status} " in shown, status
    assert "exit status: 0 when nothing that could be replayed failed" in shown
    assert "1 when a letter still fails or an ID given was not found" in shown


# ---------------------------------------------------------------------------------------------------------
# List, show, resolve


def test_list_shows_unresolved_dead_letters_with_size_route_and_first_error_line(database: Database) -> None:
    first = insert_dead_letter(database, b"x" * 321, route="action", error="first line\nsecond line")
    insert_dead_letter(database, b"{}", error="already handled", resolved_ago=timedelta(minutes=1))
    third = insert_dead_letter(database, b"[1,", error="body is not a JSON array of events")

    listed = relay_command(database, "dead-letters", "list")

    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["ID", "RECEIVED", "ROUTE", "BYTES", "ERROR"]
    assert lines[1].split()[:1] + lines[1].split()[2:] == [str(first), "action", "321", "first", "line"]
    assert lines[2].split()[0] == str(third)
    assert "body is not a JSON array of events" in lines[2]
    assert "second line" not in listed.stdout
    assert "already handled" not in listed.stdout
    assert lines[-1] == "2 of 2 unresolved dead letters shown (oldest first)"


def test_list_all_includes_resolved_ones_and_limit_says_how_many_more(database: Database) -> None:
    insert_dead_letter(database, b"{}", error="open one")
    insert_dead_letter(database, b"{}", error="handled one", resolved_ago=timedelta(minutes=1))

    everything = relay_command(database, "dead-letters", "list", "--all")
    limited = relay_command(database, "dead-letters", "list", "--all", "--limit", "1")

    assert "RESOLVED" in everything.stdout.splitlines()[0]
    assert "open one" in everything.stdout and "handled one" in everything.stdout
    assert everything.stdout.splitlines()[-1] == "2 of 2 dead letters shown (oldest first)"
    assert "handled one" not in limited.stdout
    assert limited.stdout.splitlines()[-1] == "1 of 2 dead letters shown (oldest first)"


def test_list_with_no_dead_letters_says_so(database: Database) -> None:
    listed = relay_command(database, "dead-letters", "list")
    assert (listed.returncode, listed.stdout.strip()) == (0, "no unresolved dead letters")


def test_show_prints_headers_error_and_a_text_body_with_control_characters_escaped(
    database: Database,
) -> None:
    body = b'{"name": "\x1b[2Jcleared"}'
    letter_id = insert_dead_letter(
        database, body, headers={"webhook-id": "evt_1", "content-type": "application/json"}, error="a\nb"
    )

    shown = relay_command(database, "dead-letters", "show", str(letter_id))

    assert shown.returncode == 0, shown.stderr
    assert "\x1b" not in shown.stdout
    assert "  webhook-id: evt_1" in shown.stdout
    assert "  content-type: application/json" in shown.stdout
    assert "error:\n  a\n  b\n" in shown.stdout
    assert f"body ({len(body)} bytes, UTF-8):\n" + '{"name": "\\x1b[2Jcleared"}' in shown.stdout
    assert "resolved: no" in shown.stdout


def test_show_prints_a_hex_preview_of_a_body_that_is_not_utf8(database: Database) -> None:
    body = b"\xff\xfe" + bytes(range(256)) * 4
    letter_id = insert_dead_letter(database, body)

    shown = relay_command(database, "dead-letters", "show", str(letter_id))

    assert f"body ({len(body)} bytes, not UTF-8, first 512 in hex):" in shown.stdout
    assert "  00000000  ff fe 00 01 02 03" in shown.stdout
    hex_lines = [line for line in shown.stdout.splitlines() if line.startswith("  000")]
    assert len(hex_lines) == 512 // 16


def test_show_of_an_unknown_id_exits_1(database: Database) -> None:
    shown = relay_command(database, "dead-letters", "show", "424242")
    assert (shown.returncode, shown.stdout.strip()) == (1, "no dead letter 424242")


def test_resolve_marks_a_dead_letter_resolved_without_applying_it(database: Database) -> None:
    letter_id = insert_dead_letter(database, encode(fixture("user.created")))

    resolved = relay_command(database, "dead-letters", "resolve", str(letter_id))
    again = relay_command(database, "dead-letters", "resolve", str(letter_id))
    unknown = relay_command(database, "dead-letters", "resolve", "424242")

    assert (resolved.returncode, resolved.stdout.strip()) == (
        0,
        f"dead letter {letter_id} resolved (not replayed)",
    )
    assert (again.returncode, again.stdout.strip()) == (0, f"dead letter {letter_id} was already resolved")
    assert unknown.returncode == 1
    assert letter_rows(database)[0][3] is True
    assert row_counts(database) == {"users": 0, "processed_events": 0, "dead_letters": 1}
    assert relay_command(database, "dead-letters", "replay").stdout.strip() == "no unresolved dead letters"


# ---------------------------------------------------------------------------------------------------------
# Retention


async def apply_in_order(
    pool: Pool, database: Database, events: list[dict[str, Any]], delete_mode: Any
) -> list[str]:
    """Each event committed on its own, one after the other; the outcomes."""
    pipeline = Pipeline(pool, database.with_settings(delete_mode=delete_mode))
    return [result.outcome.value for event in events for result in await commit(pipeline, encode(event))]


@pytest.mark.anyio
async def test_prune_deletes_old_ledger_rows_and_old_resolved_dead_letters_and_keeps_tombstones(
    pool: Pool, database: Database
) -> None:
    old_events = [numbered(number) for number in range(5)] + [numbered(0, "deleted")]
    recent = numbered(9)
    outcomes = await apply_in_order(pool, database, [*old_events, recent], "soft")
    assert outcomes == ["applied"] * 5 + ["tombstoned", "applied"]
    database.query(
        "UPDATE processed_events SET received_at = now() - interval '40 days' WHERE event_id <> %s",
        [recent["id"]],
    )
    old_resolved = [
        insert_dead_letter(database, b"{}", received_ago=timedelta(days=50), resolved_ago=timedelta(days=40))
        for _ in range(3)
    ]
    old_unresolved = insert_dead_letter(database, b"{}", received_ago=timedelta(days=50))
    recently_resolved = insert_dead_letter(
        database, b"{}", received_ago=timedelta(days=50), resolved_ago=timedelta(days=1)
    )
    users_before = database.query("SELECT * FROM users ORDER BY user_id")

    pruned = relay_command(database, "prune", "--older-than", "30d", "--batch-size", "2")

    assert pruned.returncode == 0, pruned.stderr
    assert "processed_events: deleted 6 rows" in pruned.stdout
    assert "dead_letters: deleted 3 resolved" in pruned.stdout
    assert database.query("SELECT event_id FROM processed_events") == [(recent["id"],)]
    remaining = [row[0] for row in letter_rows(database)]
    assert remaining == [old_unresolved, recently_resolved]
    assert not set(old_resolved) & set(remaining)
    assert database.query("SELECT * FROM users ORDER BY user_id") == users_before
    assert database.query("SELECT count(*) FROM users WHERE deleted_at IS NOT NULL") == [(1,)]


@pytest.mark.anyio
@pytest.mark.parametrize("delete_mode", ["soft", "scrub"])
async def test_an_old_event_redelivered_after_its_ledger_row_was_pruned_changes_nothing(
    pool: Pool, database: Database, delete_mode: str
) -> None:
    """Pruning the ledger is safe: the merge state in `users`, not the ledger, decides what events do."""
    created, updated, deleted = fixture("user.created"), fixture("user.updated"), fixture("user.deleted")
    await apply_in_order(pool, database, [created, updated, deleted], delete_mode)
    database.query("UPDATE processed_events SET received_at = now() - interval '2 days'")
    before = database.query("SELECT * FROM users")

    pruned = relay_command(database, "prune", "--older-than", "1d")
    assert "processed_events: deleted 3 rows" in pruned.stdout

    assert await apply_in_order(pool, database, [updated, created, deleted], delete_mode) == ["stale"] * 3
    assert database.query("SELECT * FROM users") == before


def test_prune_in_hours_keeps_what_is_younger(database: Database) -> None:
    database.query(
        "INSERT INTO processed_events (event_id, event_type, event_time, received_at, outcome) VALUES"
        " ('evt_13h', 'user.created', now(), now() - interval '13 hours', 'applied'),"
        " ('evt_11h', 'user.created', now(), now() - interval '11 hours', 'applied')"
    )

    pruned = relay_command(database, "prune", "--older-than", "12h")

    assert pruned.returncode == 0, pruned.stderr
    assert database.query("SELECT event_id FROM processed_events") == [("evt_11h",)]


@pytest.mark.parametrize("age", ["30m", "0d", "30", "d", "1.5d"])
def test_prune_refuses_an_age_it_cannot_read(database: Database, age: str) -> None:
    pruned = relay_command(database, "prune", "--older-than", age)

    assert pruned.returncode == 2
    assert "--older-than" in pruned.stderr and "30d or 12h" in pruned.stderr
