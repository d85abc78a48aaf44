"""The hypothesis settings, one per kind of property; CI (`CI` set) runs the PostgreSQL ones longer.

Properties that touch PostgreSQL or a relay process share one schema (and process) across examples, each
example using fresh ids, so hypothesis must not complain about function-scoped fixtures; and a database
round trip has no meaningful deadline.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_IN_CI = bool(os.environ.get("CI"))
_SHARED_FIXTURES = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]

# Pure functions: cheap, so many examples.
PURE = settings(max_examples=600, deadline=None)
# Through the real store on real PostgreSQL, several connections at once.
THROUGH_POSTGRESQL = settings(
    max_examples=150 if _IN_CI else 40, deadline=None, suppress_health_check=_SHARED_FIXTURES
)
# Through a real relay process over HTTP.
OVER_HTTP = settings(max_examples=60, deadline=None, suppress_health_check=_SHARED_FIXTURES)
# Random authentic bodies through a relay process and the operator commands (tests/test_fuzz.py): a request
# or a command run and a few queries per example, some of them bodies of a few hundred kilobytes; few
# examples by default, since CI runs them against two PostgreSQL versions. FUZZ_EXAMPLES=1000 for a long hunt.
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES") or (30 if _IN_CI else 12)),
    deadline=None,
    suppress_health_check=[*_SHARED_FIXTURES, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
