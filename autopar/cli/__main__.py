"""`python -m autopar.cli ...` runs the `autopar` command."""

from autopar.cli.command import entry

entry()
