"""Runtime overhead of a compiled model against what a user would otherwise run, measured in one invocation.

    python tests/benchmarks/bench_runtime.py [--steps 5] [--rounds 8] [--json OUT]

(a) dp=2: `autopar.compile(..., fix={"dp": 2, "tp": 1})` against torch DDP, on 2 gloo ranks this script spawns
    (OMP_NUM_THREADS=1 each). Same model and seed, same global batch: DDP gets each rank's half, the compiled model
    gets the global batch and slices it itself (that is its API). Target: compiled / DDP <= 1.10.
(b) world 1: `autopar.compile(..., fix={"dp": 1, "tp": 1})` against the eager model, same batch. Target <= 1.05.

A step is forward + backward + AdamW step + zero_grad. After warm-up the two variants run in alternating rounds
(A B B A A B ...) of --steps steps each, so drift on the machine hits both alike; a step's time on 2 ranks is
the slower rank's. The tables show median step time and its forward / backward / optimizer parts, and the ratio.
Before timing, both variants' losses on the same batch are compared (they must compute the same thing), and the
dp=2 plan is shown: its degrees and the placement of every linear's activation input on the dp axis (S0 = the
batch is sharded). Measures, never asserts.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console
from rich.table import Table
from torch.nn.parallel import DistributedDataParallel as DDP

import autopar
from _machine import describe  # tests/benchmarks/_machine.py, on sys.path as this script's folder
from autopar.models import build_model, parse_model_args, sample_inputs

PHASES = ("step", "forward", "backward", "optimizer")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gpt")
    ap.add_argument("--model-args", default="layers=4,hidden=256,heads=8,vocab=1024,seq=128")
    ap.add_argument("--batch", type=int, default=16, help="global batch of the dp=2 comparison")
    ap.add_argument("--single-batch", type=int, default=8, help="batch of the world-1 comparison")
    ap.add_argument("--single-threads", type=int, default=os.cpu_count(), help="intra-op threads for world 1")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default: the model's)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=8, help="rounds per variant, alternating")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=("dp2", "world1"), help="run one comparison")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    return ap.parse_args(argv)


# -- one rank ---------------------------------------------------------------------------------------------------
def worker(rank: int, world: int, args: argparse.Namespace, port: int, threads: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(threads)
    try:
        result = measure(rank, world, args)
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def measure(rank: int, world: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    model, info = build_model(args.model, parse_model_args(args.model_args))
    seq = args.seq or info.seq
    batch = args.batch if world > 1 else args.single_batch
    baseline = copy.deepcopy(model)  # same initial weights as the model autopar compiles
    compiled = autopar.compile(model, sample_inputs=sample_inputs(info, batch, seq), fix={"dp": world, "tp": 1})
    if world > 1:
        baseline = DDP(baseline)
    gen = torch.Generator().manual_seed(args.seed + 1)
    batches = [tuple(torch.randint(0, info.vocab, (batch, seq), generator=gen) for _ in range(2)) for _ in range(4)]
    share = batch // world
    local = [tuple(t[rank * share:(rank + 1) * share] for t in b) for b in batches]
    variants = {"autopar": (compiled, batches), "baseline": (baseline, local)}
    losses = first_losses(variants, world)
    times = {name: [] for name in variants}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, (m, _) in variants.items()}
    for name, (m, data) in variants.items():
        run_steps(m, optimizers[name], data, args.warmup)
    for r in range(args.rounds):
        order = ("autopar", "baseline") if r % 2 == 0 else ("baseline", "autopar")  # A B B A A B ...
        for name in order:
            m, data = variants[name]
            dist.barrier()
            times[name] += run_steps(m, optimizers[name], data, args.steps)
    gathered = [None] * world
    dist.all_gather_object(gathered, times)
    # A step lasts as long as its slowest rank: keep that rank's row (step and its phases).
    slowest = {name: [max((per_rank[name][i] for per_rank in gathered), key=lambda row: row[0])
                      for i in range(len(times[name]))] for name in times}
    return {"world": world, "batch": batch, "seq": seq, "threads": torch.get_num_threads(), "losses": losses,
            "plan": plan_summary(compiled), "times": slowest,
            "n_params": sum(p.numel() for p in baseline.parameters())}


def first_losses(variants: dict, world: int) -> dict[str, float]:
    """Loss of each variant on the first batch, before any training: the global mean for both."""
    out = {}
    with torch.no_grad():
        for name, (m, data) in variants.items():
            loss = m(*data[0]).detach().clone()
            if name == "baseline" and world > 1:  # DDP's loss is this rank's mean; average the equal shares
                dist.all_reduce(loss)
                loss /= world
            out[name] = loss.item()
    return out


def run_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, data: list, steps: int) -> list[list[float]]:
    """Per step: [step, forward, backward, optimizer] seconds (CPU ops are synchronous, so the marks are exact)."""
    out = []
    for i in range(steps):
        tokens, targets = data[i % len(data)]
        t0 = time.perf_counter()
        loss = model(tokens, targets)
        t1 = time.perf_counter()
        loss.backward()  # includes the gradient all-reduce (DDP and autopar both wait for it at the end)
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        out.append([t3 - t0, t1 - t0, t2 - t1, t3 - t2])
    return out


def plan_summary(compiled) -> dict:
    """Degrees, and the dp-axis placement of each linear's activation input (S0: batch-sharded)."""
    plan = compiled.plan
    linear = {n: d for n, d in plan.strategies.items() if "linear" in d.op}
    dp_axis = plan.axis_names.index("dp")
    inputs = Counter(d.ins[0].split("/")[dp_axis] for d in linear.values())
    code = compiled.code
    comms = Counter(c for c in ("all_reduce", "all_gather", "reduce_scatter", "grad_all_reduce", "slice")
                    for _ in range(code.count(f".{c}(")))
    return {"degrees": plan.degrees, "linear_inputs_on_dp": dict(inputs), "n_linear": len(linear),
            "example": {n: f"{d.op} ins={d.ins} outs={d.outs}" for n, d in list(linear.items())[:3]},
            "collectives_in_forward": dict(comms), "grad_buckets": _buckets(compiled)}


def _buckets(compiled) -> int:
    sync = getattr(compiled, "_sync", None)  # runtime detail, read only to describe the plan
    return len(sync.buckets) if sync is not None else 0


# -- driver -----------------------------------------------------------------------------------------------------
def launch(world: int, args: argparse.Namespace, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.spawn(worker, args=(world, args, _free_port(), threads, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def medians(result: dict) -> dict[str, dict[str, float]]:
    return {name: {ph: statistics.median(step[k] for step in steps) for k, ph in enumerate(PHASES)}
            for name, steps in result["times"].items()}


def round_ratios(result: dict, steps: int) -> list[float]:
    """autopar / baseline median step time within each round pair: the two ran back to back, so slow drift on a
    shared machine cancels out of each ratio."""
    a, b = result["times"]["autopar"], result["times"]["baseline"]
    return [statistics.median(s[0] for s in a[i:i + steps]) / statistics.median(s[0] for s in b[i:i + steps])
            for i in range(0, len(a), steps)]


def table(title: str, baseline: str, result: dict, target: float, steps: int) -> Table:
    med = medians(result)
    t = Table(title=title, title_justify="left")
    t.add_column("variant")
    for ph in PHASES:
        t.add_column(f"{ph} ms", justify="right")
    t.add_column("step p25-p75 ms", justify="right")
    t.add_column("steps", justify="right")
    t.add_column("loss @ batch 0", justify="right")
    for name, label in (("baseline", baseline), ("autopar", "autopar.compile")):
        q = statistics.quantiles([s[0] for s in result["times"][name]], n=4)
        t.add_row(label, *(f"{1e3 * med[name][ph]:.1f}" for ph in PHASES), f"{1e3 * q[0]:.1f}-{1e3 * q[2]:.1f}",
                  str(len(result["times"][name])), f"{result['losses'][name]:.6f}")
    ratio = {ph: med["autopar"][ph] / med["baseline"][ph] for ph in PHASES}
    verdict = "met" if ratio["step"] <= target else "MISSED"
    t.add_row(f"ratio (target ≤ {target:.2f}: {verdict})", *(f"{ratio[ph]:.3f}" for ph in PHASES), "", "", "",
              style="bold")
    per_round = round_ratios(result, steps)
    t.caption = (f"step ratio per round pair: median {statistics.median(per_round):.3f}, range "
                 f"{min(per_round):.3f}-{max(per_round):.3f} over {len(per_round)} rounds")
    t.caption_justify = "left"
    return t


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
    console.print(describe())
    console.print(f"model {args.model} ({args.model_args}); {args.warmup} warm-up steps, then {args.rounds} rounds "
                  f"x {args.steps} steps per variant, alternating")
    results = {}
    if args.only in (None, "dp2"):
        os.environ["OMP_NUM_THREADS"] = "1"  # 2 ranks on 2 cores: one thread each, as torchrun sets it
        with console.status("dp=2: autopar vs DDP on 2 gloo ranks"):
            results["dp2"] = launch(2, args, threads=1)
        show_plan(console, results["dp2"]["plan"])
        console.print(table(f"(a) dp=2, global batch {args.batch} (DDP: {args.batch // 2} per rank), 1 thread/rank",
                            "torch DDP", results["dp2"], 1.10, args.steps))
    if args.only in (None, "world1"):
        os.environ["OMP_NUM_THREADS"] = str(args.single_threads)
        with console.status("world 1: autopar vs eager"):
            results["world1"] = launch(1, args, threads=args.single_threads)
        console.print(table(f"(b) world 1, batch {args.single_batch}, {results['world1']['threads']} threads",
                            "eager", results["world1"], 1.05, args.steps))
    console.print(f"after: {describe()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "cores": os.cpu_count(),
                                               "args": vars(args), "results": results}, indent=1))
        console.print(f"wrote {args.json}")
    return 0


def show_plan(console: Console, plan: dict) -> None:
    console.print(f"compiled.plan.degrees = {plan['degrees']}")
    console.print(f"linear activation inputs on the dp axis: {plan['linear_inputs_on_dp']} "
                  f"(of {plan['n_linear']} linear nodes; S0 = batch sharded over dp)")
    for name, text in plan["example"].items():
        console.print(f"  {name}: {text}")
    console.print(f"collectives in the generated forward: {plan['collectives_in_forward']}; "
                  f"gradient buckets: {plan['grad_buckets']}")


if __name__ == "__main__":
    sys.exit(main())
