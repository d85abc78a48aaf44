"""`relay export`: the live users as Auth0's bulk user import file (`--format auth0-import`, one database
connection) or as a users export's NDJSON (`--format export`), to `--out FILE` or stdout, with progress on
stderr; what it wrote and what it could not (and, for an import, that passwords must be reset) said where
the operator reads it: stdout with --out, else stderr, so that stdout holds the file alone."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TextIO

from relay import store
from relay.cli.database import migrated_database
from relay.cli.progress import StatusLine
from relay.restore import IMPORT_FILE_LIMIT, Format, Written, write_users
from relay.settings import Settings

_SHOW_EVERY_SECONDS = 0.5


def export(settings: Settings, shape: Format, connection: str | None, out: Path | None) -> int:
    conninfo = migrated_database(settings)
    status = StatusLine(sys.stderr)
    shown = 0.0
    whose = f"connection {connection}" if connection is not None else "the copy"
    with store.direct_connection(conninfo, settings) as conn:
        total = store.count_live_users(conn, connection)

        def progress(read: int) -> None:
            nonlocal shown
            if read == total or time.monotonic() - shown >= _SHOW_EVERY_SECONDS:
                shown = time.monotonic()
                status.show(f"exporting {whose}: {read} of {total} users read")

        profiles = store.live_users(conn, connection)
        if out is None:
            written = write_users(profiles, sys.stdout.buffer, shape, connection, progress=progress)
            sys.stdout.flush()
        else:
            # Written aside and renamed once whole: an interrupted export never leaves a file that looks done.
            partial = out.with_name(out.name + ".partial")
            with partial.open("wb") as target:
                written = write_users(profiles, target, shape, connection, progress=progress)
            os.replace(partial, out)
    status.end()
    _summary(written, shape, whose, out, sys.stdout if out is not None else sys.stderr)
    return 0


def _summary(written: Written, shape: Format, whose: str, out: Path | None, stream: TextIO) -> None:
    where = str(out) if out is not None else "stdout"
    lines = [f"exported {written.users} live users of {whose} to {where} ({written.size} bytes, {shape})"]
    if written.without_email:
        lines.append(f"left out {written.without_email} users without an email: Auth0's import requires one")
    if shape is Format.AUTH0_IMPORT:
        lines.append(
            "password hashes are not in the copy: imported users must reset their password "
            "(Auth0 sends no hash in events or exports)"
        )
        if written.size > IMPORT_FILE_LIMIT:
            lines.append(
                f"Auth0 takes at most {IMPORT_FILE_LIMIT // 1024} KB per import job: "
                "split the array over several files"
            )
    for line in lines:
        print(line, file=stream, flush=True)
