"""React to the copy's changes: LISTEN on the relay's change feed and print one line per changed user.

    DATABASE_URL=postgresql://… RELAY_DB_SCHEMA=auth0 python docs/examples/listen.py

After each commit the relay sends a notice on `<schema>_users_changed`: a JSON array of
{"user_id": …, "outcome": "applied" | "tombstoned"}, the users that commit wrote (a large commit sends several
notices). Notices reach only the sessions listening when the commit happens, so a listener that was away
reads what it needs from the tables themselves, then listens again.
"""

import json
import os

import psycopg
from psycopg import sql


def main() -> None:
    channel = os.environ.get("RELAY_DB_SCHEMA", "auth0") + "_users_changed"
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        print(f"listening on {channel}", flush=True)
        for notice in conn.notifies():
            for change in json.loads(notice.payload):
                # Look the user up here (SELECT … FROM live_users WHERE user_id = …) and act on it.
                print(change["outcome"], change["user_id"], flush=True)


if __name__ == "__main__":
    main()
