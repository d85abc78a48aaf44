"""Keeps a PostgreSQL copy of Auth0 user profiles in step with Auth0 Event Streams."""

from importlib.metadata import PackageNotFoundError, version

try:
    # pyproject.toml is the one place the version is written; an installed relay carries it in its metadata.
    __version__ = version("auth0-user-sync-relay")
except PackageNotFoundError:  # a source tree nobody installed: say so rather than guess
    __version__ = "0+unknown"
