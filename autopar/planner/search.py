"""The outer search: mesh degrees and micro-batching around the inner sharding ILP, scored by one objective.

Candidates are factorisations devices = dp x tp with tp inside a node (tp divides the devices per node: tensor
parallelism's per-layer collectives need the fastest links, Narayanan et al. 2021 Sec. 3.3), and micro-batch
counts m (gradient accumulation) whose micro-step batch still divides by dp, tried from m = 1 upward in rounds
until the ILP fits the memory budget without checkpointing or ZeRO-3, or two counts past the first fit. Keys
pinned with `--fix` restrict the candidates; a fully pinned configuration is evaluated, not searched.

Before the rounds, each flat mesh is probed at one sample per replica with the least recomputation that fits
(`_probe`): an easy ILP, often near the best, and an incumbent for everything after it. A round's job whose lower
bound cannot beat the incumbent is skipped: first a bound from node costs alone (bounds.py, before its ILP is built),
then the ILP's LP relaxation (ShardingILP.solve's cutoff, before branching). Both bound every plan the job
could return, so a skipped job could never have been ranked first among the flat candidates. Pipeline meshes take
their sharding from the fastest solved flat candidate of their tp (`_pipelines`); every flat mesh's probe is
solved, so each tp that fits has one, and a pipeline mesh without one is bounded by the best flat plan over pp.
(The probes are candidates too, which the rounds alone could stop short of.)
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable

from autopar.capture import Captured
from autopar.errors import MeshError, PlanError
from autopar.placement import R
from autopar.plan import Plan
from autopar.planner import bounds
from autopar.planner.bounds import predicted
from autopar.planner.candidate import Candidate, SearchRequest, Solution
from autopar.planner.graph import PlanGraph, build
from autopar.planner.ilp import OUTPRICED, ShardingILP, memory_lower_bound
from autopar.planner.layers import relax
from autopar.planner.memory import MemoryConfig
from autopar.planner.pins import pinned_strategies
from autopar.planner.space import (AXES, NO_LIMIT, deepened_trace, fmt_bytes, fmt_mesh, frontier, graph_for,
                                   memory_budget, memory_configs, mesh_candidates, micro_batch_counts,
                                   no_batch_message, settles)
from autopar.planner.staging import layouts, rank_weight
from autopar.planner.predict import predict, to_plan
from autopar.strategies import Strategy


class Outpriced(Exception):
    """search(..., beat=t) found no candidate that could be faster than t seconds per step; `alternative` is its
    best, as a plan records its alternatives (None: a cp fold whose every candidate a cp = 1 plan matches,
    micro_batch_counts)."""

    def __init__(self, alternative: dict | None) -> None:
        best = "none" if alternative is None else f"{alternative['step_time_s']:.4g} s"
        super().__init__(f"outpriced (best candidate: {best})")
        self.alternative = alternative

    def __reduce__(self):  # raised in a forked fold process (cp_search.py) and unpickled here
        return Outpriced, (self.alternative,)


def search(req: SearchRequest, trace: Callable[[int], Captured], progress=None, proxy=None,
           beat: float | None = None, flat_best=None) -> Plan:
    """Best plan over the candidates; `trace(micro_batch)` captures the model at that micro-step batch; `proxy`,
    optional, is (trace of a copy with two blocks, depth ratio): candidates are then planned on that copy
    deepened to the model's depth (proxy.py), and only the chosen one is mapped onto the full model's graph.
    `beat`, optional, is another search's step time (cp_search.py): when the best candidate cannot beat it
    (`Ranked.bound`), Outpriced is raised before the full-depth graph, which is then never taken. `flat_best`,
    optional (`rank`), hands the fastest flat candidate's step time between cp = 1 and the folds (cp_search.py)."""
    ranked = rank(req, trace, progress, proxy, flat_best)
    if beat is not None and ranked.bound() >= beat:
        raise Outpriced(ranked.alternative())
    return finish(ranked)


@dataclass
class Ranked:
    """A search's candidates, fastest first, before the winner is mapped to full depth (`finish`)."""

    req: SearchRequest
    trace: Callable[[int], Captured]  # the planning trace (the deepened proxy where there is one)
    full_trace: Callable[[int], Captured]
    proxy: tuple | None
    budget: float
    results: list[Candidate]
    t0: float

    def bound(self) -> float:
        """The best candidate's step time with every recomputation given back (`relax`, the only step after
        ranking that lowers a prediction): no plan of this search is faster."""
        p = predicted(self.req, self.results[0])
        return p.step_time_s - (p.recompute_s if _gives_back(self.req, self.results[0]) else 0.0)

    def alternative(self) -> dict:
        return _alternative(self.req, self.results[0])


def rank(req: SearchRequest, trace: Callable[[int], Captured], progress=None, proxy=None, flat_best=None) -> Ranked:
    """Every candidate, fastest first. `flat_best`, optional (cp_search.FlatBest): at cp = 1 this search posts its
    fastest flat candidate's step time there once its flat meshes are solved; a fold takes it before pricing its
    pipeline meshes, which are then left out where they cannot beat it either (`_pipelines`): such a fold cannot
    beat cp = 1, whose plan is at least as fast."""
    t0 = time.perf_counter()
    budget = memory_budget(req)
    full_trace, blocks = trace, _depth(req, trace, proxy)
    if proxy is not None:
        trace = deepened_trace(proxy[0], blocks)
    _check_pipeline_pins(req, blocks)
    meshes = [d for d in mesh_candidates(req, blocks) if micro_batch_counts(req, d["dp"], d["pp"])]
    if not meshes and req.cp_searched:  # every micro-batching of this fold is matched by a cp = 1 plan
        raise Outpriced(None)
    if not meshes:
        raise MeshError(no_batch_message(req, mesh_candidates(req, blocks)))
    flat = [c for c in _solve_meshes(req, trace, [d for d in meshes if d["pp"] == 1], budget, progress, proxy)
            if c.solution is not None]
    outside = None
    if flat_best is not None and req.cp == 1:
        flat_best.post(bounds.incumbent(req, flat))
    elif flat_best is not None:
        outside = flat_best.get()
    piped = _pipelines(req, trace, [d for d in meshes if d["pp"] > 1], budget, progress, flat, proxy, outside)
    results = flat + [c for c in piped if c.solution is not None]
    if not results and req.fix.get("pins"):
        pins = ",".join(f"{g}={i}" for g, i in req.fix["pins"].items())
        raise PlanError(f"no mesh meets --pin {pins} within the memory budget; tp pins need tp > 1 (e.g. --fix "
                        "tp=2), or drop the pins")
    if not results:
        raise PlanError(_infeasible_message(req, trace, meshes))
    results.sort(key=lambda c: predicted(req, c).step_time_s)  # rank by what the plan reports
    return Ranked(req, trace, full_trace, proxy, budget, results, t0)


def finish(r: Ranked) -> Plan:
    """The plan of the best candidate: on the full model's graph, its checkpointing relaxed where memory allows."""
    req, budget = r.req, r.budget
    best = _materialized(req, r.trace, r.results[0], budget)
    if r.proxy is not None:
        best = _at_full_depth(req, r.full_trace, budget, best)
    ac_layers: dict[str, str] = {}
    if _gives_back(req, best):
        ac_layers, best.prediction = relax(best, predicted(req, best), budget, req)
    stats = {"seconds": round(time.perf_counter() - r.t0, 3), "candidates": len(r.results),
             "status": best.solution.status, "variables": best.solution.variables,
             "constraints": best.solution.constraints, "solve_s": round(best.solution.solve_s, 3)}
    if req.fix.get("pins"):
        stats["pins"] = dict(req.fix["pins"])  # module glob -> intent, as asked (the strategies show the result)
    others = [_alternative(req, c) for c in r.results[1:]]
    return to_plan(req, best, budget, stats, others, ac_layers)


def _gives_back(req: SearchRequest, c: Candidate) -> bool:
    """Whether the chosen candidate's checkpointing is relaxed after ranking (layers.relax gives back the blocks that
    fit): a searched mode at pp = 1; a pinned mode is a what-if for every block."""
    return "ac" not in req.fix and c.degrees["pp"] == 1


def _check_pipeline_pins(req: SearchRequest, blocks: int) -> None:
    pp, v = int(req.fix.get("pp", 0)), int(req.fix.get("v", 1))
    if pp == 1 and ("schedule" in req.fix or v > 1):
        raise MeshError("a pipeline schedule needs pp > 1; drop schedule/v from --fix or pin pp=2 or more")
    if pp > 1 and pp * v > blocks:
        raise MeshError(f"pp={pp}{f' x v={v}' if v > 1 else ''} cuts the model into more stages than its {blocks} "
                        "blocks (repeated layers); lower pp (or v), or use a deeper model")
    if req.fix.get("schedule") in ("gpipe", "1f1b") and v > 1:
        raise MeshError(f"schedule {req.fix['schedule']} runs one stage per rank; v > 1 needs interleaved or "
                        "zero-bubble")


def _depth(req: SearchRequest, trace, proxy) -> int:
    """Repeated blocks of the model (the most pipeline stages it can be cut into)."""
    if proxy is not None:
        return round(2 * proxy[1])
    mbs, dp = req.fix.get("mbs"), req.fix.get("dp")  # any batch shows the blocks; this one is traced again later
    captured = trace(int(mbs) * int(dp) if mbs and dp and req.batch % (int(mbs) * int(dp)) == 0 else req.batch)
    classes = captured.block_classes if captured.block_classes is not None else \
        build(captured, (1, 1), AXES).block_classes
    return max((len(c) for c in classes), default=1)


def _at_full_depth(req, trace, budget, c: Candidate) -> Candidate:
    """The chosen candidate on the full trace, for the node names a plan records. The deepened proxy and the full
    trace have the same decision owners in the same order (the code before the blocks, block 0, the code after)
    and give the same costs (proxy.py), so the proxy's choices carry over by position; the ILP is solved again
    only where they do not (owners that differ, or a prediction that moves)."""
    pg, _ = graph_for(req, trace(req.batch // c.micro_batches), c.degrees, c.memory)
    sol = _by_position(c, pg)
    if sol is not None:
        full = _candidate(req, trace, c.degrees, c.micro_batches, sol, c.memory, budget)
        if full.solution is not None and math.isclose(predicted(req, full).step_time_s,
                                                      predicted(req, c).step_time_s, rel_tol=1e-6):
            return full
    sol = _solve_one(req, trace, budget, c.degrees, c.micro_batches, c.memory)
    if sol is None:
        raise PlanError(f"the chosen plan ({fmt_mesh(c.degrees)}, zero={c.memory.zero}, ac={c.memory.ac}) does "
                        "not solve on the full model as it did on its two-block copy; report this with the command")
    full = _candidate(req, trace, c.degrees, c.micro_batches, sol, c.memory, budget)
    return full if full.solution is not None else c


def _by_position(c: Candidate, full: PlanGraph) -> Solution | None:
    """c's choices on the full graph, owner by owner in graph order; None unless every owner has its twin (same
    op, same shapes, same strategies)."""
    mine, theirs = c.graph.owners(), full.owners()
    if len(mine) != len(theirs):
        return None
    choice = {}
    for p, q in zip(mine, theirs):
        if p.kind != q.kind or p.node.target != q.node.target or p.info.in_shapes != q.info.in_shapes or \
                p.info.out_shapes != q.info.out_shapes or p.strategies != q.strategies:
            return None
        choice[q.node.name] = c.solution.choice[p.node.name]
    return replace(c.solution, choice=choice)


def _solve_meshes(req, trace, meshes, budget, progress, proxy=None, beat: float | None = None) -> list[Candidate]:
    """Each mesh's best (micro-batching, ZeRO stage, checkpointing), in rounds: each round traces each micro-batch
    size it needs once (here, so forked workers inherit the trace), then solves every pending mesh's frontier
    configurations, in parallel worker processes where that is safe (no process group), in order otherwise.
    A mesh is done once it fits without checkpointing or ZeRO-3 (more micro-batches cannot be faster then), or
    after two micro-batch counts past its first fit. `beat`, optional, is a flat candidate's step time found
    elsewhere (pipeline meshes without a donor, `_pipelines`): a job whose bound cannot beat it is not built."""
    pending = {i: (micro_batch_counts(req, d["dp"], d["pp"]), memory_configs(req, d["dp"])) for i, d in
               enumerate(meshes)}
    proxy = (*proxy, {}) if proxy is not None else None  # + a cache of bounds per (mesh, configuration)
    if proxy is not None:  # skip micro-batchings (and meshes) whose memory lower bound already exceeds the budget
        first = {i: bounds.likely_first(req, meshes[i], c, budget, proxy, cfgs[-1]) for i, (c, cfgs) in pending.items()}
        pending = {i: (c[first[i]:], cfgs) for i, (c, cfgs) in pending.items() if first[i] is not None}
    best: dict[int, Candidate] = {}
    extra: dict[int, int] = {}
    refused: set[tuple[int, int, MemoryConfig]] = set()
    probes = _probe(req, trace, meshes, pending, budget, proxy, progress)
    while pending:
        jobs, owners = [], []
        cutoff = min((t for t in (beat, bounds.incumbent(req, [*best.values(), *probes.values()])) if t is not None),
                     default=None)
        fitted: dict[int, MemoryConfig] = {}  # meshes with a job that fits but cannot beat the incumbent
        for i, (counts, cfgs) in pending.items():
            m = counts[0]
            fits = _fits_fn(req, trace, meshes[i], m, budget, proxy, refused, i)
            for cfg in frontier(cfgs, fits):
                if cutoff is not None and \
                        bounds.time_bound(req, trace, meshes[i], m, cfg, proxy) >= cutoff * (1 + 1e-9):
                    fitted[i] = cfg  # compute alone is slower than the incumbent: not even built
                    continue
                jobs.append((meshes[i], m, cfg))
                owners.append(i)
        for d, m, cfg in jobs:  # here, so that forked workers inherit the traces and planning graphs
            graph_for(req, trace(req.batch // m), d, cfg)
        if progress and jobs:
            progress(f"solving {len(jobs)} candidate(s): " + ", ".join(
                f"{fmt_mesh(d)} m={m} zero={c.zero} ac={c.ac}" for d, m, c in jobs))
        solved_here: dict[int, bool] = {i: True for i in fitted}
        known = [i in probes and (probes[i].micro_batches, probes[i].memory) == job[1:]  # the probe solved it
                 for i, job in zip(owners, jobs)]
        solved = iter(_run_jobs(req, trace, budget, [j for j, k in zip(jobs, known) if not k], cutoff))
        solutions = [probes[i].solution if k else next(solved) for i, k in zip(owners, known)]
        if progress and any(s is not None and s.status == OUTPRICED for s in solutions):
            progress(f"{sum(s is not None and s.status == OUTPRICED for s in solutions)} of them cannot beat the "
                     "best plan so far (LP relaxation): not branched on")
        for i, job, sol, k in zip(owners, jobs, solutions, known):
            if sol is not None and sol.status == OUTPRICED:
                fitted[i] = job[2]
                solved_here[i] = True
                continue
            if sol is None:
                refused.add((i, job[1], job[2]))
                solved_here.setdefault(i, False)
                continue
            cand = probes[i] if k else _candidate(req, trace, job[0], job[1], sol, job[2], budget)
            if cand.solution is None:  # no pipeline schedule fits the budget
                refused.add((i, job[1], job[2]))
                solved_here.setdefault(i, False)
                continue
            _keep_faster(req, best, i, cand)
            solved_here[i] = True
        _advance(pending, best, extra, solved_here, refused, meshes, fitted)
    for i, c in probes.items():
        _keep_faster(req, best, i, c)
    return [best[i] for i in sorted(best)]


def _keep_faster(req, best: dict[int, Candidate], i: int, c: Candidate) -> None:
    if i not in best or predicted(req, c).step_time_s < predicted(req, best[i]).step_time_s:
        best[i] = c


def _probe(req, trace, meshes, pending, budget, proxy, progress) -> dict[int, Candidate]:
    """Before the rounds: each flat mesh's most micro-batches (one sample per replica) with the least
    recomputation that fits, solved whatever it costs. These plans need little memory, so their ILPs are easy (the
    relaxation is usually integral), they are often close to the best, and they give the rounds an incumbent: a
    round's ILP whose LP relaxation cannot beat it is not branched on (ShardingILP.solve's cutoff). They are
    candidates like any other (the rounds stop two micro-batch counts after a mesh first fits, which can stop short
    of these)."""
    tries = {}  # mesh -> its configurations to try, in order: the least recomputation that fits, ZeRO upward
    for i, (counts, cfgs) in pending.items():
        if meshes[i]["pp"] > 1:
            continue
        first = frontier(cfgs, _fits_fn(req, trace, meshes[i], counts[0], budget, proxy, set(), i))
        if len(counts) > 1 and first and settles(first[0]):  # its first round is such a job already
            continue
        least = frontier(cfgs, _fits_fn(req, trace, meshes[i], counts[-1], budget, proxy, set(), i))
        if least:
            tries[i] = [c for c in cfgs if c.ac == least[0].ac and c.zero >= least[0].zero]
    out = {}
    while tries:
        owners = list(tries)
        jobs = [(meshes[i], pending[i][0][-1], tries[i][0]) for i in owners]
        for d, m, cfg in jobs:
            graph_for(req, trace(req.batch // m), d, cfg)
        if progress:
            progress(f"probing {len(jobs)} mesh(es) at one sample per replica: " + ", ".join(
                f"{fmt_mesh(d)} m={m} zero={c.zero} ac={c.ac}" for d, m, c in jobs))
        for i, job, sol in zip(owners, jobs, _run_jobs(req, trace, budget, jobs, prune=False)):
            c = _candidate(req, trace, *job[:2], sol, job[2], budget) if sol is not None else None
            if c is not None and c.solution is not None:
                out[i] = c
            tries[i] = [] if i in out else tries[i][1:]  # the ILP did not fit: the next ZeRO stage
        tries = {i: t for i, t in tries.items() if t}
    return out


def _pipelines(req, trace, meshes, budget, progress, donors: list[Candidate], proxy,
               outside: float | None = None) -> list[Candidate]:
    """Each pipeline mesh's best candidate. A stage's intra-stage problem is the same sharding problem as the
    pp = 1 mesh with the same tp on a smaller batch, so pipeline meshes first take the solved sharding of that
    mesh (the same placements, whole on an axis of one rank: `_on_axes`; priced afresh on their own graph) under
    each micro-batching and the cheapest ZeRO/checkpointing whose layout fits; the ILP is solved only for meshes
    where that does not fit, or that have no such donor (pp pinned). Meshes that cannot beat the fastest flat
    candidate, or `outside` (another search's, `rank`), are left out."""
    if not meshes:
        return []
    donor = {}
    for c in sorted(donors, key=lambda c: predicted(req, c).step_time_s):
        donor.setdefault(c.degrees["tp"], c)
    beat = min((t for t in (bounds.incumbent(req, donors), outside) if t is not None), default=None)
    priced = [c for c in _price_all(req, trace, [d for d in meshes if d["tp"] in donor], donor, budget, proxy, beat)
              if c is not None]
    if progress and priced:
        progress(f"priced {len(priced)} pipeline mesh(es), with their pp=1 sharding where it fits")
    return priced + _solve_meshes(req, trace, [d for d in meshes if d["tp"] not in donor], budget, progress, proxy,
                                  beat=beat)


def _price(req, trace, d, donor: dict[int, Candidate], budget, proxy, beat: float | None) -> Candidate | None:
    """Mesh d's fastest micro-batching under its donor's sharding; its own ILP where none fits (None: nothing
    does, or no micro-batching can beat `beat`, the fastest flat plan, bounds.pipeline_floor: the mesh is left out,
    as a flat mesh whose bound cannot beat the incumbent is; one that may is priced whole, so its row is its best)."""
    counts = micro_batch_counts(req, d["dp"], d["pp"])
    if beat is not None and all(bounds.pipeline_floor(req, d, m, donor[d["tp"]]) >= beat * (1 + 1e-9)
                                for m in counts):
        return None
    found = [c for m in counts for c in [_transferred(req, trace, d, m, donor[d["tp"]], budget)] if c is not None]
    if found:
        return min(found, key=lambda c: predicted(req, c).step_time_s)
    solved = _solve_meshes(req, trace, [d], budget, None, proxy)
    return solved[0] if solved else None


def _price_all(req, trace, meshes, donor, budget, proxy, beat: float | None) -> list[Candidate | None]:
    """`_price` for every mesh; in forked workers where that is safe, which return each result without its
    planning graph (the winner is rebuilt by `_materialized`). A task is meshes of neighbouring dp, which trace
    the same micro-step batches (dp x 1, dp x 2); there are CHUNKS_PER_WORKER times more tasks than workers, the
    largest first, so that a worker that finishes early takes the next rather than leaving its core idle while
    another works through a long one."""
    workers = min(len(meshes), os.cpu_count() or 1, 4)
    if workers < 2 or forbid_fork():
        return [_price(req, trace, d, donor, budget, proxy, beat) for d in meshes]
    chunks = sorted(_by_dp(meshes, CHUNKS_PER_WORKER * workers), key=len, reverse=True)
    global _FORK_STATE
    _FORK_STATE = (req, trace, budget, donor, proxy, beat)
    try:
        with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=mp.get_context("fork")) as pool:
            futures = [pool.submit(_price_worker, [meshes[i] for i in chunk]) for chunk in chunks]
            out: list[Candidate | None] = [None] * len(meshes)
            for chunk, f in zip(chunks, futures):
                for i, c in zip(chunk, f.result()):
                    out[i] = c
            return out
    finally:
        _FORK_STATE = None


CHUNKS_PER_WORKER = 3


def _by_dp(meshes, n: int) -> list[list[int]]:
    """Mesh indices in at most n chunks of about equal size, cut only between different dp (ascending)."""
    groups: dict[int, list[int]] = {}
    for i in sorted(range(len(meshes)), key=lambda i: meshes[i]["dp"]):
        groups.setdefault(meshes[i]["dp"], []).append(i)
    target = len(meshes) / n
    chunks: list[list[int]] = [[]]
    for group in groups.values():
        overshoot = abs(len(chunks[-1]) + len(group) - target) > abs(len(chunks[-1]) - target)
        if chunks[-1] and overshoot and len(chunks) < n:
            chunks.append([])
        chunks[-1].extend(group)
    return chunks


def _price_worker(meshes):
    global _IN_WORKER
    _IN_WORKER = True  # no process pools inside this one: its ILPs run here, one after another
    req, trace, budget, donor, proxy, beat = _FORK_STATE
    out = []
    for d in meshes:
        c = _price(req, trace, d, donor, budget, proxy, beat)
        if c is not None:
            predicted(req, c)
            c.graph = None  # fx nodes stay in the worker; the parent rebuilds the graph if this candidate wins
            c.__dict__.pop("_pieces", None)  # staging.pieces' cache holds the graph too
        out.append(c)
    return out


def _materialized(req, trace, c: Candidate, budget) -> Candidate:
    """A candidate priced in a worker, with its planning graph again (the same graph, choices and layout)."""
    if c.graph is not None:
        return c
    return _candidate(req, trace, c.degrees, c.micro_batches, c.solution, c.memory, budget)


def _transferred(req, trace, degrees, m, donor: Candidate, budget) -> Candidate | None:
    """The donor's placements on this mesh and micro-batching, with the first ZeRO/checkpointing configuration
    (frontier order) whose pipeline layout fits; None when a placement does not exist here or nothing fits."""
    pg = graph_for(req, trace(req.batch // m), degrees)[0]  # one planning graph per mesh, whatever the configuration
    flat = tuple(k for k, a in enumerate(AXES) if degrees[a] == 1)  # axes of one rank: any placement is whole
    choice = {}
    for o in pg.owners():
        theirs = donor.graph.nodes.get(o.node.name)
        if theirs is None:
            return None
        want = _on_axes(theirs.strategies[donor.solution.choice[o.node.name]], flat)
        k = next((k for k, s in enumerate(o.strategies) if s == want), None)
        if k is None:
            return None
        choice[o.node.name] = k
    sol = Solution(choice, "pp=1 sharding", 0.0, 0.0, donor.solution.variables, donor.solution.constraints)
    for cfg in frontier(memory_configs(req, degrees["dp"]), lambda cfg: True) + \
            [c for c in memory_configs(req, degrees["dp"]) if c.zero == 3]:
        c = _candidate(req, trace, degrees, m, sol, cfg, budget)
        if c.solution is not None:
            return c
    return None


def _on_axes(s: Strategy, flat: tuple[int, ...]) -> Strategy:
    """Strategy s with every placement on the axes `flat` (degree 1 on this mesh) replicated: a shard or partial
    sum over one rank is the whole tensor, and planning graphs list only R there (strategies.expand)."""
    if not flat:
        return s
    whole = lambda t: tuple(R if axis in flat else p for axis, p in enumerate(t))
    return Strategy(outs=tuple(map(whole, s.outs)), ins=tuple(map(whole, s.ins)))


def _advance(pending, best, extra, solved_here, refused, meshes, fitted) -> None:
    """Move each mesh on: retry the same micro-batch count if a frontier job failed the ILP (the frontier then
    moves up), else the next count, until done. Pipelines try every count (more micro-batches, less bubble).
    A job outpriced by the incumbent (`fitted`) fits: the mesh moves on as if it had been solved, no faster."""
    for i in list(pending):
        counts, cfgs = pending[i]
        if i in solved_here and not solved_here[i] and any((i, counts[0], c) not in refused for c in cfgs):
            continue  # same m, next frontier
        done = (i in best and settles(best[i].memory) or i in fitted and settles(fitted[i])) and \
            meshes[i]["pp"] == 1
        if i in best or i in fitted:
            extra[i] = extra.get(i, 0) + 1
        if done or extra.get(i, 0) > 2 or len(counts) == 1:
            del pending[i]
        else:
            pending[i] = (counts[1:], cfgs)


def _fits_fn(req, trace, degrees, m, budget, proxy, refused, i):
    """Memory lower-bound test for a configuration at micro-batch count m (on the shallow proxy when there is one)."""
    def fits(cfg: MemoryConfig) -> bool:
        if (i, m, cfg) in refused:
            return False
        if proxy is not None:
            return bounds.proxy_bound(req, degrees, proxy, cfg, m) <= budget
        pg, ctx = graph_for(req, trace(req.batch // m), degrees, cfg)
        return memory_lower_bound(pg, ctx, bounds.priced(pg, ctx)[1], micro_batches=m) <= budget
    return fits


def _run_jobs(req, trace, budget, jobs, cutoff_s: float | None = None, *, prune: bool = True) -> list[Solution | None]:
    """Each job's solution; in forked workers where that is safe. `cutoff_s`: the
    incumbent flat jobs must beat (their ILP's objective is their prediction). Without recomputation first: those
    ILPs are easy and their plans the likely best, so the others then face a lower cutoff. `prune=False`: every
    job solved (the probes, whose plans pipeline meshes take their sharding from)."""
    out: list[Solution | None] = [None] * len(jobs)
    phases = [[k for k, job in enumerate(jobs) if (job[2].ac == "none") == easy] for easy in (True, False)]
    if not prune or not phases[0] or not any(jobs[k][0]["pp"] == 1 for k in phases[1]):
        phases = [list(range(len(jobs)))]
    for phase in phases:
        todo = [(*jobs[k], cutoff_s if jobs[k][0]["pp"] == 1 else None) for k in phase]
        for k, sol in zip(phase, _solve_all(req, trace, budget, todo)):
            out[k] = sol
            if prune and sol is not None and sol.status in ("Optimal", "Not Solved") and jobs[k][0]["pp"] == 1:
                cutoff_s = sol.objective_s if cutoff_s is None else min(cutoff_s, sol.objective_s)
    return out


def _solve_all(req, trace, budget, todo) -> list[Solution | None]:
    workers = min(len(todo), os.cpu_count() or 1, 4)
    if workers < 2 or forbid_fork():
        return [_solve_one(req, trace, budget, *job) for job in todo]
    global _FORK_STATE
    _FORK_STATE = (req, trace, budget, None, None)
    try:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            futures = [pool.submit(_job_worker, job) for job in todo]
            return [f.result() for f in futures]
    finally:
        _FORK_STATE = None


_FORK_STATE = None  # (req, trace, budget, donors, proxy) for forked workers; the last two for pricing only
_IN_WORKER = False  # set in forked workers


def forbid_fork() -> bool:
    """Solve in this process: under a process group (forked children would share its sockets), inside a worker
    already, or where fork does not exist."""
    return _IN_WORKER or _distributed() or "fork" not in mp.get_all_start_methods()


def _job_worker(job):
    req, trace, budget, _, _ = _FORK_STATE
    return _solve_one(req, trace, budget, *job)


def _solve_one(req, trace, budget, degrees, m, cfg: MemoryConfig, cutoff_s: float | None = None,
               threads: int = 1) -> Solution | None:
    pg, ctx = graph_for(req, trace(req.batch // m), degrees, cfg)
    pinned = pinned_strategies(pg, req.fix.get("pins") or {})
    if pinned is None:  # the per-module pins cannot hold on this mesh (e.g. a tp pin where tp=1)
        return None
    ilp = ShardingILP(pg, ctx, budget, m, pinned, weight=rank_weight(req, pg, degrees, m))
    if ilp.memory_lower_bound() > budget:  # certainly infeasible: no need to ask the solver
        return None
    return ilp.solve(req.time_limit_s, threads, cutoff_s)


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _candidate(req, trace, degrees, m, solution, cfg: MemoryConfig, budget: float) -> Candidate:
    """The solved candidate; with pipeline parallelism, with its best layout (no solution when none fits)."""
    pg, ctx = graph_for(req, trace(req.batch // m), degrees, cfg)
    c = Candidate(degrees, m, pg, ctx, solution)
    if degrees.get("pp", 1) > 1:
        fitting = [lay for lay in layouts(c, req, budget) if max(sum(r.values()) for r in lay.memory) <= budget]
        c.layout = fitting[0] if fitting else None
        if c.layout is None:
            c.solution = None
    return c


def _alternative(req: SearchRequest, c: Candidate) -> dict:
    p = predicted(req, c)
    return {"degrees": c.degrees, "num_micro_batches": c.micro_batches, "zero": c.memory.zero if c.ctx.dp > 1 else 0,
            "ac": c.memory.ac, "schedule": c.layout.schedule if c.layout else None, "step_time_s": p.step_time_s,
            "memory_bytes_per_device": p.memory_bytes_per_device, "tokens_per_s": p.tokens_per_s}


def _infeasible_message(req: SearchRequest, trace, meshes) -> str:
    """State the least memory any candidate needs: each mesh at its smallest micro-batch and its most
    memory-saving configuration, solved for memory instead of time (its lower bound where the solver finds no
    solution, as HiGHS may on a badly scaled problem), and, where activations alone exceed the budget at one
    sample per micro-batch, say that the sequence is what does not fit."""
    least, floor, per_sample, budget = math.inf, math.inf, math.inf, memory_budget(req)
    for degrees in meshes:
        m = micro_batch_counts(req, degrees["dp"])[-1]
        cfg = memory_configs(req, degrees["dp"])[-1]
        pg, ctx = graph_for(req, trace(req.batch // m), degrees, cfg)
        pinned = pinned_strategies(pg, req.fix.get("pins") or {})
        if pinned is None:
            continue
        ilp = ShardingILP(pg, ctx, NO_LIMIT, m, pinned, objective="memory")
        sol = ilp.solve(req.time_limit_s)
        floor = min(floor, ilp.memory_lower_bound())
        if sol is not None:
            least = min(least, predict(req, Candidate(degrees, m, pg, ctx, sol)).memory_bytes_per_device)
        if req.batch // (m * degrees["dp"]) == 1:
            per_sample = min(per_sample, memory_lower_bound(pg, ctx, ilp.terms, _only_activations, m))
    if math.isinf(least) and math.isinf(floor):
        return (f"no plan fits the memory budget of {fmt_bytes(budget)} per device, and no candidate mesh could be "
                "solved for memory; raise --memory or add devices")
    needs = f"{fmt_bytes(least)}" if not math.isinf(least) else f"{fmt_bytes(floor)} (a lower bound)"
    head = f"no plan fits the memory budget of {fmt_bytes(budget)} per device; the best plan needs at least {needs}"
    if per_sample > budget:
        return (f"{head}; at seq {req.seq} one sample's activations alone need at least {fmt_bytes(per_sample)} per "
                "device on every mesh (full checkpointing, tp within one node). Lower --seq or raise --memory")
    return (f"{head} (ZeRO-3 and full checkpointing where allowed, the most micro-batches). Add devices, "
            "lower --batch/--seq, or raise --memory")


def _only_activations(owner: str, part: str) -> float:
    return 1.0 if part in bounds.PER_MICRO_BATCH else 0.0


