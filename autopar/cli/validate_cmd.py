"""`autopar validate`: predicted vs measured step time and peak memory of several plans on this machine."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from autopar.cli.plan_cmd import positive_int
from autopar.validate import DEFAULT_PLANS, combine, run_plan, statistics


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="train several plans here and compare predicted with measured time and memory",
                       description="Run each plan of a small model on the live ranks (torchrun), measure its step "
                                   "time and peak memory, and print them beside the planner's predictions.")
    p.add_argument("--model", default="gpt-tiny", help="model spec (as for `autopar plan`)")
    p.add_argument("--model-args", default="hidden=256,layers=4,seq=128", metavar="K=V,...")
    p.add_argument("--plans", default=";".join(DEFAULT_PLANS), metavar="FIX;FIX;...",
                   help="`;`-separated --fix strings, one per plan")
    p.add_argument("--nproc", type=positive_int, default=2, metavar="N", help="ranks to launch")
    p.add_argument("--batch", type=positive_int, default=8, metavar="B")
    p.add_argument("--steps", type=positive_int, default=10, metavar="S",
                   help="steps per plan: the first warms up, the median of the others times the step, the last "
                        "is traced for peak memory")
    p.add_argument("--rounds", type=positive_int, default=3, metavar="R",
                   help="run the plans round-robin R times and report each plan's median (default 3; one launch "
                        "can land 15-20%% off on a small host)")
    p.add_argument("--hardware", default="cpu", metavar="NAME_OR_TOML", help="the cost model to check")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    console = Console()
    plans = [f.strip() for f in args.plans.split(";") if f.strip()]
    runs: dict[str, list] = {fix: [] for fix in plans}
    for r in range(args.rounds):
        for fix in plans:
            console.print(f"round {r + 1}/{args.rounds}: running --fix {fix} on {args.nproc} ranks", highlight=False)
            runs[fix].append(run_plan(args.model, args.model_args, fix, args.nproc, args.batch, args.hardware,
                                      args.steps))
    rows = [combine(runs[fix]) for fix in plans]
    rounds = f", median of {args.rounds} rounds" if args.rounds > 1 else ""
    table = Table(title=f"predicted vs measured on this machine ({args.model}, {args.nproc} ranks, {args.hardware}"
                        f"{rounds})",
                  title_justify="left")
    for col in ("plan", ">predicted step", ">measured step", ">error", ">predicted MiB", ">measured MiB", ">error"):
        table.add_column(col.lstrip(">"), justify="right" if col.startswith(">") else "left")
    for r in rows:
        table.add_row(r.fix, f"{r.predicted_s * 1e3:.1f} ms", f"{r.measured_s * 1e3:.1f} ms",
                      f"{r.predicted_s / r.measured_s - 1:+.0%}", f"{r.predicted_bytes / 2**20:.1f}",
                      f"{r.measured_bytes / 2**20:.1f}", f"{r.predicted_bytes / r.measured_bytes - 1:+.0%}")
    console.print(table)
    s = statistics(rows)
    console.print(f"step time: mean |error| {s['step_mape']:.0%}, {s['step_within_25']}/{len(rows)} within ±25%, "
                  f"Spearman {s['spearman']:.2f}; memory: mean |error| {s['memory_mape']:.0%}, "
                  f"{s['memory_within_15']}/{len(rows)} within ±15%", highlight=False)
    return 0
