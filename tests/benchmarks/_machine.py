"""One line describing where a benchmark ran, so numbers from different runs can be compared (or not)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

import autopar


def describe() -> str:
    """torch, python, cores, load average (other work on the machine skews every number), and which autopar."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"torch {torch.__version__}, python {platform.python_version()}, {os.cpu_count()} cores "
            f"({platform.machine()}), load average {load}; autopar {_tree()}")


def _tree() -> str:
    """The checkout autopar is imported from (PYTHONPATH may point at a copy), with its commit if it is a git tree."""
    root = Path(autopar.__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"from {root} (not a git checkout)"
    return f"from {root} at {head}{' + uncommitted changes' if dirty else ''}"
