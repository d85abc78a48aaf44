"""Operator commands on the stored data: `relay dead-letters list | show | replay | resolve` and
`relay prune`, run as real processes against real PostgreSQL, as an operator runs them.

Dead letters are made the way the relay makes them (`ingest_body` on an unusable body), or inserted as an
older relay version would have left them: a body the current decoder reads fine, which is what replay is for.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from typing import Any

import pytest
from psycopg.types.json import Jsonb

from relay.batching import apply_isolating
from relay.events import decode_event
from relay.ingest import ingest_body
from relay.store import apply_events
from tests.conftest import TestDatabase as Database  # aliased: pytest would try to collect Test*
from tests.support import REPO, encode, fixture, relay_environment
from tests.test_http import assert_stored_as_sent, row_counts

pytestmark = pytest.mark.integration

OLD_ERROR = "an older relay version could not decode this"


def relay_command(database: Database, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay.cli", *args],
        env=relay_environment(database.conninfo, database.schema, **env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def insert_dead_letter(
    database: Database,
    body: bytes,
    *,
    route: str = "webhook",
    error: str = OLD_ERROR,
    headers: dict[str, str] | None = None,
    received_ago: timedelta = timedelta(0),
    resolved_ago: timedelta | None = None,
) -> int:
    """A dead letter as an earlier relay version left it."""
    [(letter_id,)] = database.query(
        "INSERT INTO dead_letters (route, body, headers, error, received_at, resolved_at)"
        " VALUES (%s, %s, %s, %s, now() - %s::interval, now() - %s::interval) RETURNING id",
        [route, body, Jsonb(headers or {}), error, received_ago, resolved_ago],
    )
    return int(letter_id)


def dead_letter_rows(database: Database) -> list[tuple[Any, ...]]:
    return database.query("SELECT id, body, error, resolved_at IS NOT NULL FROM dead_letters ORDER BY id")


def user_event(number: int, kind: str = "created", **fields: Any) -> dict[str, Any]:
    event = fixture(f"user.{kind}")
    event["id"] = f"evt_ops{kind[0]}{number:018d}"
    event["data"]["object"]["user_id"] = f"auth0|ops-{number}"
    event["data"]["object"].update(fields)
    return event


async def ingest_directly(pool: Any, body: bytes, route: str = "webhook") -> list[Any]:
    """The relay's own path from a body to committed outcomes, without HTTP."""

    async def apply(events: Any) -> Any:
        return await apply_isolating(pool, events, "soft")

    return await ingest_body(
        pool, apply, route=route, headers={"content-type": "application/json"}, body=body
    )


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
    [(_, _, error, resolved)] = dead_letter_rows(database)
    assert (error, resolved) == (OLD_ERROR, True)


@pytest.mark.anyio
async def test_replay_that_still_fails_updates_the_same_dead_letter_and_keeps_it_unresolved(
    pool: Any, database: Database
) -> None:
    body = b'{"id": "evt_broken", "type": "user.created", "time": "not a time"}'
    [result] = await ingest_directly(pool, body)
    current_error = result.error
    database.query("UPDATE dead_letters SET error = %s", [OLD_ERROR])

    replayed = relay_command(database, "dead-letters", "replay", str(result.dead_letter_id))

    assert replayed.returncode == 1
    assert f"dead letter {result.dead_letter_id}: failing: not a CloudEvent" in replayed.stdout
    assert dead_letter_rows(database) == [(result.dead_letter_id, body, current_error, False)]
    assert row_counts(database) == {"users": 0, "processed_events": 0, "dead_letters": 1}


@pytest.mark.anyio
async def test_replay_of_a_body_postgresql_refuses_stays_one_unresolved_dead_letter(
    pool: Any, database: Database
) -> None:
    body = encode(user_event(1, name="nul \u0000 inside"))  # jsonb cannot hold U+0000
    [result] = await ingest_directly(pool, body)
    assert result.outcome == "dead_lettered"

    for _ in range(2):
        replayed = relay_command(database, "dead-letters", "replay")
        assert replayed.returncode == 1
        assert "failing: PostgreSQL refused the event" in replayed.stdout

    [(letter_id, stored_body, error, resolved)] = dead_letter_rows(database)
    assert (letter_id, stored_body, resolved) == (result.dead_letter_id, body, False)
    assert error.startswith("PostgreSQL refused the event")
    assert row_counts(database) == {"users": 0, "processed_events": 0, "dead_letters": 1}


@pytest.mark.anyio
async def test_replay_of_an_event_already_applied_is_a_duplicate_and_resolves(
    pool: Any, database: Database
) -> None:
    event = fixture("user.created")
    async with pool.connection() as conn:
        await apply_events(conn, [decode_event(encode(event))], "soft")
    newer = fixture("user.updated")
    async with pool.connection() as conn:
        await apply_events(conn, [decode_event(encode(newer))], "soft")
    letter_id = insert_dead_letter(database, encode(event))

    replayed = relay_command(database, "dead-letters", "replay", str(letter_id))

    assert replayed.returncode == 0, replayed.stderr
    assert f"resolved: {event['id']} duplicate" in replayed.stdout
    assert_stored_as_sent(database, newer)
    assert dead_letter_rows(database)[0][3] is True


def test_replay_of_an_array_applies_what_it_can_and_keeps_the_rest_unresolved(database: Database) -> None:
    good = user_event(1)
    bad = {"id": "evt_no_time", "type": "user.updated", "data": {"object": {"user_id": "auth0|x"}}}
    letter_id = insert_dead_letter(database, encode([good, bad]))

    first = relay_command(database, "dead-letters", "replay")
    second = relay_command(database, "dead-letters", "replay")

    assert (first.returncode, second.returncode) == (1, 1)
    assert_stored_as_sent(database, good)
    assert database.query("SELECT event_id FROM processed_events") == [(good["id"],)]
    [(stored_id, _, error, resolved)] = dead_letter_rows(database)
    assert (stored_id, resolved) == (letter_id, False)
    assert "not a CloudEvent" in error and "time" in error


def test_replay_without_ids_takes_every_unresolved_dead_letter_once_and_no_resolved_one(
    database: Database,
) -> None:
    # More than one page of unresolved dead letters, with resolved ones in between that must stay untouched.
    unresolved, resolved = [], []
    for number in range(230):
        event = user_event(number)
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
    assert dead_letter_rows(database)[0][3] is True
    assert row_counts(database) == {"users": 0, "processed_events": 0, "dead_letters": 1}
    assert relay_command(database, "dead-letters", "replay").stdout.strip() == "no unresolved dead letters"


# ---------------------------------------------------------------------------------------------------------
# Retention


async def apply_in_order(pool: Any, events: list[dict[str, Any]], delete_mode: str = "soft") -> list[str]:
    outcomes = []
    for event in events:
        async with pool.connection() as conn:
            outcomes += [str(o) for o in await apply_events(conn, [decode_event(encode(event))], delete_mode)]
    return outcomes


@pytest.mark.anyio
async def test_prune_deletes_old_ledger_rows_and_old_resolved_dead_letters_and_keeps_tombstones(
    pool: Any, database: Database
) -> None:
    old_events = [user_event(number) for number in range(5)] + [user_event(0, "deleted")]
    recent = user_event(9)
    assert await apply_in_order(pool, [*old_events, recent]) == ["applied"] * 5 + ["tombstoned", "applied"]
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
    remaining = [row[0] for row in dead_letter_rows(database)]
    assert remaining == [old_unresolved, recently_resolved]
    assert not set(old_resolved) & set(remaining)
    assert database.query("SELECT * FROM users ORDER BY user_id") == users_before
    assert database.query("SELECT count(*) FROM users WHERE deleted_at IS NOT NULL") == [(1,)]


@pytest.mark.anyio
@pytest.mark.parametrize("delete_mode", ["soft", "scrub"])
async def test_an_old_event_redelivered_after_its_ledger_row_was_pruned_changes_nothing(
    pool: Any, database: Database, delete_mode: str
) -> None:
    """Pruning the ledger is safe: the merge state in `users`, not the ledger, decides what events do."""
    created, updated, deleted = fixture("user.created"), fixture("user.updated"), fixture("user.deleted")
    await apply_in_order(pool, [created, updated, deleted], delete_mode)
    database.query("UPDATE processed_events SET received_at = now() - interval '2 days'")
    before = database.query("SELECT * FROM users")

    pruned = relay_command(database, "prune", "--older-than", "1d")
    assert "processed_events: deleted 3 rows" in pruned.stdout

    assert await apply_in_order(pool, [updated, created, deleted], delete_mode) == ["stale"] * 3
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
