"""Checkpointing per layer: after the search picks a checkpointing mode for the blocks, give back to "none" as many
blocks as the memory budget allows, saving their recomputation.

With the strategies fixed, a block that is not checkpointed holds all of its activations instead of its inputs (and,
under selective, its kept matmul outputs) and skips its forward rerun; both are the same for every block of a
repeated class, so the choice is a count k: the largest k whose extra activations fit in what the budget leaves at
the backward-start moment (checkpoint only as many layers as memory requires; Korthikanti et al. 2022 Sec. 5).
When every block is given back, the one-block recomputation transient goes too.
"""

from __future__ import annotations

from dataclasses import replace

from autopar.runtime.checkpointing import KEEP_UNDER_SELECTIVE
from autopar.plan import Prediction
from autopar.planner.cost import owner_costs
from autopar.planner.footprint import block_input_terms, evaluate, peak, phases
from autopar.planner.predict import memory_parts


def relax(c, p: Prediction, budget: float, req) -> tuple[dict[str, str], Prediction]:
    """(block -> "none" for the blocks given back, the prediction with them); ({}, p) when none can be."""
    ctx, pg, m = c.ctx, c.graph, c.micro_batches
    blocks = max(pg.block_classes, key=len) if pg.block_classes else []
    if ctx.memory.ac == "none" or not blocks or not budget:
        return {}, p
    costs = owner_costs(pg, ctx)
    parts, _ = memory_parts(c, costs)
    one_block, n = parts.get("recompute", 0.0), len(blocks)
    kept = sum(costs[o.node.name][c.solution.choice[o.node.name]].out_bytes * pg.counts[o.node.name]
               for o in pg.owners() if o.block in blocks and ctx.memory.ac == "selective"
               and o.node.target in KEEP_UNDER_SELECTIVE)
    inputs = sum(evaluate(block_input_terms(pg, ctx), c.solution.choice).values())
    extra = one_block - (kept + inputs) / n  # bytes per block given back
    start = sum(v for part, v in parts.items() if "start" in phases(part, m))
    fits = [k for k in range(n + 1) if start + k * extra - (one_block if k == n else 0.0) <= budget]
    k = max(fits, default=0)
    if k == 0:
        return {}, p
    parts["activations"] += k * extra
    if k == n:
        parts["recompute"] = 0.0
    moment, at = peak(parts, m)
    saved_s = p.recompute_s * k / n
    step = p.step_time_s - saved_s
    given = {b: "none" for b in blocks[n - k:]}  # the last blocks: their activations are freed first in backward
    return given, replace(p, step_time_s=step, compute_s=p.compute_s - saved_s, recompute_s=p.recompute_s - saved_s,
                          memory_parts=at, memory_bytes_per_device=sum(at.values()), memory_peak_at=f"backward {moment}",
                          tokens_per_s=req.batch * req.seq / step,
                          tflops_per_device=p.model_flops_per_step / step / req.devices / 1e12)
