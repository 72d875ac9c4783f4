"""Lower bounds the outer search prunes with (search.py): a candidate's least memory on the shallow proxy, and its
least step time from node costs alone, against an incumbent's predicted step time. Each bounds every plan the
candidate could give, so pruning changes the work, never the answer."""

from __future__ import annotations

import math
from dataclasses import replace

from autopar.plan import Prediction
from autopar.planner.candidate import Candidate, SearchRequest
from autopar.planner.cost import CostContext, node_cost, owner_costs
from autopar.planner.footprint import block_count, terms
from autopar.planner.graph import PlanGraph
from autopar.planner.ilp import memory_lower_bound
from autopar.planner.memory import MemoryConfig
from autopar.planner.predict import predict
from autopar.planner.space import deepened_trace, graph_for
from autopar.planner.ring import is_attention
from autopar.planner.staging import rank_weight, schedules, sides


def predicted(req: "SearchRequest", c: Candidate) -> Prediction:
    if c.prediction is None:
        c.prediction = predict(req, c)
    return c.prediction


def incumbent(req, candidates: list[Candidate]) -> float | None:
    """The fastest flat candidate's predicted step time (at pp = 1 the ILP's objective is that prediction)."""
    flat = [predicted(req, c).step_time_s for c in candidates if c.degrees["pp"] == 1]
    return min(flat, default=None)


def likely_first(req, degrees, counts: list[int], budget: float, proxy, cfg: MemoryConfig) -> int | None:
    """Index of the first micro-batch count whose memory lower bound fits under the most memory-saving
    configuration `cfg` (None: none does), on the shallow proxy, so the full model is traced only at the
    micro-batch sizes that will be solved."""
    return next((k for k, m in enumerate(counts) if proxy_bound(req, degrees, proxy, cfg, m) <= budget), None)


PER_MICRO_BATCH = ("activations", "inputs", "recompute")  # parts that shrink with the micro-batch


def proxy_bound(req, degrees, proxy, cfg: MemoryConfig, m: int) -> float:
    """Memory lower bound at m micro-batches, from the model traced at the whole batch (on its two-block copy,
    deepened; `proxy = (trace, depth ratio, cache)`): activations scale with the micro-batch, model state does
    not."""
    pg, ctx, _, all_terms = whole_batch(req, degrees, proxy, cfg)
    rank = rank_weight(req, pg, degrees, m)

    def weight(owner: str, part: str) -> float:
        return rank(owner, part) / (m if part in PER_MICRO_BATCH else 1)

    return memory_lower_bound(pg, ctx, all_terms, weight, m)


def time_bound(req, trace, degrees, m, cfg: MemoryConfig, proxy) -> float:
    """A lower bound on the step time of any plan of (mesh, m micro-batches, cfg): every node at its fastest
    strategy, compute, optimizer step and recomputation only (moves and exposed synchronisation are >= 0), over pp:
    a pipeline's busiest rank holds at least 1/pp of that work and runs all of it (pipeline.step_time >= m times
    its per-micro-batch time; bubbles and sends only add).
    On the shallow proxy it is taken at the whole batch, which bounds m micro-batches from below: an op's time is
    a roofline plus a fixed launch cost (cost_models/compute.py), so m ops on 1/m of the data take at least as long
    as one op on all of it."""
    pp = degrees.get("pp", 1)
    if proxy is not None:
        pg, _, costs, all_terms = whole_batch(req, degrees, proxy, cfg)
        return compute_bound(pg, costs, all_terms, 1) / pp
    pg, ctx = graph_for(req, trace(req.batch // m), degrees, cfg)
    return compute_bound(pg, *priced(pg, ctx), m) / pp


def whole_batch(req, degrees, proxy, cfg: MemoryConfig):
    """(graph, context, node costs, memory terms) of the proxy at the whole batch, deepened; cached in `proxy`."""
    proxy_trace, ratio, cache = proxy
    key = (tuple(degrees.items()), cfg)
    if key not in cache:
        pg, ctx = graph_for(req, deepened_trace(proxy_trace, round(2 * ratio))(req.batch), degrees, cfg)
        cache[key] = pg, ctx, *priced(pg, ctx)
    return cache[key]


def priced(pg: PlanGraph, ctx: CostContext) -> tuple[dict, list]:
    """(every owner's cost per strategy, the memory terms) of a planning graph under a context."""
    costs = owner_costs(pg, ctx)
    return costs, terms(pg, ctx, costs)


def compute_bound(pg: PlanGraph, costs: dict, all_terms, m: int) -> float:
    rerun = {t.owner: t.values for t in all_terms if t.part == "recompute_s"}
    total = 0.0
    for owner, cs in costs.items():
        n, again = pg.counts[owner], rerun.get(owner, [0.0] * len(cs))
        total += min(n * m * (c.fwd_s + c.bwd_s) + n * c.step_s + m * r for c, r in zip(cs, again))
    return total


def pipeline_floor(req, degrees, m: int, flat: Candidate) -> float:
    """A lower bound on the step time of pipeline mesh `degrees` at m micro-batches under the sharding of `flat`,
    the flat candidate with the same tp (search._transferred); 0 where none is known. The flat mesh has dp x pp
    replicas, so a pipeline micro-batch is 1/k of its per-rank micro-batch, k = m / (pp x m_flat): where k is an
    integer, each op takes at least 1/k of its time in flat (an op's time is a roofline plus a launch cost), so
    the embedding, the head and each block take at least their compute in flat times pp / m per micro-batch (E, H,
    B; flat's whole compute C times pp / m together). A rank holds v stages of at least one block each, the first
    rank the embedding and the last the head: its micro-batch time t is at least the least, over whole numbers of
    blocks n_r >= v per rank summing to L, of the largest E + n_0 B, n_r B, H + n_(p-1) B (`_busiest`; at least
    C / m). Each schedule then adds its bubble (pipeline.step_time): (m - 1) t + the stages' sum (C pp / m) for
    gpipe and 1f1b, m t + (p - 1) t / v interleaved, m t + (p - 1) max forward / v for zero-bubble (forward at
    least flat's forward F over m). The least over the schedules any configuration allows bounds the layout
    chosen; recomputation, sends, exposed collectives and the optimizer only add. Under cp an attention counts its
    cp-fold work only (ring.ring_node_cost): the ring's exposed hops are left out (not linear in the batch)."""
    p, mf = degrees["pp"], flat.micro_batches
    if flat.graph is None or flat.solution is None or m % (p * mf):
        return 0.0
    costs, where = owner_costs(flat.graph, flat.ctx), sides(flat.graph)
    unringed = replace(flat.ctx, cp=1, cp_link=None)  # an attention's own work, without the ring's hops
    forward, both = 0.0, {"pre": 0.0, "block": 0.0, "post": 0.0}
    for o in flat.graph.owners():
        k, n = flat.solution.choice[o.node.name], flat.graph.counts[o.node.name]
        c = costs[o.node.name][k]
        if flat.ctx.cp > 1 and is_attention(o):
            own = node_cost(unringed, o, o.strategies[k])
            c = replace(own, fwd_s=flat.ctx.cp * own.fwd_s, bwd_s=flat.ctx.cp * own.bwd_s)
        forward += n * mf * c.fwd_s
        for side in where[o.node.name]:
            both[side] += n * mf * (c.fwd_s + c.bwd_s)
    blocks = max(1, block_count(flat.graph))
    scale = p / m  # flat's per-step compute -> a pipeline micro-batch's
    pre, post, block = both["pre"] * scale, both["post"] * scale, both["block"] * scale / blocks
    whole = pre + post + block * blocks  # a micro-batch through every stage
    floors = []
    for schedule, v in schedules(req, p, m, blocks):  # as staging.layouts counts them
        t = _busiest(pre, post, block, blocks, p, v)
        if schedule in ("gpipe", "1f1b"):
            floors.append((m - 1) * t + whole)
        elif schedule == "interleaved":
            floors.append(t * (m + (p - 1) / v))
        else:
            floors.append(m * t + (p - 1) * forward / (m * v))
    return min(floors, default=0.0)


def _busiest(pre: float, post: float, block: float, blocks: int, p: int, v: int) -> float:
    """The least possible time of a pipeline's busiest rank per micro-batch: L blocks of time `block` in whole
    numbers n_r >= v over p ranks, the first rank also running `pre`, the last `post` (pipeline.stages_of: stage c
    on rank c % p, the first stage on rank 0, the last on rank p - 1): the smallest candidate level X at which the
    ranks' capacities, floor((X - extra) / block), hold all L blocks. Never below the average."""
    average = (pre + post + block * blocks) / p
    if block <= 0:
        return max(pre, post, average)
    ranks = ((pre, 1), (post, 1), (0.0, p - 2))  # (extra, how many ranks have it)

    def holds(level: float) -> bool:
        caps = [(math.floor((level - e) / block + 1e-9), k) for e, k in ranks if k]
        return all(c >= v for c, _ in caps) and sum(c * k for c, k in caps) >= blocks

    levels = sorted({e + n * block for e, _ in ranks for n in range(v, blocks + 1)})
    return max(next((x for x in levels if holds(x)), max(pre, post) + blocks * block), average)
