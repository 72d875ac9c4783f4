"""`autopar` entry point: subcommands, and the one place user errors become `autopar: error: ...` and exit 2."""

from __future__ import annotations

import argparse
import sys
from importlib import metadata

from autopar.cli import checkpoint_cmd, plan_cmd, profile_cmd, validate_cmd
from autopar.errors import AutoparError

EXIT_USAGE = 2  # argparse's own code for bad usage; user errors share it
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autopar", description="Declarative auto-parallel planner/compiler for PyTorch training.")
    parser.add_argument("--version", action="version", version=f"autopar {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    plan_cmd.add_parser(sub)
    profile_cmd.add_parser(sub)
    validate_cmd.add_parser(sub)
    checkpoint_cmd.add_parser(sub)
    return parser


def _version() -> str:
    try:
        return metadata.version("autopar")
    except metadata.PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    """Run `autopar` with `argv` (default: sys.argv[1:]) and return the exit status, never raising for user
    errors: tests and scripts call this directly."""
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except SystemExit as done:  # argparse: --help, --version (0) and usage errors (2)
        return done.code if isinstance(done.code, int) else EXIT_USAGE
    except AutoparError as err:
        print(f"autopar: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    from autopar.cli.command import entry

    entry()
