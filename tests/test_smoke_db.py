import pytest

from relay.events import decode_event
from relay.store import apply_events
from tests.support import encode, fixture


@pytest.mark.anyio
async def test_created_event_lands_in_users(pool, database):
    event = decode_event(encode(fixture("user.created")))
    async with pool.connection() as conn:
        outcomes = await apply_events(conn, [event], "soft")
    assert [str(o) for o in outcomes] == ["applied"]
    assert database.query("SELECT email FROM users") == [("jane@example.com",)]
