"""`python -m relay.cli`: the console script, as the tests and the benchmark start it."""

from relay.cli import main

raise SystemExit(main())
