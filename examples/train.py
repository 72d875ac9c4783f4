"""Train a model with autopar on every rank of a torchrun job, or eagerly in one process with --reference.

    torchrun --nproc_per_node 4 examples/train.py --model gpt-tiny --steps 10 --seed 0 --fix dp=2,tp=2
    python examples/train.py --model gpt-tiny --steps 10 --seed 0 --reference

Prints one JSON line per step, {"step": i, "loss": x}, on rank 0. Both runs draw the same model and the same
batches from --seed, so their losses agree to float32 rounding.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

import autopar
from autopar.cli.plan_cmd import positive_int, usage_error
from autopar.errors import AutoparError
from autopar.runtime.measure import measure_step
from autopar.fixspec import parse_fix, parse_pins, planner_fix
from autopar.models import build_model, parse_model_args, sample_inputs
from autopar.plan import Plan


DEMO_SEQ = 128  # a demo-sized default: a config's max positions (32768 for qwen2) would take minutes and GiBs


def sequence_length(seq: int | None, info) -> int:
    """--seq, else DEMO_SEQ capped by the model's max positions."""
    return seq or min(DEMO_SEQ, info.seq or DEMO_SEQ)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.error = functools.partial(usage_error, ap)  # `autopar: error: ...`, like every other user error
    ap.add_argument("--model", default="gpt-tiny", help="preset, family, or path/to/file.py:factory")
    ap.add_argument("--model-args", default="", help="overrides, e.g. layers=4,hidden=128")
    ap.add_argument("--steps", type=positive_int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=positive_int, default=8, help="global batch per step")
    ap.add_argument("--seq", type=positive_int, default=None,
                    help=f"sequence length (default: {DEMO_SEQ}, or the model's max positions if fewer)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--fix", default="", help="pins, e.g. dp=2,tp=2 (default: the planner decides)")
    ap.add_argument("--hardware", default=None, help="cost model to plan with (default: cpu, or h100 on CUDA)")
    ap.add_argument("--pin", action="append", help="per-module pin GLOB=INTENT, e.g. 'blocks.*.mlp.*=row'")
    ap.add_argument("--plan", default=None, help="run this plan file instead of planning")
    ap.add_argument("--reference", action="store_true", help="train eagerly in this single process")
    ap.add_argument("--dump", default=None, help="save the full gradients after step 0 and final params (torch.save)")
    ap.add_argument("--measure", action="store_true",
                    help="measure the step time (median of the steps between the first and the last, untraced) and "
                         "the last step's peak tensor memory; print them beside the plan's prediction")
    ap.add_argument("--print-code", action="store_true", help="print rank 0's generated program")
    ap.add_argument("--verify", action="store_true",
                    help="check the parallel program's first step against this model run in one process first; "
                         "refuse, naming the first differing parameter, if they differ")
    ap.add_argument("--checkpoint-dir", default=None,
                    help="save the training state here and resume from its newest complete checkpoint, under any plan")
    ap.add_argument("--checkpoint-every", type=positive_int, default=None, help="save every N steps (asynchronously)")
    ap.add_argument("--export", default=None, help="after training, write the model as one state dict (HF folder)")
    return ap.parse_args(argv)


def batches(info, args, seq: int):
    gen = torch.Generator().manual_seed(args.seed + 1)
    for _ in range(args.steps):
        tokens = torch.randint(0, info.vocab, (args.batch, seq), generator=gen)
        targets = torch.randint(0, info.vocab, (args.batch, seq), generator=gen)
        yield tokens, targets


def train(args: argparse.Namespace) -> list[float]:
    plan = Plan.load(args.plan) if args.plan else None  # a bad plan file fails before any model is built
    torch.manual_seed(args.seed)
    model, info = build_model(args.model, parse_model_args(args.model_args), seq=args.seq)
    seq = sequence_length(args.seq, info)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    source = model if args.export else None  # held only to export into: the whole model on every rank
    if not args.reference:
        example = sample_inputs(info, args.batch, seq)
        model = autopar.compile(model, sample_inputs=example, fix=_fix(args), plan=plan,
                                hardware=args.hardware, verify=args.verify)
        if rank0 and args.print_code:
            print(model.code, file=sys.stderr)
    opt = model.optimizer(torch.optim.AdamW, lr=args.lr) if not args.reference else \
        torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses, dump, seconds = [], {}, []
    start = _resume(model, args, rank0)
    for step, (tokens, targets) in enumerate(batches(info, args, seq)):
        if step < start:  # the data position: batches are drawn in order, so draw past the ones trained on
            continue
        out = {}

        def one_step():
            if args.reference:
                out["loss"] = loss = model(tokens, targets)
                loss.backward()
            else:  # one call for every plan: micro-batches, pipeline schedule, gradient synchronisation
                out["loss"] = model.train_step(tokens, targets)
            if step == 0 and args.dump:
                dump["grads"] = _full(model, grads=True)
            opt.step()
            opt.zero_grad(set_to_none=True)

        if args.measure and step == args.steps - 1:  # the last step: optimizer state exists by then
            _report(measure_step(one_step), seconds, model, rank0)
        else:
            t0 = time.perf_counter()
            one_step()
            if step > 0:  # the first step warms up (allocations, the pipeline's shape discovery)
                seconds.append(time.perf_counter() - t0)
        loss = out["loss"]
        losses.append(loss.item())
        if rank0:
            print(json.dumps({"step": step, "loss": loss.item()}), flush=True)
        if args.checkpoint_dir and args.checkpoint_every and (step + 1) % args.checkpoint_every == 0:
            model.save(args.checkpoint_dir, step + 1, data={"batches": step + 1}, asynchronous=True)
    if args.checkpoint_dir and not args.reference:
        model.wait_for_save()
    if args.export:
        model.export(args.export, source)
    if args.dump:
        dump["params"] = _full(model, grads=False)
        if rank0:
            torch.save(dump, args.dump)
    return losses


def _resume(model, args, rank0: bool) -> int:
    """The step to start from: that of the newest complete checkpoint in --checkpoint-dir (written under any
    plan), its state loaded; 0 without one."""
    from autopar.runtime.checkpoint_io import latest

    if not args.checkpoint_dir or args.reference or latest(args.checkpoint_dir) is None:
        return 0
    state = model.load(args.checkpoint_dir)
    if rank0:
        print(f"autopar: resumed from step {state.step} ({state.path})", file=sys.stderr, flush=True)
    return state.data.get("batches", state.step)


def _report(m, seconds: list[float], model, rank0: bool) -> None:
    """One JSON line: the measured peak tensor bytes of the last step and the step time (the largest over ranks)
    beside the plan's predictions. The time is the median of the untraced steps before the last (the memory
    profiler slows the step it watches); with none, the traced step's own."""
    step_s = statistics.median(seconds) if seconds else m.seconds
    peak = torch.tensor([m.peak_bytes, step_s], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    plan = getattr(model, "plan", None)
    if rank0:
        print(json.dumps({"measured_peak_bytes": peak[0].item(), "measured_step_s": peak[1].item(),
                          "predicted_peak_bytes": plan.predicted.memory_bytes_per_device if plan else None,
                          "predicted_step_s": plan.predicted.step_time_s if plan else None,
                          "predicted_memory_parts": plan.predicted.memory_parts if plan else None}), flush=True)


def _fix(args: argparse.Namespace) -> dict:
    """--fix and --pin as compile's `fix`."""
    pins = {"pins": parse_pins(args.pin)} if args.pin else {}
    return {**planner_fix(parse_fix(args.fix)), **pins}


def _full(model, grads: bool) -> dict[str, torch.Tensor]:
    if isinstance(model, autopar.runtime.CompiledModel):
        return {k: v.clone() for k, v in model.full_state(grads=grads).items()}
    return {k: (p.grad if grads else p.detach()).clone() for k, p in model.named_parameters(remove_duplicate=False)
            if not grads or p.grad is not None}


def _wait_for_peers(seconds: float = 30.0) -> None:
    """A barrier that gives up (gloo's monitored barrier) rather than hang if some rank did not fail."""
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=seconds))
        else:
            dist.barrier()
    except RuntimeError:
        pass


def main(argv=None) -> int:
    args = parse_args(argv)
    distributed = not args.reference and "WORLD_SIZE" in os.environ
    if distributed:
        init_distributed("nccl" if torch.cuda.is_available() else "gloo")
    try:
        train(args)
        if distributed:
            dist.barrier()  # no rank tears down its process group while a peer still talks to it
    except AutoparError as e:
        if not distributed or dist.get_rank() == 0:  # every rank raises the same error; say it once
            print(f"autopar: error: {e}", file=sys.stderr, flush=True)
        if distributed:  # the others wait for that line: torchrun stops every rank as soon as one exits
            _wait_for_peers()
        return 2
    finally:
        if distributed:
            teardown()
    return 0


def init_distributed(backend: str) -> None:
    """init_process_group from torchrun's environment. After a restart (--max-restarts), the static rendezvous
    hands the workers the store of the first attempt, still holding the dead workers' gloo addresses: a rank that
    reads a peer's address before the peer rewrites it connects to a dead port. A prefix per attempt avoids them."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt == "0":
        dist.init_process_group(backend)
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False)
    dist.init_process_group(backend, store=dist.PrefixStore(f"attempt_{attempt}", store), rank=rank, world_size=world)


def teardown() -> None:
    """Destroy the process groups (every rank has passed its last collective)."""
    dist.destroy_process_group()


def exit_now(code: int) -> None:
    """End the process without interpreter finalization. gloo's worker threads can outlive destroy_process_group
    (two of a compiled job's process groups stay referenced from C++ here); a worker that drops the last reference
    to a finished collective's tensor takes the GIL to free its Python object, and during finalization CPython
    ends such a thread with pthread_exit, whose unwinding through C++ noexcept frames calls std::terminate:
    "terminate called without an active exception", a rank dying after its last step (pytorch/pytorch#38228
    describes the mechanism). Everything is written and every collective done by now, so skip finalization."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
