"""`relay export --format auth0-import`: the live users of one database connection as Auth0's bulk user
import file, to `--out FILE` or stdout, with progress on stderr; what it wrote, what it could not, and that
passwords must be reset, said where the operator reads it (stdout with --out, else stderr)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TextIO

from relay import store
from relay.cli.database import migrated_database
from relay.cli.progress import StatusLine
from relay.restore import IMPORT_FILE_LIMIT, ImportWritten, write_import
from relay.settings import Settings

_SHOW_EVERY_SECONDS = 0.5


def export_import_file(settings: Settings, connection: str, out: Path | None) -> int:
    conninfo = migrated_database(settings)
    status = StatusLine(sys.stderr)
    shown = 0.0
    with store.direct_connection(conninfo, settings) as conn:
        total = store.count_live_users_of_connection(conn, connection)

        def progress(read: int) -> None:
            nonlocal shown
            if read == total or time.monotonic() - shown >= _SHOW_EVERY_SECONDS:
                shown = time.monotonic()
                status.show(f"exporting connection {connection}: {read} of {total} users read")

        profiles = store.live_users_of_connection(conn, connection)
        if out is None:
            written = write_import(profiles, connection, sys.stdout.buffer, progress=progress)
            sys.stdout.flush()
        else:
            # Written aside and renamed once whole: an interrupted export never leaves a file that looks done.
            partial = out.with_name(out.name + ".partial")
            with partial.open("wb") as target:
                written = write_import(profiles, connection, target, progress=progress)
            os.replace(partial, out)
    status.end()
    _summary(written, connection, out, sys.stdout if out is not None else sys.stderr)
    return 0


def _summary(written: ImportWritten, connection: str, out: Path | None, stream: TextIO) -> None:
    where = str(out) if out is not None else "stdout"
    lines = [
        f"exported {written.users} live users of connection {connection!r} to {where} ({written.size} bytes)"
    ]
    if written.without_email:
        lines.append(f"left out {written.without_email} users without an email: Auth0's import requires one")
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
