"""History (`RELAY_HISTORY=on`): every merged event's object in `user_events`, written with the ledger, and
`user_history`, each user's profile after each event in version order. Real PostgreSQL, the real pipeline,
backfill and prune."""

from __future__ import annotations

import json
import random
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given

from relay.backfill import load_export
from relay.events import decode_body
from relay.pipeline import Delivery, Pipeline
from relay.store import Pool
from tests.support import REPO
from tests.support.database import Database
from tests.support.events import BASE_TIME, encode, export_row, ndjson, user_event
from tests.support.http import relay_command
from tests.support.properties import THROUGH_POSTGRESQL
from tests.support.reference import Spec, deliveries, to_cloudevents, user_id_of


@pytest.fixture
def keeping(pool: Pool, database: Database) -> Pipeline:
    return Pipeline(pool, database.with_settings(history=True))


async def apply(pipeline: Pipeline, *events: dict[str, Any]) -> list[str]:
    results = await pipeline.commit([Delivery("webhook", decode_body(encode(event))) for event in events])
    return [result.outcome.value for answers in results for result in answers]


def history_of(database: Database, user_id: str) -> list[tuple[Any, ...]]:
    return database.query(
        "SELECT valid_from, valid_to, event_id, type, profile FROM user_history"
        " WHERE user_id = %s ORDER BY valid_from, event_id",
        [user_id],
    )


def readme_point_in_time_query() -> str:
    readme = (REPO / "README.md").read_text()
    [block] = [block for block in readme.split("```") if "valid_to" in block and block.startswith("sql")]
    query = block.removeprefix("sql").strip().rstrip(";").replace("auth0.", "")
    return query.replace("'auth0|679fb1b1e809445f129bc18d'", "%(user_id)s").replace(
        "'2025-03-01T00:00:00Z'", "%(at)s"
    )


@pytest.mark.anyio
async def test_user_history_gives_each_profile_with_the_span_it_was_valid(
    keeping: Pipeline, database: Database
) -> None:
    user_id = "auth0|history"
    t1, t2, t3 = (BASE_TIME + timedelta(hours=hours) for hours in (1, 2, 3))
    snapshot = export_row(user_id, t1)
    # Delivered newest first: the history is the same as in version order.
    outcomes = await apply(
        keeping,
        user_event("deleted", "evt_3", t3, user_id),
        user_event("updated", "evt_2", t2, user_id, name="Renamed"),
        user_event("created", "evt_1", t1, **snapshot),
    )
    assert outcomes == ["tombstoned", "applied", "applied"]

    renamed = snapshot | {"name": "Renamed"}
    assert history_of(database, user_id) == [
        (t1, t2, "evt_1", "user.created", snapshot),
        (t2, t3, "evt_2", "user.updated", renamed),
        (t3, None, "evt_3", "user.deleted", renamed),
    ]
    # The README's point-in-time query: the email and name the user had at a given moment.
    query = readme_point_in_time_query()
    assert database.query(query, {"user_id": user_id, "at": t2 + timedelta(minutes=30)}) == [
        (renamed["email"], "Renamed")
    ]
    assert database.query(query, {"user_id": user_id, "at": t1 - timedelta(minutes=30)}) == []


@pytest.mark.anyio
async def test_without_history_nothing_is_kept(pipeline: Pipeline, database: Database) -> None:
    assert await apply(pipeline, user_event("created", "evt_1", 0, **export_row("auth0|a", BASE_TIME)))
    assert database.query("SELECT count(*) FROM user_events") == [(0,)]


@pytest.mark.anyio
async def test_duplicates_dead_letters_and_test_events_are_not_history(
    keeping: Pipeline, database: Database
) -> None:
    created = user_event("created", "evt_1", 0, **export_row("auth0|a", BASE_TIME))
    test_event = user_event("created", "evt_test", 1, "auth0|a") | {"a0purpose": "test"}
    unstorable = user_event("updated", "evt_bad", 2, "auth0|a", name="nul \u0000")

    assert await apply(keeping, created, created, test_event, unstorable) == [
        "applied",
        "duplicate",
        "test",
        "dead_lettered",
    ]
    assert database.query("SELECT event_id FROM user_events") == [("evt_1",)]


@pytest.mark.anyio
async def test_backfill_rows_enter_history_as_snapshots_versioned_by_updated_at_once(
    keeping: Pipeline, pool: Pool, database: Database
) -> None:
    user_id = "auth0|row"
    row = export_row(user_id, BASE_TIME + timedelta(hours=1))
    later = user_event("updated", "evt_later", BASE_TIME + timedelta(hours=2), user_id, nickname="n")
    for _ in range(2):  # the same export loaded twice is kept once
        await load_export(pool, iter([encode(row)]), "soft", keep_history=True)
    await apply(keeping, later)

    assert history_of(database, user_id) == [
        (BASE_TIME + timedelta(hours=1), BASE_TIME + timedelta(hours=2), "backfill", "backfill", row),
        (BASE_TIME + timedelta(hours=2), None, "evt_later", "user.updated", row | {"nickname": "n"}),
    ]


def test_history_through_the_commands_and_prune(database: Database, tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    path.write_bytes(ndjson([export_row("auth0|old", BASE_TIME), export_row("auth0|new", BASE_TIME)]))
    loaded = relay_command(database, "backfill", "--file", str(path), RELAY_HISTORY="on")
    assert loaded.returncode == 0, loaded.stderr
    database.query("UPDATE user_events SET event_time = now() WHERE user_id = 'auth0|new'")

    pruned = relay_command(database, "prune", "--older-than", "30d", RELAY_HISTORY="on")

    assert pruned.returncode == 0, pruned.stderr
    assert "user_events: deleted 1 history rows of events before" in pruned.stdout
    assert database.query("SELECT user_id FROM user_events") == [("auth0|new",)]


@pytest.mark.anyio
@THROUGH_POSTGRESQL
@given(delivery=deliveries())
async def test_shuffled_delivery_gives_the_same_history_as_delivery_in_version_order(
    keeping: Pipeline, database: Database, delivery: tuple[list[Spec], list[int]]
) -> None:
    history, order = delivery
    in_order, shuffled = secrets.token_hex(4), secrets.token_hex(4)
    events = to_cloudevents(history, in_order)
    # The same events, ids included (so equal times are broken alike), for users of their own.
    same_events = json.loads(json.dumps(events).replace(in_order, shuffled))
    for event in sorted(events, key=lambda event: (event["time"], event["id"])):
        await apply(keeping, event)
    arrivals = [same_events[index] for index in order]
    batches = random.Random(len(order)).randint(1, 4)
    for start in range(0, len(arrivals), batches):
        await apply(keeping, *arrivals[start : start + batches])

    for user in {spec.user for spec in history}:
        expected = history_of(database, user_id_of(in_order, user))
        got = json.loads(json.dumps(history_of(database, user_id_of(shuffled, user)), default=str))
        assert got == json.loads(json.dumps(expected, default=str).replace(in_order, shuffled))
        # Folded in version order, the last profile is the one the relay stored (soft deletes).
        stored = database.query("SELECT profile FROM users WHERE user_id = %s", [user_id_of(in_order, user)])
        assert [row[0] for row in stored] == ([expected[-1][-1]] if expected else [])
