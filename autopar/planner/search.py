"""The outer search: mesh degrees and micro-batching around the inner sharding ILP, scored by one objective.

Candidates are factorisations devices = dp x tp with tp inside a node (tp divides the devices per node: tensor
parallelism's per-layer collectives need the fastest links, Narayanan et al. 2021 Sec. 3.3), and micro-batch
counts m (gradient accumulation) whose micro-step batch still divides by dp, tried from m = 1 upward until the
ILP fits the memory budget (a larger micro-batch is never slower in the cost model, so the first feasible m per
mesh is that mesh's best). Keys pinned with `--fix` restrict the candidates; a fully pinned configuration is
evaluated, not searched.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

from autopar.capture import Captured
from autopar.cost_models import Hardware, axis_links
from autopar.errors import MeshError, PlanError
from autopar.plan import Plan
from autopar.planner.cost import CostContext
from autopar.planner.graph import PlanGraph, build
from autopar.planner.ilp import ShardingILP, Solution
from autopar.planner.predict import predict, to_plan

AXES = ("dp", "tp")
_NO_LIMIT = 1e30  # bytes: a budget nothing reaches (the solver needs a finite bound)


@dataclass(frozen=True, kw_only=True)
class SearchRequest:
    model: str  # name recorded in the plan
    n_params: int
    hardware: Hardware
    devices: int
    batch: int  # global batch per optimizer step
    seq: int
    fix: dict[str, object] = field(default_factory=dict)  # parsed --fix: dp, tp, mbs (others refused earlier)
    memory_budget_bytes: float | None = None  # default: capacity minus reserve
    time_limit_s: float = 30.0  # per ILP; the best incumbent is used when reached
    dtype: str = "float32"


@dataclass
class Candidate:
    degrees: dict[str, int]
    micro_batches: int
    graph: PlanGraph
    ilp: ShardingILP
    solution: Solution


def mesh_candidates(req: SearchRequest) -> list[dict[str, int]]:
    per_node = req.hardware.devices_per_node
    out = []
    for tp in _divisors(req.devices):
        dp = req.devices // tp
        if tp > per_node or per_node % tp:
            continue
        if any(k in req.fix and req.fix[k] != v for k, v in (("dp", dp), ("tp", tp))):
            continue
        out.append({"dp": dp, "tp": tp})
    if not out:
        raise MeshError(_no_mesh_message(req))
    return out


def _no_mesh_message(req: SearchRequest) -> str:
    pins = ",".join(f"{k}={req.fix[k]}" for k in ("dp", "tp") if k in req.fix)
    return (f"no mesh dp x tp = {req.devices} devices matches {pins or 'the device count'} with tp inside one "
            f"{req.hardware.name} node ({req.hardware.devices_per_node} devices); make dp*tp equal --devices "
            "and tp divide the devices per node")


def micro_batch_counts(req: SearchRequest, dp: int) -> list[int]:
    if "mbs" in req.fix:
        mbs = int(req.fix["mbs"])
        if req.batch % mbs:
            raise MeshError(f"--fix mbs={mbs} does not divide the batch {req.batch}; choose a divisor of the batch")
        return [req.batch // mbs]
    return [m for m in _divisors(req.batch) if (req.batch // m) % dp == 0]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search(req: SearchRequest, trace: Callable[[int], Captured], progress=None) -> Plan:
    """Best plan over the candidates; `trace(micro_batch)` captures the model at that micro-step batch."""
    t0 = time.perf_counter()
    budget = req.memory_budget_bytes or (req.hardware.memory_bytes - req.hardware.memory_reserve_bytes)
    results: list[Candidate] = []
    smallest: tuple[float, dict] | None = None
    meshes = mesh_candidates(req)
    for degrees in meshes:
        if req.batch % degrees["dp"] and "dp" in req.fix:
            raise MeshError(f"batch {req.batch} is not divisible by dp={degrees['dp']}; use a batch that is a "
                            "multiple of the dp degree")
        for m in micro_batch_counts(req, degrees["dp"]):
            if progress:
                progress(f"dp={degrees['dp']} tp={degrees['tp']} micro-batches={m}")
            cand = _solve(req, trace(req.batch // m), degrees, m, budget)
            if cand.solution is not None:
                results.append(cand)
                break
    if not results:
        raise PlanError(_infeasible_message(req, trace, meshes, budget))
    results.sort(key=lambda c: c.solution.objective_s)
    best = results[0]
    stats = {"seconds": round(time.perf_counter() - t0, 3), "candidates": len(results),
             "status": best.solution.status, "variables": best.solution.variables,
             "constraints": best.solution.constraints, "solve_s": round(best.solution.solve_s, 3)}
    others = [_alternative(req, c) for c in results[1:]]
    return to_plan(req, best, budget, stats, others)


def _solve(req: SearchRequest, captured: Captured, degrees: dict[str, int], m: int, budget: float) -> Candidate:
    deg = tuple(degrees[a] for a in AXES)
    pg = build(captured, deg, AXES)
    links = axis_links(req.hardware, list(zip(AXES, deg)))
    ctx = CostContext(req.hardware, deg, tuple(links[a] for a in AXES))
    ilp = ShardingILP(pg, ctx, budget, m)
    return Candidate(degrees, m, pg, ilp, ilp.solve(req.time_limit_s))


def _alternative(req: SearchRequest, c: Candidate) -> dict:
    p = predict(req, c)
    return {"degrees": c.degrees, "num_micro_batches": c.micro_batches, "step_time_s": p.step_time_s,
            "memory_bytes_per_device": p.memory_bytes_per_device, "tokens_per_s": p.tokens_per_s}


def _infeasible_message(req: SearchRequest, trace, meshes, budget: float) -> str:
    least = math.inf
    for degrees in meshes:
        m = micro_batch_counts(req, degrees["dp"])[-1]
        cand = _solve(req, trace(req.batch // m), degrees, m, _NO_LIMIT)
        if cand.solution is not None:
            least = min(least, predict(req, cand).memory_bytes_per_device)
    return (f"no plan fits the memory budget of {budget / 2**30:.1f} GiB per device; the best plan found needs "
            f"{least / 2**30:.1f} GiB. Add devices, lower --batch/--seq, or raise --memory")
