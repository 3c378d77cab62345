"""`python -m flows.cli ...`: the same as the `llmops` console script."""

from flows.cli import main

raise SystemExit(main())
