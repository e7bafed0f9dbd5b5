"""`python -m telepresence.cli COMMAND ...` is `telepresence COMMAND ...` (machines without the console script)."""
import sys

from telepresence.cli import main

sys.exit(main())
