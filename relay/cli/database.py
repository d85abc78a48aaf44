"""The PostgreSQL a command works on: the one at DATABASE_URL, or the embedded server, started for it."""

from __future__ import annotations

from relay.settings import Settings


def database(settings: Settings) -> tuple[str, str | None]:
    """The conninfo to use, and the bundled psql when the embedded server was started."""
    if settings.database_url:
        return settings.database_url, None
    from relay.embedded import start_embedded

    server = start_embedded(settings.data_dir)
    return server.conninfo, str(server.psql)


def migrated_database(settings: Settings) -> str:
    """The conninfo, once the relay's schema is known to be up to date (`NotMigrated` otherwise): for the
    commands that check before they ask Auth0 for anything."""
    from relay.migrations import latest_version
    from relay.store import require_migrations

    conninfo, _ = database(settings)
    require_migrations(conninfo, settings, latest_version())
    return conninfo
