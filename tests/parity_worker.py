"""Many (model, plan) parity checks in one torchrun launch: process start-up and torch import are paid once.

    python -m torch.distributed.run --standalone --nproc_per_node 4 tests/parity_worker.py CASES.json

CASES.json is a list of cases: {"id", "factory": "module:function", "kwargs", "fix", "seed", "steps", "batch"},
optionally "fuse" (autopar.compile's: fused kernels on or off; with it set, the result also counts the fused calls
the programs hold, by kind), "optimizer" ("sgd" or "adamw") and "ignored" (that many leading targets of the first sample set to ignore_index).
Every rank builds the model from the seed, compiles it with autopar under the case's pins, trains `steps` SGD (or AdamW)
steps and trains an eager copy of the same model on the same batches in the same process (the single-process
reference). Rank 0 prints one JSON line per case: the largest relative loss difference over the steps, the
parameters whose first-step gradients differ (tests/dist_utils.py's rule), or the error the case raised.
A case that fails does not stop the others: every rank raises the same error at the same point of the same plan.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import autopar  # noqa: E402

LR = 0.05  # plain SGD: a gradient rounding difference moves the weights by lr * 1e-7, not by lr as Adam's may
# "optimizer": "adamw" trains as examples/train.py does (AdamW, lr 1e-3): ZeRO-1/2 shard optimizer state, which
# plain SGD has none of
OPTIMIZERS = {"sgd": (torch.optim.SGD, LR), "adamw": (torch.optim.AdamW, 1e-3)}


def batches(vocab: int, batch: int, seq: int, steps: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed + 1)
    return [(torch.randint(0, vocab, (batch, seq), generator=gen), torch.randint(0, vocab, (batch, seq), generator=gen))
            for _ in range(steps)]


def build(case: dict) -> torch.nn.Module:
    module, fn = case["factory"].split(":")
    torch.manual_seed(case.get("seed", 0))
    return getattr(importlib.import_module(module), fn)(**case.get("kwargs", {}))


def grad_mismatch(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor], rtol: float,
                  exact: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Relative error per differing parameter, scaled as tests/dist_utils.grad_mismatches does, except that a
    difference within 10x float32's own rounding error of that gradient (the reference against `exact`, the same
    step in float64) passes: a gradient that is zero in exact arithmetic (a bias before a shift-invariant op) is
    rounding noise in both runs, at any floor."""
    floor = 1e-4 * max((g.abs().max().item() for g in ref.values()), default=0.0)
    bad = {}
    for name, g in ref.items():
        if name not in got:
            bad[name] = float("inf")
            continue
        diff = (g - got[name]).abs().max().item()
        noise = 10 * (g.double() - exact[name]).abs().max().item() if exact and name in exact else 0.0
        err = diff / max(g.abs().max().item(), floor, 1e-30)
        if err > rtol and diff > noise:
            bad[name] = err
    return bad


def float64_grads(model: torch.nn.Module, x, y, rng: torch.Tensor, loss32: float) -> dict[str, torch.Tensor] | None:
    """The first step's gradients in float64 from the same random state; None if its loss is not the float32
    loss to 1e-4 (a random op that draws differently in float64 makes it no measure of rounding)."""
    model = copy.deepcopy(model).double()
    torch.set_rng_state(rng)
    loss = model(x, y)
    loss.backward()
    if abs(loss.item() - loss32) > 1e-4 * abs(loss32):
        return None
    return {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


def run_case(case: dict, rtol: float, verify: bool = False) -> dict:
    model = build(case)
    ref, ref64 = copy.deepcopy(model), copy.deepcopy(model)
    data = batches(model.vocab, case.get("batch", 4), model.seq, case.get("steps", 2), case.get("seed", 0))
    for _, y in data:  # "ignored": the first sample's first n targets are ignore_index (-100): uneven token counts
        y[0, :case.get("ignored", 0)] = -100
    fuse = {"fuse": case["fuse"]} if "fuse" in case else {}
    compiled = autopar.compile(model, sample_inputs=data[0], fix=case["fix"], verify=verify, **fuse)
    opt_cls, lr = OPTIMIZERS[case.get("optimizer", "sgd")]
    opt = compiled.optimizer(opt_cls, lr=lr)
    ref_opt = opt_cls(ref.parameters(), lr=lr)
    worst, bad = 0.0, {}
    for step, (x, y) in enumerate(data):
        rng = torch.get_rng_state()  # the reference draws the same random numbers as the compiled step
        loss = compiled.train_step(x, y).item()
        after, _ = torch.get_rng_state(), torch.set_rng_state(rng)
        ref_loss = ref(x, y)
        ref_loss.backward()
        assert torch.equal(after, torch.get_rng_state()), "the compiled step drew other random numbers than eager"
        worst = max(worst, abs(loss - ref_loss.item()) / max(abs(ref_loss.item()), 1e-12))
        if step == 0:
            grads = {k: p.grad.clone() for k, p in ref.named_parameters() if p.grad is not None}
            exact = float64_grads(ref64, x, y, rng, ref_loss.item())
            torch.set_rng_state(after)
            bad = grad_mismatch(grads, compiled.full_state(grads=True), rtol, exact)
        opt.step()
        ref_opt.step()
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
    out = {"loss_rel": worst, "grad_bad": bad, "plan": _plan_kind(compiled.planned),
           "blocks": compiled.blocks}  # the program's layer segments: FSDP and checkpointing units
    return {**out, "fused": fused_calls(compiled)} if fuse else out


def _plan_kind(plan) -> str:
    d = plan.degrees
    cp = f",cp={d['cp']}" if d.get("cp", 1) > 1 else ""
    return (f"pp={d.get('pp', 1)},dp={d['dp']}{cp},tp={d['tp']},zero={plan.zero},ac={plan.ac},"
            f"m={plan.num_micro_batches}")


FUSED = re.compile(r"torch\.ops\.autopar\.(\w+)\.default\(|(fused_linear_cross_entropy)\(")


def fused_calls(compiled) -> dict[str, int]:
    """Fused calls by kind over one rank of each (pp, tp) position of the mesh (pp, dp, tp), row-major: every
    stage's program once."""
    codes: list = [None] * dist.get_world_size()
    dist.all_gather_object(codes, compiled.code)
    d, fused = compiled.plan.degrees, {}
    for rank, code in enumerate(codes):
        if (rank // d["tp"]) % d["dp"] == 0 and rank % d["tp"] == 0:
            for m in FUSED.finditer(code):
                kind = m.group(1) or "linear_cross_entropy"
                fused[kind] = fused.get(kind, 0) + 1
    return fused


def main(path: str) -> int:
    dist.init_process_group("gloo")
    cases = json.loads(Path(path).read_text())
    rank0 = dist.get_rank() == 0
    for case in cases:
        t0 = time.perf_counter()
        try:
            result = run_case(case, case.get("rtol", 1e-5), case.get("verify", False))
        except Exception as e:  # noqa: BLE001 - reported per case; the next case still runs
            result = {"error": f"{type(e).__name__}: {e}"[:2000], "trace": traceback.format_exc()[-3000:]}
        result.update(id=case["id"], seconds=round(time.perf_counter() - t0, 2))
        if rank0:
            print(json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))


def assert_matches_one_process(result: dict, *context, rtol: float = 1e-5) -> None:
    """A case's result (run_case's JSON line): it ran, its losses matched one process within rtol relative at every
    step, and no first-step gradient differed (grad_mismatch). `context` goes into the failure messages."""
    assert "error" not in result, (*context, result.get("trace", result))
    assert result["loss_rel"] <= rtol, (*context, result)
    assert result["grad_bad"] == {}, (*context, result)


def launch(cases: list[dict], nproc: int, tmp: Path, timeout: int = 900, env: dict | None = None) -> dict[str, dict]:
    """Run the cases under torchrun on `nproc` gloo ranks (with `env` added to the environment); results by case id
    (a case missing from the output means a rank died, which fails the caller with the launcher's stderr)."""
    from tests.dist_utils import run_isolated

    spec = tmp / f"cases_{nproc}.json"
    spec.write_text(json.dumps(cases))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
           str(spec)]
    rc, out, err = run_isolated(cmd, timeout, env)
    results = {r["id"]: r for r in (json.loads(line) for line in out.splitlines() if line.startswith("{"))}
    missing = [c["id"] for c in cases if c["id"] not in results]
    assert not missing, f"no result for {missing} (rc {rc}):\n{err[-4000:]}"
    return results
