"""Planning on a two-block copy (planner/proxy.py) gives the plan the full trace gives.

`make_plan` plans deep models on a copy with two blocks, deepened to full depth, and carries the chosen plan onto
the full trace by position (search._by_position); pipeline meshes are priced in forked workers
(search._price_all). Here the same request is searched with and without the shallow copy, and with and without
the workers, and the plans must agree decision for decision, with the same predictions.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import autopar.planning as planning
from autopar.planner import cp_search
from autopar.planner import search as S

MODEL_ARGS = {"layers": 4, "hidden": 64, "heads": 4, "vocab": 128, "seq": 32}


def _both(monkeypatch, fix: dict, devices: int = 4):
    """(plan found on the deepened two-block copy, plan found on the full trace alone)."""
    seen = {}

    def spy(req, trace, progress=None, proxy=None, beat=None, flat_best=None):
        seen.update(req=req, trace=trace, proxy=proxy)
        return S.search(req, trace, progress, proxy, beat, flat_best)

    monkeypatch.setattr(cp_search, "search", spy)  # make_plan -> search_cp -> search, once per cp degree (cp=1 here)
    shallow = planning.make_plan("gpt", model_args=MODEL_ARGS, devices=devices, hardware="cpu", batch=8, fix=fix)
    assert seen["proxy"] is not None, "a 4-layer model must be planned on its two-block copy"
    module, info = planning.build_model("gpt", MODEL_ARGS, device="meta", dtype=planning.DTYPES["float32"])
    real = lambda b: planning.capture(module, planning.sample_inputs(info, b, 32, device="meta"))  # noqa: E731
    full = S.search(seen["req"], real, None, None)  # the real full trace, not the one derived from the copy
    return shallow, full


def _same(a, b) -> None:
    assert (a.degrees, a.num_micro_batches, a.zero, a.ac, a.schedule, a.virtual_stages, a.stages) == \
        (b.degrees, b.num_micro_batches, b.zero, b.ac, b.schedule, b.virtual_stages, b.stages)
    assert a.strategies == b.strategies
    assert a.params == b.params
    assert math.isclose(a.predicted.step_time_s, b.predicted.step_time_s, rel_tol=1e-9)
    assert math.isclose(a.predicted.memory_bytes_per_device, b.predicted.memory_bytes_per_device, rel_tol=1e-9)


@pytest.mark.parametrize("fix", [{}, {"pp": 2}, {"dp": 2, "tp": 2, "zero": 3, "ac": "full"}],
                         ids=["free", "pipeline", "what-if"])
def test_two_block_copy_gives_the_full_trace_plan(monkeypatch, fix):
    shallow, full = _both(monkeypatch, fix)
    _same(shallow, full)
    if fix.get("pp"):
        assert shallow.degrees["pp"] == 2 and len(shallow.stages) >= 2


def test_choices_carry_over_by_position_without_a_new_solve(monkeypatch):
    """The chosen candidate is not solved again on the full trace: its choices are mapped owner by owner."""
    solves = []
    real = S._solve_one

    def counting(*args, **kwargs):
        solves.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(S, "_run_jobs",
                        lambda req, trace, budget, jobs, *_, **__: [real(req, trace, budget, *j) for j in jobs])
    monkeypatch.setattr(S, "_solve_one", counting)
    before = []
    monkeypatch.setattr(S, "_at_full_depth", _spy_full_depth(S._at_full_depth, solves, before))
    planning.make_plan("gpt", model_args=MODEL_ARGS, devices=4, hardware="cpu", batch=8, fix={"dp": 2, "tp": 2})
    assert before and len(solves) == before[0], "the full trace was solved again"


def _spy_full_depth(real, solves, before):
    def spy(*args, **kwargs):
        before.append(len(solves))
        return real(*args, **kwargs)
    return spy


def test_by_position_refuses_graphs_that_differ():
    """Owners that do not pair up (another model's graph) give None: the caller solves the ILP instead."""
    req = S.SearchRequest(model="gpt", n_params=1, hardware=planning.load_hardware("cpu"), devices=4, batch=8,
                          seq=32, fix={"dp": 2, "tp": 2})
    mine = _candidate_for(req, MODEL_ARGS)
    other = _candidate_for(req, {**MODEL_ARGS, "hidden": 32, "layers": 2})
    assert S._by_position(mine, other.graph) is None
    assert S._by_position(mine, mine.graph).choice == mine.solution.choice


def _candidate_for(req, model_args):
    module, info = planning.build_model("gpt", model_args, device="meta", dtype=planning.DTYPES["float32"])
    captured = planning.capture(module, planning.sample_inputs(info, 8, 32, device="meta"))
    degrees = {"pp": 1, "dp": 2, "tp": 2}
    budget = 1e30
    sol = S._solve_one(req, lambda b: captured, budget, degrees, 1, S.memory_configs(req, 2)[0])
    return S._candidate(req, lambda b: captured, degrees, 1, sol, S.memory_configs(req, 2)[0], budget)


def test_a_factory_without_a_layers_argument_is_planned_on_its_full_trace(monkeypatch):
    """A path.py:factory model whose config states its layers but whose factory takes no `layers` cannot give the
    two-block copy: it is planned on its own trace (it once failed, asking the user to fix the factory)."""
    seen = []
    real = S.search
    monkeypatch.setattr(cp_search, "search", lambda req, trace, progress=None, proxy=None, *rest:
                        seen.append(proxy) or real(req, trace, progress, proxy, *rest))
    plan = planning.make_plan(f"{Path(__file__).resolve().parent}/tiny_models.py:gpt_without_layers_argument", devices=2,
                              hardware="cpu", batch=4, fix={"cp": 1})
    assert seen == [None] and plan.degrees["cp"] == 1
