"""`python -m tunelab` = the `tunelab` command."""

from tunelab.cli import app

app(prog_name="tunelab")
