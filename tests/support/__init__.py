"""What the tests share, one idea per module (test files never import each other):

- `events`: the one event builder (`cloudevent()`, from the JSON fixtures) and export rows for backfill.
- `database`: a migrated schema of its own (`Database`), and readers of what the relay stored.
- `http`: credentials, `deliver()` to a route, a relay running as a real process, `relay_command()`.
- `auth0`: the one fake of the Auth0 Management API's token endpoint (respx).
- `reference`: random event histories and the reference model every convergence test compares with.
- `properties`: the hypothesis settings, one per kind of property.

`conftest.py` holds the fixtures: the PostgreSQL servers, a schema per test, pools and pipelines.
"""

import tomllib
from pathlib import Path

REPO = Path(__file__).parent.parent.parent
# What the relay must report as its version, read from where it is written.
PROJECT_VERSION: str = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
FIXTURES = REPO / "tests" / "fixtures"
