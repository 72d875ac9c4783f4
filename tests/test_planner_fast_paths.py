"""Tier 0: what makes `autopar plan` fast changes nothing it decides. HiGHS receives the very model pulp's own
loader would give it; a trace without source lines is the same graph; planning in the CLI leaves the process as
it found it (garbage collection on, source lines recorded)."""

from __future__ import annotations

import gc
import sys

import highspy
import numpy as np
import pulp
import pytest
import torch

from autopar.capture import capture, without_source_lines
from autopar.cli.main import main
from autopar.cost_models import axis_links, load_hardware
from autopar.models import build_model, sample_inputs
from autopar.planner.cost import CostContext
from autopar.planner.graph import build
from autopar.planner import lp
from autopar.planner.ilp import MIP_GAP, ShardingILP

pytestmark = pytest.mark.filterwarnings("ignore:Constructing LpVariable:DeprecationWarning")

AXES = ("dp", "tp")


@pytest.fixture(scope="module")
def tiny():
    model, info = build_model("gpt-tiny", {"layers": 2}, device="meta")
    return model, sample_inputs(info, 4, 32, device="meta")


def _arrays(h) -> dict:
    """The LP HiGHS holds: every array of it."""
    lp_ = h.getLp()
    a = lp_.a_matrix_
    return {"cost": lp_.col_cost_, "col_lower": lp_.col_lower_, "col_upper": lp_.col_upper_,
            "row_lower": lp_.row_lower_, "row_upper": lp_.row_upper_, "integrality": [int(t) for t in lp_.integrality_],
            "format": str(a.format_), "start": a.start_, "index": a.index_, "value": a.value_}


def test_highs_gets_the_model_pulp_would_give_it(tiny):
    """A tp=2 ILP (transport variables, binaries, memory rows) and a pin added afterwards, handed to HiGHS directly
    (planner/lp.py), and the same model as a pulp problem (the CBC path, `Model.to_pulp`) through pulp's own HiGHS
    loader: column by column and row by row, the same costs, bounds, integrality and coefficients in the same
    order; solved, the same status and objective."""
    model, inputs = tiny
    hw = load_hardware("a100-80gb-sxm")
    degrees = (2, 2)
    links = axis_links(hw, list(zip(AXES, degrees)))
    ilp = ShardingILP(build(capture(model, inputs), degrees, AXES), CostContext(hw, degrees,
                                                                                tuple(links[a] for a in AXES)),
                      budget_bytes=hw.memory_bytes)
    owner, xs = next((o, xs) for o, xs in ilp.x.items() if len(xs) > 2)
    ilp.prob.add([(xs[1], 1.0)], 0.0, 0.0, f"test_pin_{owner}")
    plain, _ = ilp.prob.to_pulp()
    assert [v.name for v in plain.variables()] == [v.name for v in ilp.prob.columns()]
    assert (plain.numVariables(), plain.numConstraints()) == (ilp.prob.numVariables(), ilp.prob.numConstraints())
    with lp._quiet_stdout():
        theirs = pulp.HiGHS(msg=False, threads=1)
        theirs.createAndConfigureSolver(plain)
        theirs.buildSolverModel(plain)
        ours = highspy.Highs()
        ours.setOptionValue("output_flag", False)
        lp.load(ours, ilp.prob)
    theirs, ours = _arrays(plain.solverModel), _arrays(ours)
    assert len(theirs["cost"]) > 100 and len(theirs["value"]) > 100
    for key, value in theirs.items():
        assert np.array_equal(np.asarray(value), np.asarray(ours[key])), key
    with lp._quiet_stdout():
        plain.solve(pulp.HiGHS(msg=False, threads=1, gapRel=MIP_GAP))
    solution = ilp.solve()
    assert pulp.LpStatus[plain.status] == solution.status == "Optimal"
    assert solution.objective_s == pytest.approx(pulp.value(plain.objective), rel=MIP_GAP)


def test_without_highspy_cbc_solves_the_same_model(tiny, monkeypatch):
    """Where highspy is missing, pulp's CBC solves the model (written by Model.to_pulp): the same optimum, on an ILP
    whose relaxation is fractional (tight memory) and one whose relaxation is integral."""
    captured = capture(*tiny)
    for share in (1.0, 1e-4):
        with_highs = _tiny_ilp(captured, (2, 2), share).solve()
        with monkeypatch.context() as patched:
            patched.setitem(sys.modules, "highspy", None)  # `import highspy` raises ImportError
            with_cbc = _tiny_ilp(captured, (2, 2), share).solve()
        assert with_cbc.status == with_highs.status == "Optimal"
        assert with_cbc.objective_s == pytest.approx(with_highs.objective_s, rel=2 * MIP_GAP)


def test_a_trace_without_source_lines_is_the_same_graph(tiny):
    model, inputs = tiny
    with_lines = capture(model, inputs)
    with without_source_lines():
        without = capture(model, inputs)
    assert not torch.fx.config.do_not_emit_stack_traces  # restored on the way out
    ops = [n for n in with_lines.graph.nodes if n.op == "call_function"]
    assert ops and any(n.stack_trace for n in ops)
    assert not any(n.stack_trace for n in without.graph.nodes)

    def shape(n):
        return [(n.name, str(n.target), tuple(getattr(n.meta.get("val"), "shape", ())))]

    assert [shape(n) for n in with_lines.graph.nodes] == [shape(n) for n in without.graph.nodes]


def test_planning_in_the_cli_leaves_collection_and_source_lines_on(tmp_path):
    assert gc.isenabled()
    code = main(["plan", "gpt-tiny", "--devices", "2", "--hardware", "cpu", "--batch", "4",
                 "--json", str(tmp_path / "plan.json")])
    assert code == 0 and (tmp_path / "plan.json").exists()
    assert gc.isenabled() and not torch.fx.config.do_not_emit_stack_traces



def _tiny_ilp(captured, degrees, budget_share: float) -> ShardingILP:
    """An ILP of the tiny GPT with a budget between its memory lower bound (share 0) and the device's memory."""
    hw = load_hardware("a100-80gb-sxm")
    links = axis_links(hw, list(zip(AXES, degrees)))
    pg = build(captured, degrees, AXES)
    ctx = CostContext(hw, degrees, tuple(links[a] for a in AXES))
    floor = ShardingILP(pg, ctx, hw.memory_bytes).memory_lower_bound()
    return ShardingILP(pg, ctx, floor + budget_share * (hw.memory_bytes - floor))


def test_the_relaxation_shortcut_finds_the_mips_optimum(tiny, monkeypatch):
    """Solving the LP relaxation first (and stopping there when its optimum is integral) returns what branch and
    bound returns: on meshes where the relaxation is integral and where it is not (the MIP must run), with memory
    loose and tight."""
    model, inputs = tiny
    captured = capture(model, inputs)
    took = []
    for degrees in ((1, 2), (2, 2), (1, 4)):
        for share in (1.0, 1e-4, 0.0):
            results = []
            for first in (False, True):
                monkeypatch.setattr(lp, "RELAXATION_FIRST", first)
                ilp = _tiny_ilp(captured, degrees, share)
                results.append(ilp.solve())
                took += [ilp.relaxation_integral] if first else []
            plain, shortcut = results
            assert (plain is None) == (shortcut is None), (degrees, share)
            if plain is not None:
                assert shortcut.status == plain.status == "Optimal"
                assert shortcut.objective_s == pytest.approx(plain.objective_s, rel=2e-3), (degrees, share)
    assert any(took) and not all(took), took  # both paths ran


@pytest.mark.slow
@pytest.mark.parametrize("model, request_", [
    ("llama3-70b", dict(devices=1024, hardware="h100-80gb-sxm", batch=1024, seq=8192, fix={"cp": 1, "pp": 1})),
    ("gpt3-175b", dict(devices=1024, hardware="a100-80gb-sxm", batch=1536, seq=2048)),
], ids=["70b-flat", "175b-pipelines"])
def test_incumbent_bounds_change_nothing_the_search_decides(monkeypatch, model, request_):
    """Llama-3-70B on 1024 H100 without a pipeline (tight memory: micro-batch counts, ZeRO stages and checkpointing
    modes; the best plan comes from the rounds, not from a probe, so a bound that cut too much would show), and
    GPT-3 175B on 1024 A100 with pipelines (tp = 1 fits no flat mesh, so its pipeline meshes have no donor and
    their ILPs are bounded by the best flat plan, over pp): the search with its incumbent bounds (node-cost bound
    before an ILP is built, LP relaxation before branching) returns the plan it returns without them, after
    building fewer ILPs."""
    from autopar.planner import bounds
    from autopar.planner import search as S
    from autopar.planning import make_plan

    monkeypatch.setattr(S, "forbid_fork", lambda: True)  # in this process, so every ILP built is counted
    built = []
    real_init, real_solve = ShardingILP.__init__, ShardingILP.solve

    def counting(self, *args, **kwargs):
        built.append(1)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(ShardingILP, "__init__", counting)
    bounded = make_plan(model, **request_)
    with_bounds = len(built)
    built.clear()
    monkeypatch.setattr(bounds, "incumbent", lambda req, candidates: None)
    monkeypatch.setattr(bounds, "time_bound", lambda *args: 0.0)  # no node-cost bound, flat or pipelined
    monkeypatch.setattr(ShardingILP, "solve", lambda self, limit=30.0, threads=1, cutoff_s=None:
                        real_solve(self, limit, threads, None))
    exhaustive = make_plan(model, **request_)
    assert (bounded.degrees, bounded.num_micro_batches, bounded.zero, bounded.ac, bounded.schedule) == \
        (exhaustive.degrees, exhaustive.num_micro_batches, exhaustive.zero, exhaustive.ac, exhaustive.schedule)
    assert bounded.strategies == exhaustive.strategies
    assert bounded.predicted.step_time_s == pytest.approx(exhaustive.predicted.step_time_s, rel=1e-9)
    assert with_bounds < len(built), (with_bounds, len(built))


@pytest.mark.parametrize("layers, cp", [(2, 1), (4, 1), (4, 2)], ids=["traced", "proxy", "proxy-cp2"])
def test_the_time_bounds_are_below_every_pipeline_candidate(monkeypatch, layers, cp):
    """The bounds that prune pipeline meshes are at most the predicted step time of every pipeline candidate the
    search prices, on the model's own trace (two layers) and on the deepened two-block proxy (four layers; also
    as a cp = 2 fold, whose attention the floor counts without the ring's hops): bounds.time_bound (donorless
    meshes, search._solve_meshes' cutoff; it once left out its division by pp, a replica's whole work, up to pp
    times the prediction) and bounds.pipeline_floor (each micro-batching under its flat donor's sharding, search._price;
    the head and embedding on the end ranks, whole blocks per rank), here taken with pruning off so that every
    micro-batching is priced."""
    from autopar.planner import bounds
    from autopar.planner import search as S
    from autopar.planning import make_plan

    monkeypatch.setattr(S, "forbid_fork", lambda: True)
    floor = bounds.pipeline_floor
    monkeypatch.setattr(bounds, "pipeline_floor", lambda *args: 0.0)
    priced = []
    real = S._transferred

    def recording(req, trace, degrees, m, donor, budget):
        c = real(req, trace, degrees, m, donor, budget)
        priced.append((req, trace, donor, c))
        return c

    monkeypatch.setattr(S, "_transferred", recording)
    proxies = []
    real_rank = S.rank
    monkeypatch.setattr(S, "rank", lambda req, trace, progress=None, proxy=None, flat_best=None:
                        proxies.append(proxy) or real_rank(req, trace, progress, proxy, flat_best))
    make_plan("llama-tiny", devices=8, hardware="h100-80gb-sxm", batch=16, seq=32, model_args={"layers": layers},
              fix={"cp": cp})
    (proxy,) = proxies
    pipelined = [(req, trace, donor, c) for req, trace, donor, c in priced if c is not None]
    assert pipelined
    floors = []
    for req, trace, donor, c in pipelined:
        step = bounds.predicted(req, c).step_time_s
        bound = bounds.time_bound(req, trace, c.degrees, c.micro_batches, c.memory,
                                  (*proxy, {}) if proxy is not None else None)
        floors.append(floor(req, c.degrees, c.micro_batches, donor))
        assert 0 < bound <= step * (1 + 1e-9), ("time_bound", c.degrees, c.micro_batches, c.memory, bound, step)
        assert floors[-1] <= step * (1 + 1e-9), ("pipeline_floor", c.degrees, c.micro_batches, floors[-1], step)
    assert any(f > 0 for f in floors)


def test_the_busiest_rank_floor_is_the_least_whole_block_cut():
    """bounds._busiest, the pipeline floor's slowest rank, equals the best over every way to give p ranks whole
    numbers of blocks (at least v each, v stages of one block or more), the first rank also running the code
    before the blocks and the last the code after them: brute force over small pipelines."""
    import itertools

    from autopar.planner.bounds import _busiest

    def brute(pre, post, block, blocks, p, v):
        best = float("inf")
        for n in itertools.product(range(v, blocks + 1), repeat=p):
            if sum(n) == blocks:
                best = min(best, max([pre + n[0] * block, post + n[-1] * block] + [k * block for k in n[1:-1]]))
        return best

    for pre, post, block in [(0.1, 2.4, 1.0), (0.0, 0.0, 1.0), (3.0, 0.5, 0.7), (0.2, 0.2, 0.05)]:
        for p, v, blocks in [(2, 1, 5), (3, 1, 7), (4, 1, 8), (2, 2, 6), (3, 2, 9), (4, 2, 8)]:
            got = _busiest(pre, post, block, blocks, p, v)
            assert got == pytest.approx(brute(pre, post, block, blocks, p, v), rel=1e-12), (pre, post, block, p, v)
