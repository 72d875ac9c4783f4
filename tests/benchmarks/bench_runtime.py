"""Runtime overhead of a compiled model against what a user would otherwise run, measured in one invocation.

    python tests/benchmarks/bench_runtime.py [--steps 5] [--rounds 8] [--only dp2,zero3,tp2,pp2,world1,cp2] [--fuse]
        [--json OUT]

Each comparison runs on gloo ranks this script spawns (OMP_NUM_THREADS=1 each), same model and seed, same global
batch; the compiled model gets the global batch and slices it itself (that is its API). Target: ratio <= 1.05.
(a) dp2:    `autopar.compile(..., fix={"dp": 2, "tp": 1})` against torch DDP (each rank its half of the batch).
(b) zero3:  fix={"dp": 2, "tp": 1, "zero": 3} against FSDP2 by hand: `fully_shard` on every block, then the root,
            reshard_after_forward=True (each rank its half of the batch).
(c) tp2:    fix={"dp": 1, "tp": 2} (autopar's own tensor/sequence-parallel layout) against torch's
            `parallelize_module` with the torchtitan recipe: norms SequenceParallel, q/k/v and fc ColwiseParallel,
            the projections RowwiseParallel(output_layouts=Shard(1)), the head ColwiseParallel with replicated logits
            (untied embeddings, since torch's styles shard a tied weight two ways). Every rank gets the whole batch.
(d) pp2:    the effect of overlapping the data-parallel reduction with the pipeline's last backward passes:
            fix={"pp": 2, "dp": 2, "tp": 1} with the overlap (the runtime's default) against the same program
            reducing after the schedule (as before issue 19). 4 ranks share the cores, so this shows the cost of the
            overlap machinery here more than its gain; on GPUs the reduction runs beside the backward.
(e) world1: fix={"dp": 1, "tp": 1} against the eager model, same batch, in one process.
(f) cp2:    fix={"cp": 2} (each sample's sequence split over 2 ranks, ring attention) against autopar's dp=2 on the
            same ranks (the batch split instead); beside the ratio, each one's measured step against its plan's
            predicted step (CPU hardware file; target within +-25%).

A step is forward + backward + AdamW step + zero_grad (pp2: train_step, its forward and backward together). After
warm-up the two variants run in alternating rounds (A B B A A B ...) of --steps steps each, so drift on the machine
hits both alike; a step's time on several ranks is the slower rank's. The tables show median step time and its
forward / backward / optimizer parts, and the ratio, the per-round-pair ratios beside it. Before timing, both
variants' losses on the same batch are compared (they must compute the same thing), and the dp2 plan is shown.
autopar compiles with the planner's default for the CPU hardware file: without the fused kernels, whose torch
reference paths run on a CPU (the Triton kernels need CUDA); --fuse compiles every autopar variant with them.
Measures, never asserts.
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
    ap.add_argument("--batch", type=int, default=16, help="global batch of the multi-rank comparisons")
    ap.add_argument("--single-batch", type=int, default=8, help="batch of the world-1 comparison")
    ap.add_argument("--single-threads", type=int, default=os.cpu_count(), help="intra-op threads for world 1")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default: the model's)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=8, help="rounds per variant, alternating")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=",".join(COMPARISONS), help="comma-separated comparisons to run")
    ap.add_argument("--fuse", action="store_true",
                    help="compile with the fused kernels (off by default on a CPU: their torch reference paths run, "
                         "which cost forward time the Triton kernels are for saving on GPUs)")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    return ap.parse_args(argv)


# -- the comparisons: (world, autopar's fix, baseline label, model-args overrides) ---------------------------------
COMPARISONS = {
    "dp2": (2, {"dp": 2, "tp": 1}, "torch DDP", {}),
    "zero3": (2, {"dp": 2, "tp": 1, "zero": 3}, "FSDP2 fully_shard", {}),
    "tp2": (2, {"dp": 1, "tp": 2}, "torch parallelize_module", {"tie_embeddings": False}),
    "pp2": (4, {"pp": 2, "dp": 2, "tp": 1}, "reduce after the schedule", {}),
    "world1": (1, {"dp": 1, "tp": 1}, "eager", {}),
    "cp2": (2, {"cp": 2, "dp": 1, "tp": 1}, "autopar dp=2", {}),
}


# -- one rank ---------------------------------------------------------------------------------------------------
def worker(rank: int, world: int, args: argparse.Namespace, port: int, threads: int, out: str, name: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(threads)
    try:
        result = measure(rank, world, args, name)
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def measure(rank: int, world: int, args: argparse.Namespace, name: str) -> dict:
    _, fix, _, overrides = COMPARISONS[name]
    fuse = {"fuse": True} if args.fuse else {}  # unpinned: the planner's default, unfused on the CPU hardware file
    fix = {**fix, **fuse}
    torch.manual_seed(args.seed)
    model, info = build_model(args.model, {**parse_model_args(args.model_args), **overrides})
    seq = args.seq or info.seq
    batch = args.batch if world > 1 else args.single_batch
    baseline = copy.deepcopy(model)  # same initial weights as the model autopar compiles
    compiled = autopar.compile(model, sample_inputs=sample_inputs(info, batch, seq), fix=fix)
    gen = torch.Generator().manual_seed(args.seed + 1)
    batches = [tuple(torch.randint(0, info.vocab, (batch, seq), generator=gen) for _ in range(2)) for _ in range(4)]
    share = batch // world
    local = [tuple(t[rank * share:(rank + 1) * share] for t in b) for b in batches]
    if name in ("dp2", "zero3"):
        baseline, data = (DDP(baseline) if name == "dp2" else _fsdp2(baseline, world)), local
    elif name == "tp2":
        baseline, data = _torch_tp(baseline, world), batches
    elif name == "pp2":
        baseline, data = _reduce_after_schedule(autopar.compile(baseline, sample_inputs=sample_inputs(
            info, batch, seq), plan=compiled.plan)), batches
    elif name == "cp2":  # the same 2 ranks splitting the batch instead of each sample's sequence
        baseline, data = autopar.compile(baseline, sample_inputs=sample_inputs(info, batch, seq),
                                         fix={"dp": 2, "tp": 1, "zero": 0, **fuse}), batches
    else:
        data = batches
    variants = {"autopar": (compiled, batches), "baseline": (baseline, data)}
    losses = first_losses(variants, name)
    times = {name: [] for name in variants}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, (m, _) in variants.items()}
    for v, (m, d) in variants.items():
        run_steps(m, optimizers[v], d, args.warmup)
    for r in range(args.rounds):
        order = ("autopar", "baseline") if r % 2 == 0 else ("baseline", "autopar")  # A B B A A B ...
        for v in order:
            m, d = variants[v]
            dist.barrier()
            times[v] += run_steps(m, optimizers[v], d, args.steps)
    gathered = [None] * world
    dist.all_gather_object(gathered, times)
    # A step lasts as long as its slowest rank: keep that rank's row (step and its phases).
    slowest = {v: [max((per_rank[v][i] for per_rank in gathered), key=lambda row: row[0])
                   for i in range(len(times[v]))] for v in times}
    predicted = {v: m.planned.predicted.step_time_s for v, (m, _) in variants.items() if hasattr(m, "planned")}
    return {"world": world, "batch": batch, "seq": seq, "threads": torch.get_num_threads(), "losses": losses,
            "predicted_step_s": predicted,
            "plan": plan_summary(compiled), "times": slowest,
            "n_params": sum(p.numel() for p in model.parameters())}


def _fsdp2(model: torch.nn.Module, world: int) -> torch.nn.Module:
    """ZeRO-3 as a user writes it with FSDP2: each block its own unit, then the root (reshard after forward)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    return fully_shard(model, mesh=mesh, reshard_after_forward=True)


def _torch_tp(model: torch.nn.Module, world: int) -> torch.nn.Module:
    """Megatron-SP with torch's tensor-parallel styles, as torchtitan's llama3 parallelize.py applies them; the
    attention reads its local heads (torchtitan's models are written with local shapes, ours with global ones)."""
    import types

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                                   RowwiseParallel, SequenceParallel, parallelize_module)

    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        block.attn.heads //= world
        block.attn.forward = types.MethodType(_local_attention, block.attn)
        parallelize_module(block, mesh, {
            "ln1": SequenceParallel(), "ln2": SequenceParallel(),
            "attn": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(), "attn.v": ColwiseParallel(),
            "attn.proj": RowwiseParallel(output_layouts=Shard(1)),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.fc": ColwiseParallel(), "mlp.proj": RowwiseParallel(output_layouts=Shard(1))})
    return parallelize_module(model, mesh, {
        # embeddings replicated (wte + wpe), then the residual stream split along the sequence
        "drop": PrepareModuleOutput(output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),),
                                    use_local_output=True),
        "ln_f": SequenceParallel(),
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())})


def _local_attention(self, x: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    b, s = x.shape[:2]
    q, k, v = (proj(x).view(b, s, self.heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.drop(self.proj(y.transpose(1, 2).reshape(b, s, -1)))


def _reduce_after_schedule(compiled):
    """The same pipelined program with the data-parallel reduction after the schedule, as before the overlap: its
    gradient hooks off during the schedule (compiled.no_sync), every bucket reduced at the end (reduce_all)."""
    sync = compiled._sync  # runtime detail, reached into only to switch the overlap off for the comparison
    if sync is not None:
        sync.pipelined = lambda m: compiled.no_sync()
    return compiled


def first_losses(variants: dict, name: str) -> dict[str, float]:
    """Loss of each variant on the first batch, before any training: the global mean for both."""
    out = {}
    for v, (m, data) in variants.items():
        if name == "pp2":  # a pipeline runs whole steps; its gradients are dropped before timing
            loss = m.train_step(*data[0]).detach().clone()
            m.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                loss = m(*data[0]).detach().clone()
        if v == "baseline" and name in ("dp2", "zero3"):  # this rank's mean; average the equal shares
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        out[v] = loss.item()
    return out


def run_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, data: list, steps: int) -> list[list[float]]:
    """Per step: [step, forward, backward, optimizer] seconds (CPU ops are synchronous, so the marks are exact);
    a pipeline's forward and backward are one call (train_step), shown as backward."""
    out = []
    for i in range(steps):
        tokens, targets = data[i % len(data)]
        t0 = time.perf_counter()
        pipelined = getattr(model, "pipeline", None) is not None
        loss = None if pipelined else model(tokens, targets)
        t1 = time.perf_counter()
        if pipelined:
            model.train_step(tokens, targets)
        else:
            loss.backward()  # includes the gradient reduction (every variant waits for it at the end)
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
    return {"degrees": compiled.planned.degrees, "fuse": plan.fuse, "linear_inputs_on_dp": dict(inputs),
            "n_linear": len(linear),
            "example": {n: f"{d.op} ins={d.ins} outs={d.outs}" for n, d in list(linear.items())[:3]},
            "collectives_in_forward": dict(comms), "grad_buckets": _buckets(compiled)}


def _buckets(compiled) -> int:
    sync = getattr(compiled, "_sync", None)  # runtime detail, read only to describe the plan
    return len(sync.buckets) if sync is not None else 0


# -- driver -----------------------------------------------------------------------------------------------------
def launch(name: str, args: argparse.Namespace, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        world = COMPARISONS[name][0]
        mp.spawn(worker, args=(world, args, _free_port(), threads, out, name), nprocs=world, join=True)
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
    results, summary = {}, {}
    for name in [n.strip() for n in args.only.split(",") if n.strip()]:
        world, fix, label, overrides = COMPARISONS[name]
        threads = args.single_threads if world == 1 else 1  # ranks on 2 cores: one thread each, as torchrun sets
        os.environ["OMP_NUM_THREADS"] = str(threads)
        with console.status(f"{name}: autopar vs {label} on {world} gloo rank(s)"):
            results[name] = launch(name, args, threads=threads)
        if name == "dp2":
            show_plan(console, results[name]["plan"])
        extra = f", model-args {overrides}" if overrides else ""
        extra += f", fused kernels {'on' if results[name]['plan']['fuse'] else 'off'}"
        console.print(table(f"{name}: fix={fix} vs {label}, {world} rank(s), batch {results[name]['batch']}, "
                            f"{results[name]['threads']} thread(s)/rank{extra}", label, results[name], 1.05,
                            args.steps))
        summary[name] = statistics.median(round_ratios(results[name], args.steps))
        if name == "cp2":
            console.print(predictor_line(results[name]))
    console.print("median step ratio per round pair (autopar / baseline; target <= 1.05): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    console.print(f"after: {describe()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "cores": os.cpu_count(),
                                               "args": vars(args), "results": results}, indent=1))
        console.print(f"wrote {args.json}")
    return 0


def predictor_line(result: dict) -> str:
    """cp2: each variant's measured median step against the plan's predicted step (cost_models/hardware/cpu.toml;
    target within +-25%), and the cp / dp ratio measured against predicted (both measured in this run)."""
    med, pred = medians(result), result["predicted_step_s"]
    err = {v: pred[v] / med[v]["step"] - 1 for v in pred}
    return (f"cp2 predictor: cp=2 measured {1e3 * med['autopar']['step']:.1f} ms, predicted "
            f"{1e3 * pred['autopar']:.1f} ms ({err['autopar']:+.1%}; target +-25%); dp=2 measured "
            f"{1e3 * med['baseline']['step']:.1f} ms, predicted {1e3 * pred['baseline']:.1f} ms "
            f"({err['baseline']:+.1%}); cp/dp measured {med['autopar']['step'] / med['baseline']['step']:.3f}, "
            f"predicted {pred['autopar'] / pred['baseline']:.3f}")


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
