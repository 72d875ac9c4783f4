"""A solved candidate as a pipeline: its costs split by where they run (runtime/pipeline.py's pieces), the stage cut by
dynamic programming, the schedule and virtual stages that predict the shortest step within the memory budget."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from autopar.cost_models import axis_links, collective_time_s, exposed_s
from autopar.planner.candidate import Candidate, Layout
from autopar.planner.cost import edge_price, nbytes, owner_costs, zero_sync
from autopar.planner.footprint import block_count, peak, terms
from autopar.planner.moves import chosen_moves
from autopar.planner.pipeline import (INTERLEAVED, ONE_BLOCK, SCHEDULES, STATE, Pieces, Stage, in_flight, partition,
                                      rank_after, rank_memory, rank_optimizer, rank_sync, stage_fwd, stage_time,
                                      stages_of, step_time)
from autopar.placement import local_shape


def sides(pg) -> dict[str, tuple[str, ...]]:
    """Node -> where it runs: ("block",), ("pre",) before the first block, ("post",) after it; a placeholder runs
    where its users do (a tied embedding is on both ends). Kept on the graph: every layout of a candidate asks."""
    if "_sides" not in pg.__dict__:
        pg.__dict__["_sides"] = _sides(pg)
    return pg.__dict__["_sides"]


def _sides(pg) -> dict[str, tuple[str, ...]]:
    first = next((i for i, p in enumerate(pg.nodes.values()) if p.block is not None and p.kind == "op"), None)
    out: dict[str, tuple[str, ...]] = {}
    users: dict[str, set[str]] = defaultdict(set)
    for i, (name, p) in enumerate(pg.nodes.items()):
        if p.block is not None:
            out[name] = ("block",)
        elif p.kind in ("op", "output"):
            out[name] = ("pre",) if first is not None and i < first else ("post",)
        for prod, _ in p.inputs:
            users[prod].add(name)
    for name, p in pg.nodes.items():
        if p.block is None and p.kind not in ("op", "output"):
            where = {s for u in users[name] for s in out.get(u, ()) if s != "block"}
            out[name] = tuple(sorted(where)) or ("pre",)
    return out


def pieces(c: Candidate) -> Pieces:
    """The candidate's time, memory and sends by side and block (pipeline.py's units); kept on the candidate for its
    graph, context and solution: its layouts and its prediction both ask."""
    key = (c.graph, c.ctx, c.solution)
    kept = c.__dict__.get("_pieces")
    if kept is None or any(a is not b for a, b in zip(kept[0], key)):
        kept = c.__dict__["_pieces"] = (key, _pieces(c))
    return kept[1]


def _pieces(c: Candidate) -> Pieces:
    pg, ctx, choice = c.graph, c.ctx, c.solution.choice
    where = sides(pg)
    L = max(1, block_count(pg))
    time, fwd, sync, recompute = defaultdict(float), defaultdict(float), defaultdict(float), defaultdict(float)
    optimizer, after = defaultdict(float), defaultdict(float)
    memory: dict[str, dict[str, float]] = {s: defaultdict(float) for s in ("pre", "block", "post")}

    def add(acc, name, value, part=None):
        for side in where[name]:
            share = value / L if side == "block" and part not in ONE_BLOCK else value
            if part is None:
                acc[side] += share
            else:
                acc[side][part] += share

    costs = owner_costs(pg, ctx)
    for o in pg.owners():
        cost, n = costs[o.node.name][choice[o.node.name]], pg.counts[o.node.name]
        add(time, o.node.name, n * (cost.fwd_s + cost.bwd_s))
        add(fwd, o.node.name, n * cost.fwd_s)
        add(optimizer, o.node.name, n * cost.step_s)
    for t in terms(pg, ctx, costs):
        if t.part == "recompute_s":
            add(time, t.owner, t.values[choice[t.owner]])
            add(recompute, t.owner, t.values[choice[t.owner]])
        else:
            add(memory, t.owner, t.values[choice[t.owner]], t.part)
    _edges(c, where, add, time, sync, memory, after)
    return Pieces(dict(time), dict(fwd), dict(recompute), dict(sync), {s: dict(v) for s, v in memory.items()},
                  _boundary_bytes(c), L, dict(optimizer), dict(after))


def _edges(c, where, add, time, sync, memory, after) -> None:
    """Resharding time (exposed) by consumer, gradient sync by parameter, bytes kept by consumer; consumers needing
    the same placement share one move (moves.py, as in predict.redistributions)."""
    pg, ctx = c.graph, c.ctx
    for mv in chosen_moves(pg, ctx, c.solution.choice):
        e, s, h = _price(c, mv.producer, mv.k, mv.dst, mv.partial, mv.keeper is not None, mv.rerun)
        s, a = zero_sync(ctx, s)
        side = mv.producer if pg.nodes[mv.producer].kind == "param" else mv.reader
        add(time, mv.reader, mv.count * e)
        add(sync, side, mv.count * s)
        add(after, side, mv.count * a)
        if mv.keeper is not None:
            add(memory, mv.keeper, mv.held * h, "activations")


def _price(c, prod: str, k: int, dst, partial, kept: bool, rerun: bool = False):
    pp = c.graph.nodes[prod]
    return edge_price(c.ctx, pp.info.out_shapes[k], pp.info.out_dtypes[k], pp.requires_grad, pp.kind == "param",
                      pp.strategies[c.solution.choice[prod]].outs[k], dst, partial, kept, rerun)


def _boundary_bytes(c) -> float:
    """Bytes entering one block from outside it (the residual stream), at their producers' placements."""
    pg, ctx = c.graph, c.ctx
    blocks = max(pg.block_classes, key=len) if pg.block_classes else []
    if len(blocks) < 2:
        return 0.0
    second, moved = blocks[1], set()
    for p in pg.nodes.values():
        if p.block == second and p.kind == "op":
            for prod, k in p.inputs:
                q = pg.nodes[prod]
                if q.block not in (None, second) and q.info.out_dtypes[k].is_floating_point:
                    moved.add((prod, k))
    total = 0.0
    for prod, k in moved:
        q = pg.nodes[prod]
        s = q.strategies[c.solution.choice[q.owner]]
        total += nbytes(local_shape(q.info.out_shapes[k], s.outs[k], ctx.degrees), q.info.out_dtypes[k])
    return total


def layouts(c: Candidate, req, budget: float) -> list[Layout]:
    """Every schedule (and v) the pins allow, each with its best stage cut; those that fit first, fastest first."""
    p, m = c.degrees.get("pp", 1), c.micro_batches
    pcs = pieces(c)
    link = axis_links(req.hardware, [("pp", p), ("dp", c.degrees["dp"]), ("tp", c.degrees["tp"])])["pp"]
    t_p2p = collective_time_s("send_recv", pcs.p2p_bytes, 2, link) if p > 1 else 0.0
    out, cuts = [], {}
    for schedule, v in schedules(req, p, m, pcs.blocks, c):
        lay = _layout(pcs, schedule, p, m, v, t_p2p, budget, c, cuts)
        if lay is not None:
            out.append(lay)
    out.sort(key=lambda lay: (max(sum(mem.values()) for mem in lay.memory) > budget, lay.step_s))
    return out


def schedules(req, p: int, m: int, blocks: int, c=None) -> list[tuple[str, int]]:
    """(schedule, v) pairs the pins allow. Zero-bubble is left out where the runtime refuses it (runtime/pipeline.py):
    under selective checkpointing and under ZeRO-3."""
    pinned_s, pinned_v = req.fix.get("schedule"), req.fix.get("v")
    runs_zb = c is None or not (c.memory.ac == "selective" or c.memory.zero == 3 and c.ctx.dp > 1)
    out = []
    for schedule in SCHEDULES if pinned_s is None else [pinned_s]:
        if schedule == "zero-bubble" and not runs_zb:
            continue
        if schedule in INTERLEAVED:
            vs = [pinned_v] if pinned_v else [v for v in (2, 3, 4, 6, 8) if p * v <= blocks]
            out += [(schedule, v) for v in vs if p > 1 and m % p == 0 and p * v <= blocks]
        elif not pinned_v or pinned_v == 1:
            out.append((schedule, 1))
    return out


def _layout(pcs: Pieces, schedule: str, p: int, m: int, v: int, t_p2p: float, budget: float, c,
            cuts: dict) -> Layout | None:
    S = p * v
    flight = [in_flight(schedule, p, m, v, r) for r in range(p)]
    key = (S, tuple(flight) if v == 1 else None)  # interleaved cuts ignore memory: one cut per v
    if key not in cuts:
        cuts[key] = _cut(pcs, p, S, flight if v == 1 else None, budget, m)
    if cuts[key] is None:
        return None
    stages = stages_of(cuts[key], p)
    mine = [[st for st in stages if st.rank == r] for r in range(p)]
    rank_s = [sum(stage_time(pcs, st) for st in ss) for ss in mine]
    rank_fwd = [sum(stage_fwd(pcs, st) for st in ss) for ss in mine]
    total, bubble = step_time(schedule, p, m, v, [stage_time(pcs, st) for st in stages], rank_s, rank_fwd)
    p2p = 2 * t_p2p * (m * v + p - 1) if p > 1 else 0.0
    # The data-parallel reduction of a rank's gradients starts as their last micro-batch's backward lands
    # (runtime/compiled.py `_GradSync.pipelined`; FSDP's reduce-scatter under ZeRO-2/3 likewise, driven by torch's
    # schedule) and hides behind that micro-batch's backward through the rank's stages: 2/3 of its forward +
    # backward (cost.py's 1:2 split), as at pp = 1 behind one micro-batch's backward. ZeRO-1's broadcast of the
    # updated partitions follows the optimizer step: never hidden.
    backward_window = max(rank_s) * 2 / 3
    sync = max(rank_sync(pcs, ss) for ss in mine)
    exposed = exposed_s(c.ctx.hw, sync, backward_window)
    after = max(rank_after(pcs, ss) for ss in mine)
    optimizer = max(rank_optimizer(pcs, ss) for ss in mine)
    memory, peak_at = [], []
    for r, ss in enumerate(mine):
        moment, at = peak(rank_memory(pcs, ss, flight[r], m), m)
        memory.append(at)
        peak_at.append(f"backward {moment}")
    return Layout(schedule, v, stages, total + p2p + exposed + after + optimizer, bubble, p2p, exposed, rank_s, memory,
                  peak_at, optimizer, after)


def _cut(pcs: Pieces, p: int, S: int, flight: list[float] | None, budget: float, m: int = 1) -> list[int] | None:
    """The stage cut: fastest slowest stage, each stage within the budget when `flight` is given (one stage per
    rank); if no cut fits, the fastest one (the caller reports the memory). A stage never needs more blocks than
    the even cut plus what the embedding or head costs in blocks, so sizes stop there."""
    L, t = pcs.blocks, pcs.time_s.get("block", 0.0)
    extra = max(pcs.time_s.get("pre", 0.0), pcs.time_s.get("post", 0.0)) / t if t > 0 else L
    most = min(L, math.ceil(L / S) + math.ceil(extra))
    n = np.arange(L + 1)

    def row(s: int, check: bool):
        st0, st1 = (Stage(s, s % p, list(range(k)), s == 0, s == S - 1) for k in (0, 1))
        base, per = stage_time(pcs, st0), stage_time(pcs, st1) - stage_time(pcs, st0)
        cost = np.where(n <= most, base + per * n, np.inf)
        if check and flight is not None:
            m0, m1 = (sum(rank_memory(pcs, [st], flight[s], m).values()) for st in (st0, st1))
            cost = np.where(m0 + (m1 - m0) * n <= budget, cost, np.inf)
        return cost

    return partition(L, S, lambda s: row(s, True)) or partition(L, S, lambda s: row(s, False))


def rank_weight(req, pg, degrees: dict[str, int], m: int):
    """(owner, part) -> the share of a whole-model memory term that the most loaded pipeline rank holds, for the
    ILP's memory constraint: ceil(L/p) of the blocks, activations times the fewest micro-batches in flight any
    allowed schedule keeps on the first rank; the code before and after the blocks both counted (one rank holds
    at most one of them unless p = 1, so this errs on the safe side; the layout then checks every rank)."""
    p = degrees.get("pp", 1)
    if p == 1:
        return _unit
    where = sides(pg)
    blocks = max(1, max((len(c) for c in pg.block_classes), default=1))
    share = math.ceil(blocks / p) / blocks
    options = schedules(req, p, m, blocks) or [("gpipe", 1)]
    first = min(in_flight(s, p, m, v, 0) for s, v in options)
    last = min(in_flight(s, p, m, v, p - 1) for s, v in options)

    def weight(owner: str, part: str) -> float:
        side = where[owner]
        if part in ONE_BLOCK:
            return 1.0
        flight = 1.0 if part in STATE else first if "pre" in side or "block" in side else last
        return flight * (share if side == ("block",) else 1.0)

    return weight


def _unit(owner: str, part: str) -> float:
    return 1.0
