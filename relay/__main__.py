"""`python -m relay`: the `relay` console script, for an environment without the script on its path."""

from relay.cli import main

raise SystemExit(main())
