"""`autopar plan --explain`: why this plan — the best alternative along each dimension, priced as a what-if.

Each alternative is the chosen plan with one decision changed (tensor-parallel degree, ZeRO stage, checkpointing
mode, micro-batch size) and everything else pinned, or the best plan at another context-parallel degree (cp), evaluated exactly as `--fix` would evaluate it; its delta is
its predicted step time against the chosen plan's, and the reason is the step-time part that moved most.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from autopar.errors import AutoparError
from autopar.plan import Plan, Prediction

PARTS = {"compute_s": "compute", "exposed_comm_s": "exposed communication",
         "grad_sync_exposed_s": "exposed gradient sync", "recompute_s": "recomputation",
         "optimizer_s": "optimizer step"}


@dataclass(frozen=True)
class Alternative:
    dimension: str  # "tp", "zero", "ac", "mbs", "cp"
    fix: dict[str, object]  # the complete pins that evaluate it
    step_time_s: float | None  # None: it does not fit
    delta: float | None  # step time / chosen - 1
    reason: str


def pins_of(plan: Plan) -> dict[str, object]:
    """The plan's own decisions as --fix pins."""
    cp = {"cp": plan.degrees["cp"]} if plan.degrees.get("cp", 1) > 1 else {}
    return {"dp": plan.degrees["dp"], **cp, "tp": plan.degrees["tp"], "mbs": plan.micro_batch_size,
            "zero": plan.zero, "ac": plan.ac}


def candidates(plan: Plan) -> dict[str, list[dict[str, object]]]:
    """One-decision changes of the plan, per dimension."""
    base, devices = pins_of(plan), plan.devices
    dp, cp = plan.degrees["dp"], plan.degrees.get("cp", 1)
    out: dict[str, list[dict[str, object]]] = {"tp": [], "zero": [], "ac": [], "mbs": [], "cp": []}
    for tp in (t for t in range(1, devices // cp + 1) if devices % (t * cp) == 0 and t != base["tp"]):
        d = devices // (tp * cp)
        out["tp"].append({**base, "tp": tp, "dp": d, "zero": base["zero"] if d * cp > 1 else 0})
    # context parallelism: a cp plan against the best cp = 1 plan, a cp = 1 plan against the best cp = 2 plan (each
    # searched freely: cp changes what the other degrees can be)
    if cp > 1 or plan.seq % 4 == 0 and devices % 2 == 0:
        out["cp"] = [{"cp": 1 if cp > 1 else 2}]
    if dp * cp > 1:  # ZeRO shards over dp x cp
        out["zero"] = [{**base, "zero": z} for z in (0, 1, 2, 3) if z != base["zero"]]
    out["ac"] = [{**base, "ac": a} for a in ("none", "selective", "full") if a != base["ac"]]
    mbs = base["mbs"]
    out["mbs"] = [{**base, "mbs": b} for b in (mbs // 2, mbs * 2)  # per replica: batch = mbs x dp x micro-batches
                  if 1 <= b and plan.batch % (b * dp) == 0 and b != mbs]
    return out


def explain(plan: Plan, evaluate: Callable[[dict], Plan]) -> list[Alternative]:
    """The best alternative per dimension; `evaluate(fix)` plans with those pins (make_plan with the same model,
    hardware, batch and budget)."""
    best: list[Alternative] = []
    for dimension, fixes in candidates(plan).items():
        tried = [_try(dimension, fix, plan.predicted, evaluate) for fix in fixes]
        fitting = [a for a in tried if a.step_time_s is not None]
        if fitting:
            best.append(min(fitting, key=lambda a: a.step_time_s))
        elif tried:
            best.append(tried[0])
    return best


def _try(dimension: str, fix: dict, chosen: Prediction, evaluate) -> Alternative:
    try:
        alt = evaluate(fix).predicted
    except AutoparError as e:
        return Alternative(dimension, fix, None, None, f"not possible: {str(e).split(';')[0]}")
    delta = alt.step_time_s / chosen.step_time_s - 1
    moved = max(PARTS, key=lambda k: abs(getattr(alt, k) - getattr(chosen, k)))
    change = getattr(alt, moved) - getattr(chosen, moved)
    memory = alt.memory_bytes_per_device / chosen.memory_bytes_per_device - 1
    what = f"{PARTS[moved]} {'+' if change >= 0 else '-'}{_ms(abs(change))}" if abs(change) > 1e-3 * \
        chosen.step_time_s else "same step time"
    return Alternative(dimension, fix, alt.step_time_s, delta, f"{what}; memory {memory:+.0%}")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"
