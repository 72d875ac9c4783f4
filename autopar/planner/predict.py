"""Predictions of a solved plan, recomputed from the chosen strategies (not read off the solver's objective), and
the conversion of a search result into a `Plan`."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace
from typing import Any

from autopar.cost_models import exposed_s, latency_s
from autopar.placement import fmt, local_shape
from autopar.plan import NodeDecision, Plan, Prediction
from autopar.planner.candidate import Candidate, SearchRequest
from autopar.planner.cost import edge_price, node_cost, owner_costs, zero_sync
from autopar.planner.footprint import PARTS, evaluate, peak, terms
from autopar.planner.fusion import FUSION_KINDS, chain_of
from autopar.planner.moves import chosen_moves
from autopar.planner.pipeline import rank_sync, stage_time
from autopar.planner.ring import is_attention
from autopar.planner.staging import pieces
from autopar.runtime.compiled import BUCKET_BYTES



def chosen(c: Candidate, name: str):
    p = c.graph.nodes[name]
    return p.strategies[c.solution.choice[p.owner]]


def predict(req: SearchRequest, c: Candidate) -> Prediction:
    """Step time and memory of the chosen strategies, priced afresh (the solver's objective is not trusted); the
    memory parts and recompute come from the same terms the ILP constrained (footprint.py)."""
    if c.layout is not None:
        return _pipeline_prediction(req, c)
    pg, m, ctx = c.graph, c.micro_batches, c.ctx
    compute = bwd = optimizer = 0.0
    costs = owner_costs(pg, ctx)
    for owner in pg.owners():
        cost = costs[owner.node.name][c.solution.choice[owner.node.name]]
        n = pg.counts[owner.node.name]
        compute += n * m * (cost.fwd_s + cost.bwd_s)
        bwd += n * cost.bwd_s
        optimizer += n * cost.step_s
    parts, recompute = memory_parts(c, costs)
    recompute *= m
    exposed, sync, _, after_step = redistributions(c)
    sync_latency, after_latency = runtime_latency(c)
    sync, after_step = sync + sync_latency, after_step + after_latency
    optimizer += fsdp_host_s(c)
    moment, parts = peak(parts, m)
    compute += recompute
    sync_exposed = exposed_s(ctx.hw, sync, bwd)
    step = compute + exposed + after_step + sync_exposed + optimizer
    flops = model_flops(c)
    total = sum(parts.values())
    return Prediction(step_time_s=step, compute_s=compute, exposed_comm_s=exposed + after_step, grad_sync_s=sync,
                      grad_sync_exposed_s=sync_exposed, recompute_s=recompute, optimizer_s=optimizer,
                      memory_bytes_per_device=total,
                      memory_parts=parts, memory_peak_at=f"backward {moment}",
                      tokens_per_s=req.batch * req.seq / step if step else math.inf,
                      tflops_per_device=flops / step / req.devices / 1e12 if step else 0.0,
                      model_flops_per_step=flops)


def runtime_latency(c: Candidate) -> tuple[float, float]:
    """(gradient-sync, after-step) latency of the collectives the data-parallel runtime issues, which the
    bucketed per-parameter prices leave out (CostContext.bucketed): per gradient bucket one all-reduce (ZeRO 0/1,
    runtime.py); per FSDP unit (each block and the root, zero.py) an all-gather in forward, another in backward
    under ZeRO-3, and a reduce-scatter (ZeRO 2/3); and, after the step under ZeRO-1, ZeroRedundancyOptimizer's
    broadcast of each dp rank's parameter bucket from that rank (zero.py: one flat bucket per rank, priced as one
    message's latency each). A CPU host pays ~1 ms per collective (cost_models/hardware/cpu.toml), so these
    matter there; on GPUs they are microseconds."""
    pg, ctx = c.graph, c.ctx
    if ctx.dp <= 1 or "dp" not in pg.axis_names:
        return 0.0, 0.0
    link, n = ctx.links[pg.axis_names.index("dp")], ctx.dp

    def latency(kind: str) -> float:
        return latency_s(kind, n, link)

    params = _used_params(pg)
    if ctx.memory.zero >= 2:
        units = len({p.block for p in params if p.block is not None}) + 1
        gathers = 2 if ctx.memory.zero == 3 else 1
        return units * (gathers * latency("all_gather") + latency("reduce_scatter")), 0.0
    state = sum(math.prod(p.info.out_shapes[0]) * p.info.out_dtypes[0].itemsize for p in params)
    buckets = max(1, math.ceil(state / BUCKET_BYTES))
    broadcasts = n * latency("send_recv") if ctx.memory.zero == 1 else 0.0
    return buckets * latency("all_reduce"), broadcasts


def fsdp_host_s(c: Candidate) -> float:
    """FSDP2's own host work per step under ZeRO 2/3 (copies in and out of its buffers, DTensor dispatch in the
    optimizer): the hardware's profiled seconds per parameter tensor (zero_per_param_s) and per byte of the
    parameters as this rank holds them, tensor-parallel shards (zero_per_byte_s), on the critical path on
    a CPU; none is counted where the file has no such number (a GPU, whose kernels it runs ahead of)."""
    if c.ctx.dp <= 1 or c.ctx.memory.zero < 2:
        return 0.0
    hw, zero, params = c.ctx.hw, c.ctx.memory.zero, _used_params(c.graph)
    held = sum(math.prod(local_shape(p.info.out_shapes[0], chosen(c, p.node.name).outs[0], c.ctx.degrees))
               * p.info.out_dtypes[0].itemsize for p in params)
    return len(params) * hw.zero_per_param_s.get(zero, 0.0) + held * hw.zero_per_byte_s.get(zero, 0.0)


def _used_params(pg) -> list:
    """The parameters the optimizer and the data-parallel runtime handle (a tied weight's second name is unused)."""
    return [p for p in pg.nodes.values() if p.kind == "param" and p.node.users]


def model_flops(c: Candidate) -> float:
    """Model FLOPs of one step: forward + backward (2x) of every micro-batch; recomputation is not model FLOPs.
    Under cp the folded graph's attention is 1/cp of the true one (planner/context.py). A micro-batch's FLOPs
    are the graph's (global shapes, whatever the strategies): kept on the graph per cp, as every candidate on it
    asks (a pipeline mesh's graph is walked over all its blocks)."""
    kept = c.graph.__dict__.setdefault("_flops", {})
    if c.ctx.cp not in kept:
        each: dict[int, float] = {}  # per OpInfo: a deepened graph's block copies share their template's
        total = 0  # as sum() starts
        for p in c.graph.nodes.values():
            if p.kind == "op" and p.rule is not None and p.info.out_shapes:
                if id(p.info) not in each:
                    each[id(p.info)] = p.rule.flops(p.info.in_shapes, p.info.out_shapes, p.info) * (
                        c.ctx.cp if is_attention(p) else 1)
                total += each[id(p.info)]
        kept[c.ctx.cp] = total
    return 3.0 * kept[c.ctx.cp] * c.micro_batches


def _pipeline_prediction(req: SearchRequest, c: Candidate) -> Prediction:
    """A pipeline's prediction from its layout (staging.py): the slowest rank's micro-batches, the bubble, the
    stage-boundary sends and the exposed gradient sync; memory of the rank with the highest peak."""
    lay, m = c.layout, c.micro_batches
    pcs = pieces(c)
    worst = max(range(len(lay.memory)), key=lambda r: sum(lay.memory[r].values()))
    slowest = max(range(len(lay.rank_s)), key=lay.rank_s.__getitem__)
    mine = [st for st in lay.stages if st.rank == slowest]
    recompute = m * sum(len(st.blocks) for st in mine) * pcs.recompute_s.get("block", 0.0)
    names = max(c.graph.block_classes, key=len) if c.graph.block_classes else []
    stages = [{"stage": st.index, "rank": st.rank, "layers": [names[b] for b in st.blocks],
               "time_s": stage_time(pcs, st), "memory_bytes": sum(lay.memory[st.rank].values())} for st in lay.stages]
    flops = model_flops(c)
    step = lay.step_s
    return Prediction(step_time_s=step, compute_s=m * lay.rank_s[slowest], exposed_comm_s=lay.p2p_s + lay.after_s,
                      grad_sync_s=max(rank_sync(pcs, [st for st in lay.stages if st.rank == r]) for r in range(len(lay.rank_s))), grad_sync_exposed_s=lay.sync_exposed_s,
                      bubble_s=lay.bubble_s, recompute_s=recompute, optimizer_s=lay.optimizer_s,
                      memory_bytes_per_device=sum(lay.memory[worst].values()), memory_parts=lay.memory[worst],
                      memory_peak_at=f"{lay.peak_at[worst]} on pipeline rank {worst}", stages=stages,
                      tokens_per_s=req.batch * req.seq / step if step else math.inf,
                      tflops_per_device=flops / step / req.devices / 1e12 if step else 0.0,
                      model_flops_per_step=flops)


def memory_parts(c: Candidate, costs: dict) -> tuple[dict[str, float], float]:
    """(every memory part of the candidate, before choosing the peak's moment; recompute seconds per micro-batch)."""
    parts = {part: 0.0 for part in PARTS}
    parts.update(evaluate(terms(c.graph, c.ctx, costs), c.solution.choice))
    recompute = parts.pop("recompute_s", 0.0)
    parts["activations"] += redistributions(c)[2]  # parameters kept gathered; regathered activations (negative)
    return parts, recompute


def redistributions(c: Candidate) -> tuple[float, float, float, float]:
    """(exposed, gradient-sync, bytes kept, exposed after the step) of the redistributions, consumers needing
    the same placement of one value sharing one move (moves.py, as codegen emits them)."""
    pg, m, ctx = c.graph, c.micro_batches, c.ctx
    exposed = sync = held = after = 0.0
    for mv in chosen_moves(pg, ctx, c.solution.choice):
        pp = pg.nodes[mv.producer]
        e, s, h = edge_price(ctx, pp.info.out_shapes[mv.k], pp.info.out_dtypes[mv.k], pp.requires_grad,
                             pp.kind == "param", mv.src, mv.dst, mv.partial, mv.held > 0, mv.rerun)
        s, a = zero_sync(ctx, s)
        exposed, sync, held, after = exposed + m * mv.count * e, sync + mv.count * s, held + mv.held * h, \
            after + mv.count * a
    return exposed, sync, held, after


def binding(p: Prediction, budget: float) -> str:
    """Which memory constraint binds: the budget (when the plan uses nearly all of it) and the largest part."""
    parts, total = p.memory_parts, p.memory_bytes_per_device
    if not total:
        return ""
    largest = max(parts, key=parts.get)
    used = f"{100 * total / budget:.0f}% of the budget" if budget else "no budget"
    tight = "the budget binds" if budget and total > 0.9 * budget else "the budget does not bind"
    return (f"peak at {p.memory_peak_at}; {tight} ({used}); largest part {largest} "
            f"({100 * parts[largest] / total:.0f}%)")


def to_plan(req: SearchRequest, best: Candidate, budget: float, stats: dict, others: list[dict],
            ac_layers: dict[str, str] | None = None) -> Plan:
    pg = best.graph
    decisions, params, fallbacks, fallback_s = {}, {}, Counter(), Counter()
    for name, p in pg.nodes.items():
        if p.kind == "output":
            continue
        s = chosen(best, name)
        decisions[name] = NodeDecision(op=str(p.node.target) if p.kind == "op" else p.kind, module=p.module,
                                       outs=[fmt(o) for o in s.outs], ins=[fmt(i) for i in s.ins])
        if p.kind == "param":
            params[p.fqn] = fmt(s.outs[0])
        if p.fallback:
            fallbacks[str(p.node.target)] += 1
            cost = node_cost(best.ctx, p, s)
            fallback_s[str(p.node.target)] += best.micro_batches * (cost.fwd_s + cost.bwd_s)
    return Plan(model=req.model, n_params=req.n_params, graph_fingerprint=fingerprint(pg), hardware=req.hardware.name,
                devices=req.devices, axis_names=list(pg.axis_names),
                degrees={**dict(zip(pg.axis_names, pg.degrees)), "pp": best.degrees.get("pp", 1), "cp": 1},
                batch=req.batch,
                seq=req.seq, micro_batch_size=req.batch // (best.micro_batches * best.ctx.dp),
                num_micro_batches=best.micro_batches, dtype=req.dtype, zero=best.memory.zero if best.ctx.dp > 1 else 0,
                ac=best.memory.ac, ac_layers=dict(ac_layers or {}), precision=best.memory.precision, memory_budget_bytes=budget, params=params,
                strategies=decisions, predicted=_with_binding(best.prediction or predict(req, best), budget), solver=stats, fallback_ops=dict(fallbacks),
                fallback_seconds=dict(fallback_s),
                alternatives=others, fuse=best.memory.fuse,
                fusions=fusion_summary(best.ctx, pg, lambda n: chosen(best, n), best.micro_batches)
                if best.memory.fuse else [],
                **_pipeline_fields(best))


def _pipeline_fields(c: Candidate) -> dict:
    if c.layout is None:
        return {}
    names = max(c.graph.block_classes, key=len)
    return {"schedule": c.layout.schedule, "virtual_stages": c.layout.v,
            "stages": [[names[b] for b in st.blocks] for st in c.layout.stages]}


def _with_binding(p: Prediction, budget: float) -> Prediction:
    return replace(p, memory_binding=binding(p, budget))


def fingerprint(pg) -> str:
    """Stable hash of the traced graph's ops and shapes: a plan only applies to the graph it was made for."""
    import hashlib

    h = hashlib.sha256()
    for name, p in pg.nodes.items():
        h.update(f"{name}|{p.node.target}|{p.info.out_shapes}|{p.info.in_shapes}\n".encode())
    return h.hexdigest()[:16]


def fusion_summary(ctx, pg, chosen, micro_batches: int) -> list[dict[str, Any]]:
    """Per fusion kind in the chosen plan: how many, and the predicted step time and activation memory they save
    (unfused minus fused cost of their members at the chosen strategies; memory per micro-batch in flight)."""
    off = replace(ctx, memory=replace(ctx.memory, fuse=False))
    on = replace(ctx, memory=replace(ctx.memory, fuse=True))
    rows: dict[str, dict[str, Any]] = {}
    for name, p in pg.nodes.items():
        chain = chain_of(p.node) if p.kind == "op" else None
        if chain is None:
            continue
        s = chosen(name)
        a, b = node_cost(off, p, s), node_cost(on, p, s)
        row = rows.setdefault(chain.kind, {"kind": chain.kind, "count": 0, "time_saved_s": 0.0,
                                           "memory_saved_bytes": 0.0})
        row["count"] += name == chain.anchor
        row["time_saved_s"] += micro_batches * (a.fwd_s + a.bwd_s - b.fwd_s - b.bwd_s)
        row["memory_saved_bytes"] += a.activation_bytes + a.transient_bytes - b.activation_bytes - b.transient_bytes
    return [rows[k] for k in FUSION_KINDS if k in rows]
