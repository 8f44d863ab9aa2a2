"""`python -m tunelab` = the `tunelab` command."""

from tunelab.cli import run

run()
