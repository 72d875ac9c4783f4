"""`autopar.compile(..., verify=True)`: the first step of the parallel program checked against one process.

Before handing the compiled model over, every rank runs one forward and backward of the parallel program on the
first micro-step of the sample inputs (micro_batch_size x dp samples: one micro-batch per data-parallel replica,
each cut into its sequence chunks under context parallelism; the whole batch under a pipeline, whose schedule runs
whole steps) and the
user's own model eagerly on the same samples from the same random-generator state; losses and full gradients must
agree to `rtol` (relative to the largest gradient of each parameter, floored at 1e-4 of the model's largest, as
the parity tests do). A difference is a bug in autopar (an op rule, a lowering, a collective): the step is refused
with the first differing parameter named, rather than training a silently wrong model. Gradients and generator
state are restored afterwards: the user's first step is unaffected. It costs one extra step and one whole copy of
the model's gradients on every rank, so it is off by default.
"""

from __future__ import annotations

import torch
from torch import nn

from autopar.errors import VerifyError

RTOL = {"fp32": 1e-4, "bf16": 5e-2}  # float32 summation order moves ~1e-6; bf16 keeps 8 mantissa bits


def verify_first_step(compiled, model: nn.Module, sample_inputs: tuple) -> None:
    """Raise VerifyError naming the first parameter (in the model's order) whose gradient differs."""
    plan = compiled.planned  # as made: a cp plan's compiled.plan is its fold, whose dp axis is dp x cp
    step = plan.micro_batch_size * plan.degrees["dp"]  # what compiled(*batch) runs: one micro-step
    batch = sample_inputs if compiled.pipeline is not None else tuple(
        x[:step] if isinstance(x, torch.Tensor) and x.dim() else x for x in sample_inputs)
    rng = torch.get_rng_state()
    loss = _parallel_step(compiled, batch)
    torch.set_rng_state(rng)
    ref_loss = _first(model(*batch))
    ref_loss.backward()
    torch.set_rng_state(rng)
    got = compiled.full_state(grads=True)
    ref = {name: p.grad for name, p in model.named_parameters(remove_duplicate=False) if p.grad is not None}
    _clear(compiled.parameters())
    _clear(model.parameters())
    rtol = RTOL.get(plan.precision, RTOL["fp32"])
    bad = _differing(ref, got, rtol)
    loss_err = abs(loss.item() - ref_loss.item()) / max(abs(ref_loss.item()), 1e-12)
    if bad or loss_err > rtol:
        first = f"the first parameter whose gradient differs is '{bad[0][0]}' (relative error {bad[0][1]:.1e}; " \
                f"{len(bad)} of {len(ref)} differ)" if bad else "every gradient agrees"
        raise VerifyError(f"verify: the parallel program's first step differs from one process: loss "
                          f"{loss.item():.6g} vs {ref_loss.item():.6g} (relative error {loss_err:.1e}, tolerance "
                          f"{rtol:.0e}); {first}. This is a bug in autopar (an op rule or its code generation for "
                          f"plan {_describe(plan)}): please report it with the plan; try another plan (--fix) or "
                          "compile without verify to train anyway")


def _parallel_step(compiled, batch: tuple) -> torch.Tensor:
    if compiled.pipeline is not None:
        return compiled.train_step(*batch)
    loss = _first(compiled(*batch))
    loss.backward()
    return loss.detach()


def _first(out):
    return out[0] if isinstance(out, (list, tuple)) else out


def _differing(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor], rtol: float) -> list[tuple[str, float]]:
    floor = 1e-4 * max((g.abs().max().item() for g in ref.values()), default=0.0)
    bad = []
    for name, g in ref.items():
        mine = got.get(name)
        if mine is None or mine.shape != g.shape:
            bad.append((name, float("inf")))
            continue
        err = (g - mine.to(g.dtype)).abs().max().item() / max(g.abs().max().item(), floor, 1e-30)
        if err > rtol:
            bad.append((name, err))
    return bad


def _clear(params) -> None:
    for p in params:
        p.grad = None


def _describe(plan) -> str:
    d = plan.degrees
    return " x ".join(f"{a}={d[a]}" for a in ("pp", "dp", "cp", "tp") if d.get(a, 1) > 1) or "single device"
