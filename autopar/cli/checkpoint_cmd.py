"""`autopar checkpoint DIR`: what a checkpoint folder holds, its step, and the plan that wrote it (no ranks needed)."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

from rich.console import Console
from rich.table import Table


def _io():
    """autopar.runtime.checkpoint_io, imported when a checkpoint command runs: it imports torch's distributed
    checkpointing (~0.5 s), which `autopar plan` never needs."""
    from autopar.runtime import checkpoint_io

    return checkpoint_io


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("checkpoint", help="show what a checkpoint holds, its step and the plan that wrote it",
                       description="Read a checkpoint folder written by compiled.save (or examples/train.py "
                                   "--checkpoint-dir): the newest complete checkpoint in it, its step and data "
                                   "position, the plan that wrote it, its tensors, and whether its files are whole.")
    p.add_argument("dir", metavar="DIR", help="a checkpoint folder (step_*) or the folder holding them")
    p.add_argument("--tensors", action="store_true", help="list every parameter with its global shape")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    console = Console()
    m = _io().read_manifest(args.dir)
    path = Path(m["path"])
    plan = m.get("plan", {})
    console.print(f"checkpoint {path}", highlight=False)
    console.print(f"  step {m['step']}, data position {m.get('data', {})}, format {m['format']}", highlight=False)
    console.print(f"  written by {m['world_size']} ranks under the plan: {_plan_line(plan)}", highlight=False)
    n = sum(math.prod(s) for s in m["tensors"].values())
    console.print(f"  {len(m['tensors'])} parameters, {n:,} elements; optimizer state "
                  f"{'saved' if m.get('optimizer') else 'not saved'}; RNG states of {m['world_size']} ranks",
                  highlight=False)
    bad = _io().damaged(path, m)
    size = sum(s for s, _ in m["files"].values())
    console.print(f"  {len(m['files'])} files, {size / 2**20:.1f} MiB: " +
                  ("; ".join(bad) if bad else "all match their CRC-32"), highlight=False)
    others = _others(path.parent) if _io().STEP_DIR.match(path.name) else ""
    if others:
        console.print(f"  in {path.parent}: {others}", highlight=False)
    if args.tensors:
        table = Table(title="parameters (global shapes; placement under the plan that wrote them)",
                      title_justify="left")
        for col in ("name", "shape", "placement"):
            table.add_column(col)
        for name, shape in m["tensors"].items():
            table.add_row(name, "x".join(map(str, shape)), plan.get("params", {}).get(name, ""))
        console.print(table)
    return 1 if bad else 0


def _plan_line(plan: dict) -> str:
    deg = plan.get("degrees", {})
    mesh = " x ".join(f"{a}={deg[a]}" for a in ("pp", "dp", "tp") if deg.get(a, 1) > 1) or "one device"
    parts = [mesh, f"ZeRO-{plan.get('zero', 0)}", plan.get("precision", "fp32"), f"ac={plan.get('ac', 'none')}",
             f"{plan.get('num_micro_batches', 1)} micro-batch(es) of {plan.get('micro_batch_size', '?')}"]
    if deg.get("pp", 1) > 1:
        parts.append(f"schedule {plan.get('schedule')}")
    return f"{plan.get('model', '?')}: " + ", ".join(parts)


def _others(root: Path) -> str:
    """The other checkpoints beside this one: complete steps, and saves that never completed."""
    steps = sorted((int(m.group(1)), (p / _io().MARKER).exists()) for p in root.iterdir() if (m := _io().STEP_DIR.match(p.name)))
    partial = sorted(p.name for p in root.iterdir() if re.match(r"^\.tmp-step_\d+$", p.name))
    out = [f"complete steps {', '.join(str(s) for s, ok in steps if ok)}"] if steps else []
    if partial:
        out.append(f"incomplete (a save that did not finish, ignored): {', '.join(partial)}")
    return "; ".join(out)
