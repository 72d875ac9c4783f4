"""Pipeline bubble, measured: step time of pp=2 for one global batch cut into m = 1, 2, 4, 8 micro-batches.

    python tests/benchmarks/bench_pipeline.py [--ms 1,2,4,8] [--schedule gpipe] [--rounds 4] [--json OUT]

The bubble model (GPipe, Huang et al. 2019, arXiv 1811.06965; Narayanan et al. 2021, arXiv 2104.04473 Sec. 2.2):
with p stages and m micro-batches, a step lasts m + p - 1 micro-batch slots, each 1/m of one stage's work on the
whole batch, so t(m) / t(1) = (m + p - 1) / (m p): 1, 0.75, 0.625, 0.5625 for p = 2. Smaller micro-batches also
run less efficiently (fixed per-op and per-message costs), which the model leaves out; the table shows both.
Two gloo ranks this script spawns (OMP_NUM_THREADS=1 each), the stage plan made by today's planner at each
micro-batch size. A step's time is the slower rank's; every m is timed in each of --rounds rounds (order
alternating) and the median kept. Measures, never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console
from rich.table import Table

import autopar
from _machine import describe  # tests/benchmarks/_machine.py, on sys.path as this script's folder
from autopar.models import build_model, parse_model_args, sample_inputs
from autopar.plan import Plan
from autopar.planning import make_plan

PP = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gpt")
    ap.add_argument("--model-args", default="layers=4,hidden=256,heads=8,vocab=1024,seq=128")
    ap.add_argument("--batch", type=int, default=32, help="global batch per step, the same for every m")
    ap.add_argument("--ms", default="1,2,4,8", help="micro-batch counts to measure")
    ap.add_argument("--schedule", default="gpipe", choices=("gpipe", "1f1b"), help="1f1b needs m >= 2")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per m")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per m and round")
    ap.add_argument("--rounds", type=int, default=4, help="rounds over every m, the order alternating")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    return ap.parse_args(argv)


def pipeline_plan(args: argparse.Namespace, m: int) -> Plan:
    """Two stages of equal layer counts over a one-device stage mesh planned at micro-batch batch / m."""
    model_args = parse_model_args(args.model_args)
    plan = make_plan(args.model, devices=1, hardware="cpu", batch=args.batch, model_args=model_args,
                     fix={"dp": 1, "tp": 1, "mbs": args.batch // m})
    _, info = build_model(args.model, model_args, device="meta")
    layers = info.config.layers
    stages = [[f"blocks.{i}" for i in range(c * layers // PP, (c + 1) * layers // PP)] for c in range(PP)]
    return replace(plan, degrees={**plan.degrees, "pp": PP}, devices=PP, schedule=args.schedule, stages=stages,
                   num_micro_batches=m)


# -- one rank ---------------------------------------------------------------------------------------------------
def worker(rank: int, args: argparse.Namespace, plans: list[str], port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=PP)
    torch.set_num_threads(1)
    try:
        result = {"concurrency": concurrency(rank), "runs": measure(args, [Plan.load(p) for p in plans])}
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def concurrency(rank: int) -> float:
    """How much of the ranks' compute the machine runs at once right now: the same matmul loop on each rank alone,
    then on all together; PP when every rank has a core of its own, 1 when they share one (other work on the
    machine). A pipeline can only hide its bubble in the first case."""
    a = torch.randn(384, 384)

    def spin() -> float:
        t0 = time.perf_counter()
        for _ in range(100):
            a @ a
        return time.perf_counter() - t0

    alone = 0.0
    for r in range(PP):
        dist.barrier()
        if rank == r:
            alone = spin()
        dist.barrier()
    together = spin()
    times = torch.tensor([alone, together], dtype=torch.float64)
    dist.all_reduce(times[:1])  # sum of the ranks alone
    dist.all_reduce(times[1:], op=dist.ReduceOp.MAX)  # the slowest rank together
    return (times[0] / times[1]).item()


def measure(args: argparse.Namespace, plans: list[Plan]) -> list[dict]:
    """Every m compiled side by side, then timed in rounds that rotate the order, so the load other work puts on
    the machine drifts over all of them alike."""
    variants = []
    for plan in plans:
        torch.manual_seed(args.seed)
        model, info = build_model(args.model, parse_model_args(args.model_args))
        compiled = autopar.compile(model, sample_inputs=sample_inputs(info, args.batch, info.seq), plan=plan)
        variants.append((plan, compiled, compiled.optimizer(torch.optim.AdamW, lr=1e-4)))
    gen = torch.Generator().manual_seed(args.seed + 1)
    batch = tuple(torch.randint(0, info.vocab, (args.batch, info.seq), generator=gen) for _ in range(2))
    times: list[list[float]] = [[] for _ in variants]
    for _, compiled, opt in variants:
        run_steps(compiled, opt, batch, args.warmup)
    for r in range(args.rounds):
        for i in (range(len(variants)) if r % 2 == 0 else reversed(range(len(variants)))):
            times[i] += run_steps(variants[i][1], variants[i][2], batch, args.steps)
    return [{"m": plan.num_micro_batches, "micro_batch": plan.micro_batch_size, "median_s": statistics.median(t),
             "times": t} for (plan, _, _), t in zip(variants, times)]


def run_steps(compiled, opt, batch: tuple, steps: int) -> list[float]:
    """Seconds per training step (train_step + optimizer), the slower rank's."""
    out = []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        compiled.train_step(*batch)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds = torch.tensor(time.perf_counter() - t0, dtype=torch.float64)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # a step lasts as long as its slower rank
        out.append(seconds.item())
    return out


# -- driver -----------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def table(results: list[dict], schedule: str) -> Table:
    t = Table(title=f"pp={PP} {schedule}, one global batch in m micro-batches", title_justify="left")
    for col in ("m", "micro-batch", "step ms (median)", "p25-p75 ms", "t(m) / t(1)", "bubble model"):
        t.add_column(col, justify="right")
    base = results[0]["median_s"] * results[0]["m"] * PP / (results[0]["m"] + PP - 1)  # one stage's work, no bubble
    for r in results:
        q = statistics.quantiles(r["times"], n=4) if len(r["times"]) > 1 else [r["median_s"]] * 3
        model = (r["m"] + PP - 1) / (r["m"] * PP)
        t.add_row(str(r["m"]), str(r["micro_batch"]), f"{1e3 * r['median_s']:.1f}",
                  f"{1e3 * q[0]:.1f}-{1e3 * q[2]:.1f}", f"{r['median_s'] / base:.3f}", f"{model:.3f}")
    return t


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ms = [int(m) for m in args.ms.split(",")]
    if any(args.batch % m for m in ms) or (args.schedule == "1f1b" and min(ms) < PP):
        sys.exit(f"every m must divide --batch {args.batch} (and be >= {PP} for 1f1b)")
    console = Console()
    console.print(describe())
    with tempfile.TemporaryDirectory() as tmp:
        plans = []
        for m in ms:
            plans.append(str(Path(tmp) / f"plan_m{m}.json"))
            pipeline_plan(args, m).save(plans[-1])
        out = str(Path(tmp) / "result.json")
        os.environ["OMP_NUM_THREADS"] = "1"
        mp.spawn(worker, args=(args, plans, _free_port(), out), nprocs=PP, join=True)
        results = json.loads(Path(out).read_text())
    console.print(table(results["runs"], args.schedule))
    console.print(f"concurrency of the {PP} ranks on this machine now: {results['concurrency']:.2f} of {PP} "
                  "(1 = they share one core, and no schedule can overlap their stages)")
    console.print("t(m) / t(1) is normalised so that m = 1 matches the model; the bubble model counts only idle "
                  "slots, not the per-micro-batch overheads that grow with m")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": describe(), "args": vars(args), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
