"""Planner wall clock as a user meets it: the whole `autopar plan` process, timed from outside.

    python tests/benchmarks/bench_planner.py [--repeat N] [--json OUT] [--case NAME ...]

Each case runs `python -m autopar.cli plan ... --json tmp.json` (the `autopar` command) in a subprocess; the wall
clock (time.perf_counter around subprocess.run) includes interpreter start-up, importing torch, building the model
on meta, tracing, the mesh/micro-batch search and printing. From the saved plan it also reads the planner's own time
(`solver.seconds`: tracing + ILP building + solving, all candidates), the best candidate's ILP solve time
(`solver.solve_s`) and ILP size, and the CPU seconds (user + system) of the process and its forked workers: on a
machine shared with other work the wall clock moves with the load, the CPU time much less. Prints one rich table
of medians; measures, never asserts.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from _machine import describe  # tests/benchmarks/_machine.py, on sys.path as this script's folder


@dataclass(frozen=True, kw_only=True)
class Case:
    key: str  # for --case
    name: str
    argv: tuple[str, ...]  # after `autopar plan`
    target_s: float | None = None  # acceptance bound on the wall clock here, if the case has one
    or_within: tuple[str, float] | None = None  # or: at most this many times another case's wall clock in this run
    reference: str = ""  # what others report for the same problem


LLAMA = ("--hardware", "h100-80gb-sxm", "--seq", "8192")
CASES = (
    # One node to thousands of GPUs (issue 19): each <= 5 s, or <= 2x the 64-GPU case for the largest (the two
    # 1024-GPU cases).
    Case(key="8b-8", name="llama3-8b 8×h100", target_s=5.0,
         argv=("llama3-8b", "--devices", "8", "--batch", "64", *LLAMA)),
    # meta-pytorch/autoparallel reports ~50 s for Llama 3 8B on 64 H100s.
    Case(key="8b-64", name="llama3-8b 64×h100", target_s=5.0, reference="autoparallel ~50 s",
         argv=("llama3-8b", "--devices", "64", "--batch", "64", *LLAMA)),
    Case(key="8b-512", name="llama3-8b 512×h100", target_s=5.0,
         argv=("llama3-8b", "--devices", "512", "--batch", "512", *LLAMA)),
    Case(key="70b-1024", name="llama3-70b 1024×h100", target_s=5.0, or_within=("8b-64", 2.0),
         argv=("llama3-70b", "--devices", "1024", "--batch", "1024", *LLAMA)),
    Case(key="175b-1024", name="gpt3-175b 1024×a100", target_s=5.0, or_within=("8b-64", 2.0),
         argv=("gpt3-175b", "--devices", "1024", "--hardware", "a100-80gb-sxm", "--batch", "1536", "--seq", "2048")),
    # GPT 1.5B-class (Megatron-LM's 24 x 2304 config) on 32 A100s.
    Case(key="gpt-32", name="gpt 24×2304 32×a100",
         argv=("gpt", "--model-args", "layers=24,hidden=2304,heads=24,vocab=51200,seq=2048", "--devices", "32",
               "--hardware", "a100-80gb-sxm", "--batch", "512", "--seq", "2048")),
)


def run_once(case: Case, workdir: Path, python: str = sys.executable) -> dict:
    """One `autopar plan` process: its wall clock and the solver stats it saved, or why it failed. `python` is the
    interpreter (the environment, hence the checkout of autopar) that plans."""
    out = workdir / "plan.json"
    cmd = [python, "-m", "autopar.cli", "plan", *case.argv, "--json", str(out)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)  # the CLI and, once it waited for them, its workers
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)  # no checkout on sys.path: the venv's
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    if done.returncode != 0:  # keep measuring the other cases; the table says what broke
        last = (done.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        return {"wall_s": wall, "cpu_s": cpu, "error": f"exit {done.returncode}: {last}", "stderr": done.stderr}
    plan = json.loads(out.read_text())
    return {"wall_s": wall, "cpu_s": cpu, "solver": plan["solver"], "degrees": plan["degrees"],
            "micro_batches": plan["num_micro_batches"]}


def summarise(case: Case, runs: list[dict]) -> dict:
    failed = [r for r in runs if "error" in r]
    if failed:
        return {"case": case.name, "command": "autopar plan " + " ".join(case.argv), "repeat": len(runs),
                "error": failed[0]["error"], "stderr": failed[0]["stderr"], "failed_runs": len(failed)}
    walls = [r["wall_s"] for r in runs]
    planner = [r["solver"]["seconds"] for r in runs]
    last = runs[-1]
    return {"case": case.name, "command": "autopar plan " + " ".join(case.argv), "repeat": len(runs),
            "wall_s": statistics.median(walls), "wall_min_s": min(walls), "wall_max_s": max(walls),
            "cpu_s": statistics.median(r["cpu_s"] for r in runs),
            "planner_s": statistics.median(planner),
            "best_solve_s": statistics.median(r["solver"].get("solve_s", float("nan")) for r in runs),
            "variables": last["solver"].get("variables"), "constraints": last["solver"].get("constraints"),
            "candidates": last["solver"].get("candidates"), "status": last["solver"].get("status"),
            "mesh": " ".join(f"{a}={last['degrees'][a]}" for a in ("pp", "dp", "cp", "tp")
                             if a in ("dp", "tp") or last["degrees"].get(a, 1) > 1) + f" m={last['micro_batches']}",
            "key": case.key, "target_s": case.target_s, "or_within": case.or_within, "reference": case.reference}


def table(rows: list[dict]) -> Table:
    t = Table(title="autopar plan: wall clock of the whole CLI process (median over --repeat)", title_justify="left")
    for col in ("case", "wall s", "min-max s", "cpu s", "planner s", "outside s", "best ILP s", "ILP vars × cons",
                "meshes", "chosen", "target", "reference"):
        t.add_column(col, justify="left" if col in ("case", "chosen", "reference") else "right")
    for r in rows:
        if "error" in r:
            t.add_row(r["case"], "[red]failed[/red]")  # the reason is printed under the table
            continue
        target = "" if r["target_s"] is None else (
            f"≤ {r['target_s']:.0f} s {'met' if r['wall_s'] <= r['target_s'] else 'MISSED'}")
        other = next((o for o in rows if r.get("or_within") and o.get("key") == r["or_within"][0] and "wall_s" in o),
                     None)
        if other is not None and r["wall_s"] > r["target_s"]:  # the other bound, for the largest case
            bound = r["or_within"][1] * other["wall_s"]
            verdict = "met" if r["wall_s"] <= bound else "MISSED"
            target += f"; ≤ {r['or_within'][1]:g}× {other['key']} ({bound:.2f} s) {verdict}"
        t.add_row(r["case"], f"{r['wall_s']:.2f}", f"{r['wall_min_s']:.2f}-{r['wall_max_s']:.2f}", f"{r['cpu_s']:.2f}",
                  f"{r['planner_s']:.2f}", f"{r['wall_s'] - r['planner_s']:.2f}", f"{r['best_solve_s']:.2f}",
                  f"{r['variables']:,} × {r['constraints']:,}", str(r["candidates"]), r["mesh"], target,
                  r["reference"])
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=1, help="runs per case (the table shows the median)")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    ap.add_argument("--case", action="append", choices=[c.key for c in CASES],
                    help="run only this case (repeatable)")
    ap.add_argument("--against", metavar="PYTHON",
                    help="also time each run with this interpreter (e.g. another checkout's venv), interleaved, so "
                         "that load on a shared machine hits both alike; prints the median wall and CPU ratios")
    args = ap.parse_args(argv)
    cases = [c for c in CASES if not args.case or c.key in args.case]
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 180)
    console.print(describe())
    rows, base_rows = [], []
    with tempfile.TemporaryDirectory() as tmp, console.status("planning") as status:
        for case in cases:
            runs, base = [], []
            for i in range(args.repeat):
                for python, into, who in [(sys.executable, runs, "")] + ([(args.against, base, " (against)")]
                                                                        if args.against else []):
                    status.update(f"{case.name}{who}: run {i + 1}/{args.repeat}")
                    into.append(run_once(case, Path(tmp), python))
                    done = into[-1]
                    said = done["error"] if "error" in done else f"{done['solver']['seconds']:.2f} s planner"
                    console.log(f"{case.name}{who} run {i + 1}: {done['wall_s']:.2f} s wall, "
                                f"{done['cpu_s']:.2f} s CPU, {said}")
            rows.append(summarise(case, runs))
            if base:
                base_rows.append(summarise(case, base))
    console.print(table(rows))
    if base_rows:
        console.print(table(base_rows))
        for r, b in zip(rows, base_rows):
            if "error" not in r and "error" not in b:
                console.print(f"{r['case']}: wall {r['wall_s'] / b['wall_s']:.2f}x, cpu {r['cpu_s'] / b['cpu_s']:.2f}x "
                              f"of {args.against}")
    for r in rows:
        if "error" in r:
            console.print(f"[red]{r['case']}: {r['failed_runs']}/{r['repeat']} runs failed[/red] ({r['error']}); "
                          f"reproduce with: python -m autopar.cli {r['command'].removeprefix('autopar ')}")
    console.print(f"after: {describe()}")
    console.print("cpu s = user + system seconds of the CLI and its forked workers (all cores); planner s = "
                  "solver.seconds from the plan (tracing + ILP build + solve, every candidate); outside s = wall - "
                  "planner (start-up, imports, model build, report); best ILP s = solve time of the chosen "
                  "candidate's ILP.")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
        console.print(f"wrote {args.json}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
