"""`python -m telepresence.cli COMMAND ...` is `telepresence COMMAND ...` (machines without the console script)."""
from telepresence.cli import entry

entry()
