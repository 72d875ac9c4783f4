"""The context-parallel (cp) axis of the outer search: each cp degree is planned as its fold, then priced whole.

A (dp, cp, tp) plan is searched as the (dp x cp, tp) plan of the folded request (planner/context.py): batch x cp
samples at seq / cp, so every per-token cost, activation and the gradient reduction over dp x cp (ZeRO shards over
dp x cp too) come from the existing model unchanged; attention nodes are priced at their true cp-fold work plus
the ring's exposed send/recv, and the ring's buffers join the memory terms (CostContext.cp, context.py), so the
ILP sees them too. The best plan over the cp degrees wins; the others are its alternatives. cp = 1 is planned
first, with the folds searched beside it in a forked process where that is safe (`_folds_beside`); a fold whose
best candidate cannot beat cp = 1 is dropped (searched in sequence, before its full-depth graph: search.py
`Outpriced`), and a fold's micro-batches that a cp = 1 plan matches token for token are not searched (space.py
`micro_batch_counts`, where the argument is).

Topology: the mesh is (pp, dp, cp, tp), tp innermost, then cp (torchtitan's order): cp's ring runs inside a node
while cp x tp fits in one and crosses nodes otherwise (axis_links prices either), and the dp x cp gradient
reduction spans both. Unpinned, cp > 1 is searched where each rank keeps at least MIN_LOCAL_SEQ tokens (a
shorter shard has too little attention to hide the ring's hops: tests/test_cp_cost.py) and where the model's
attention can run as a ring (context.cp_analysis); `--fix cp=N` asks for one degree and says why it cannot be.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import replace
from types import SimpleNamespace
from typing import Callable, Iterator

from autopar.capture import Captured
from autopar.errors import MeshError, PlanError
from autopar.plan import Plan
from autopar.planner.candidate import SearchRequest
from autopar.planner.context import cp_analysis
from autopar.planner import lp, search as searching
from autopar.planner.search import Outpriced, finish, rank, search

MIN_LOCAL_SEQ = 4096  # tokens per cp rank below which cp is not searched unless pinned


def fold(req: SearchRequest, cp: int) -> SearchRequest:
    """The folded request of cp: batch x cp at seq / cp, the dp pin as dp x cp."""
    if cp == 1:
        return req
    fix = {k: v for k, v in req.fix.items() if k != "cp"}
    if "dp" in fix:
        fix["dp"] = int(fix["dp"]) * cp
    return replace(req, batch=req.batch * cp, seq=req.seq // cp, cp=cp, fix=fix, cp_searched="cp" not in req.fix)


def unfold(plan: Plan, cp: int) -> Plan:
    """The plan of a folded search as the cp plan it is: dp, cp, the global batch and sequence."""
    if cp == 1:
        return plan
    alternatives = [{**a, "degrees": _unfold_degrees(a["degrees"], cp)} for a in plan.alternatives]
    return replace(plan, degrees=_unfold_degrees(plan.degrees, cp), batch=plan.batch // cp, seq=plan.seq * cp,
                   alternatives=alternatives)


def _unfold_degrees(degrees: dict, cp: int) -> dict:
    return {**degrees, "dp": degrees["dp"] // cp, "cp": cp}


def cp_degrees(req: SearchRequest, refusal: Callable[[int], str | None] | None) -> list[int]:
    """The cp degrees to plan: the pinned one (checked), else 1 and every power of two the devices, the pins and
    the sequence allow with at least MIN_LOCAL_SEQ tokens per rank, where the model can run cp (`refusal` None:
    not asked here; the fold process asks it before ranking, `_rank_worker`)."""
    pinned = 1
    for axis in ("pp", "dp", "tp"):
        pinned *= int(req.fix.get(axis, 1))
    if "cp" in req.fix:
        cp = int(req.fix["cp"])
        if cp > 1:
            if req.seq % (2 * cp):
                raise MeshError(f"--fix cp={cp}: seq {req.seq} is not divisible by 2 x cp = {2 * cp} (each cp rank "
                                "holds two equal chunks of the sequence, load-balanced for the causal mask); use a "
                                "seq that is a multiple of 2 x cp or another cp")
            if req.devices % (cp * pinned):
                raise MeshError(f"--fix cp={cp} does not divide {req.devices} devices with the other pinned degrees "
                                f"({pinned}); make pp x dp x cp x tp equal --devices")
            why = refusal(cp)
            if why:
                raise PlanError(f"--fix cp={cp}: {why}; use cp=1")
        return [cp]
    out, cp = [1], 2
    while cp * pinned <= req.devices and req.seq // cp >= MIN_LOCAL_SEQ:
        if req.devices % (cp * pinned) == 0 and req.seq % (2 * cp) == 0 and (refusal is None or refusal(cp) is None):
            out.append(cp)
        cp *= 2
    return out


def search_cp(req: SearchRequest, traces: Callable[[int], Callable[[int], Captured]], progress=None,
              proxies: Callable[[int], object] | None = None) -> Plan:
    """The best plan over the cp degrees. traces(cp): the trace function (micro-step batch -> Captured) of the
    model at seq / cp; proxies(cp): its shallow proxy (search.search's `proxy`) or None."""
    def refusal(cp: int) -> str | None:  # on one sample (the shallow copy where there is one)
        return cp_analysis(_one_sample(traces, proxies, cp), _one_sample(traces, proxies))[0]

    plans: dict[int, Plan] = {}
    failures: dict[int, Exception] = {}
    outpriced: list[dict] = []
    dominated: list[int] = []
    # Where the folds are ranked beside cp = 1, the fold process also asks whether the model can run each cp (two
    # one-sample traces): forked before them, both cores trace at once and cp = 1 starts searching sooner.
    beside = "cp" not in req.fix and not searching.forbid_fork()
    degrees = cp_degrees(req, None if beside else refusal)
    if beside:  # cp = 1's one-sample trace, as the refusals take it: with the search's first, every later batch
        _one_sample(traces, proxies)  # is derived (rebatch.py), here, before the search forks workers
        lp.preload()  # and HiGHS, which every forked process would import again
        deepening = getattr(traces(1), "deepening", None)  # and the full-depth rule's check (redepth.py) beside,
        if deepening is not None:  # on the other core meanwhile
            deepening.check_beside()
        if proxies and proxies(1) is not None and len(degrees) > 1:  # cp = 1's second trace, before the folds
            proxies(1)[0](2)  # fork: they derive their batches from cp = 1's two (rebatch.py `template`)
    flat_best = FlatBest(shared=beside) if len(degrees) > 1 else None  # cp = 1's fastest flat step, for the folds
    with _folds_beside(req, traces, proxies, degrees[1:], refusal, flat_best) as ahead:
        for cp in degrees:
            try:
                ranked = ahead[cp].result() if cp in ahead else ()
                if ranked is None:  # the model cannot run this cp (context.cp_analysis): not planned
                    continue
                if progress and cp > 1:
                    progress(f"context parallelism cp={cp}: planning the fold, batch x {cp} at seq {req.seq // cp}")
                beat = plans[1].predicted.step_time_s if cp > 1 and 1 in plans else None
                if cp in ahead:  # ranked in a forked process beside cp = 1; finished there only if it can win
                    bound, alternative = ranked
                    if beat is not None and bound >= beat:
                        raise Outpriced(alternative)
                    plan = ahead.finish(cp)
                else:
                    plan = unfold(search(fold(req, cp), traces(cp), progress, proxies(cp) if proxies else None,
                                         beat, flat_best), cp)
                plans[cp] = plan
            except Outpriced as e:  # no faster than cp = 1 (already on the proxy: not traced at full depth)
                dominated.append(cp)
                if e.alternative is not None:
                    outpriced.append({**e.alternative, "degrees": _unfold_degrees(e.alternative["degrees"], cp)})
            except (MeshError, PlanError) as e:  # a fold's numbers are not the user's: say which cp and how it folds
                failures[cp] = e if cp == 1 else type(e)(
                    f"cp={cp} (planned as its fold: batch {req.batch} x {cp} = {req.batch * cp} at seq "
                    f"{req.seq // cp}, dp counting dp x cp): {e}")
            finally:  # cp = 1's search ended without posting its flat best (it failed): the folds go on without
                if cp == 1 and flat_best is not None:
                    flat_best.post(None)
    if not plans:
        raise failures[min(failures)]
    best = min(plans.values(), key=lambda p: p.predicted.step_time_s)
    cp = best.degrees.get("cp", 1)
    others = [_as_alternative(p) for c, p in plans.items() if c != cp] + outpriced
    searched = set(plans) | set(failures) | set(dominated)
    solver = {**best.solver, "cp_searched": sorted(searched)}
    if failures:
        solver["cp_refused"] = {str(c): str(e) for c, e in failures.items()}
    return replace(best, alternatives=best.alternatives + others, solver=solver)


def _one_sample(traces, proxies, cp: int = 1) -> Captured:
    """The model at seq / cp traced at one sample: its shallow copy where there is one."""
    return (proxies(cp)[0] if proxies and proxies(cp) is not None else traces(cp))(1)


@contextlib.contextmanager
def _folds_beside(req: SearchRequest, traces, proxies, degrees: list[int], refusal,
                  flat_best: "FlatBest | None") -> Iterator["_Beside"]:
    """The folds of `degrees` ranked in one forked process while this one searches cp = 1, so that both cores of a
    small machine work through the whole search (nothing where forking is not safe, search.forbid_fork, or no
    fold is searched). Each fold is first checked there (`refusal`: can the model run that cp?), then ranked; it
    is finished (its winner mapped to full depth) in that process only where it can beat cp = 1: the decisions
    the sequential search makes with `beat`, made here once cp = 1 is known."""
    if not degrees or searching.forbid_fork():
        yield _Beside(None, {})
        return
    global _FOLD_STATE
    _FOLD_STATE = (req, traces, proxies, refusal, flat_best)
    try:
        with ProcessPoolExecutor(1, mp_context=mp.get_context("fork")) as pool:
            yield _Beside(pool, {cp: pool.submit(_rank_worker, cp) for cp in degrees})
    finally:
        _FOLD_STATE = None


class _Beside:
    """The folds ranked in the fold process: cp -> future of (bound, alternative) (search.Ranked's), None where
    the model cannot run that cp; `finish(cp)`
    asks the same process for the plan (one worker, so it still holds the ranking)."""

    def __init__(self, pool: ProcessPoolExecutor | None, ranked: dict[int, Future]) -> None:
        self.pool, self.ranked = pool, ranked

    def __contains__(self, cp: int) -> bool:
        return cp in self.ranked

    def __getitem__(self, cp: int) -> Future:
        return self.ranked[cp]

    def finish(self, cp: int) -> Plan:
        return self.pool.submit(_finish_worker, cp).result()


_FOLD_STATE = None  # (req, traces, proxies, refusal, flat_best) for the forked fold process
_RANKED: dict = {}  # in the fold process: cp -> its search.Ranked, until finished


def _rank_worker(cp: int) -> tuple[float, dict] | None:
    """(bound, alternative) of the fold's ranking; None where the model cannot run this cp."""
    req, traces, proxies, refusal, flat_best = _FOLD_STATE
    if refusal(cp) is not None:
        return None
    _RANKED[cp] = ranked = rank(fold(req, cp), traces(cp), None, proxies(cp) if proxies else None, flat_best)
    return ranked.bound(), ranked.alternative()


def _finish_worker(cp: int) -> Plan:
    return unfold(finish(_RANKED.pop(cp)), cp)


class FlatBest:
    """cp = 1's fastest flat candidate's step time, posted by its search once its flat meshes are solved and taken
    by each fold before it prices its pipeline meshes (search.rank): a pipeline mesh of a fold whose floor cannot
    beat it cannot beat cp = 1 either, so it is left out, as the fold's own incumbent leaves them out. Held in
    shared memory where the folds are ranked in the forked fold process (`shared`): the fold waits for it there
    (cp = 1's flat meshes are solved by then as a rule), so its ranking is the one the sequential search makes.
    None (nothing to beat) where cp = 1 found no flat candidate or failed."""

    def __init__(self, shared: bool) -> None:
        ctx = mp.get_context("fork") if shared else None  # else this process's search posts before its folds ask
        self._value = ctx.Value("d", math.nan, lock=False) if ctx else SimpleNamespace(value=math.nan)  # NaN: none
        self._posted = ctx.Event() if ctx else threading.Event()

    def post(self, step_s: float | None) -> None:
        """The first post counts (later ones, such as search_cp's closing None, are ignored)."""
        if not self._posted.is_set():
            self._value.value = math.nan if step_s is None else step_s
            self._posted.set()

    def get(self) -> float | None:
        self._posted.wait()
        return None if math.isnan(self._value.value) else self._value.value


def _as_alternative(p: Plan) -> dict:
    return {"degrees": p.degrees, "num_micro_batches": p.num_micro_batches, "zero": p.zero, "ac": p.ac,
            "schedule": p.schedule, "step_time_s": p.predicted.step_time_s,
            "memory_bytes_per_device": p.predicted.memory_bytes_per_device, "tokens_per_s": p.predicted.tokens_per_s}
