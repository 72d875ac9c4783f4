"""Tier 0: the planner without devices. The sharding ILP is checked against a closed form recomputed from the cost
functions (Alpa's habit), repeated layers share decisions, published parallel layouts come out of the costs, and the
errors a user can cause say what to do."""

from __future__ import annotations

from dataclasses import replace

import os
import re

import pytest

from autopar.planner.footprint import PARTS
import torch
from torch import nn

from autopar.capture import capture
from autopar.cost_models import axis_links, exposed_s, load_hardware
from autopar.errors import MeshError, PlanError
from autopar.models import build_model, sample_inputs
from autopar.placement import P, R, S
from autopar.planner.cost import CostContext, node_cost, redistribution_time_s
from autopar.planner.graph import PlanGraph, build
from autopar.planner.ilp import ShardingILP
from autopar.planning import make_plan
from autopar.strategies import grad_partial_axes

# pulp 3.x warns on every LpVariable(...) the ILP builds; tens of thousands of lines of noise, not a finding
pytestmark = pytest.mark.filterwarnings("ignore:Constructing LpVariable:DeprecationWarning")

A100 = load_hardware("a100-80gb-sxm")


AXES = ("dp", "tp")


def context(hw, degrees: tuple[int, ...]) -> CostContext:
    links = axis_links(hw, list(zip(AXES, degrees)))
    return CostContext(hw, degrees, tuple(links[a] for a in AXES))


def chosen(pg: PlanGraph, choice: dict[str, int], name: str):
    p = pg.nodes[name]
    return p.strategies[choice[p.owner]]


def closed_form_objective(pg: PlanGraph, ctx: CostContext, choice: dict[str, int], m: int = 1) -> dict[str, float]:
    """Predicted step time of a choice, summed node by node and edge by edge over the WHOLE graph (no owners, no
    edge classes): compute of every node, every redistribution (forward + transposed backward) once per
    (producing node, output, target placement) however many consumers read it (as codegen/emit.py emits it), and
    the parameter-gradient collectives backward cannot hide, and the optimizer step once. Parameter gradients are
    reduced in buckets once per step, so their latency is not paid per parameter (ilp.py / runtime.py)."""
    bucketed = ctx.bucketed
    compute = bwd = exposed = sync = optimizer = 0.0
    moved = set()
    for name, p in pg.nodes.items():
        s = chosen(pg, choice, name)
        cost = node_cost(ctx, p, s)
        compute += m * (cost.fwd_s + cost.bwd_s)
        bwd += cost.bwd_s
        optimizer += cost.step_s
        for j, (prod, k) in enumerate(p.inputs):
            pp = pg.nodes[prod]
            src, dst = chosen(pg, choice, prod).outs[k], s.ins[j]
            shape, dtype = pp.info.out_shapes[k], pp.info.out_dtypes[k]
            partial = tuple(grad_partial_axes(s, j)) if pp.requires_grad else ()
            if (prod, k, dst, partial) in moved:
                continue
            moved.add((prod, k, dst, partial))
            if pp.kind == "param":
                exposed += m * redistribution_time_s(ctx, shape, dtype, src, dst, False)
                sync += (redistribution_time_s(bucketed, shape, dtype, src, dst, True, partial)
                         - redistribution_time_s(bucketed, shape, dtype, src, dst, False))
            else:
                exposed += m * redistribution_time_s(ctx, shape, dtype, src, dst, pp.requires_grad, partial)
    total = compute + exposed + exposed_s(ctx.hw, sync, bwd) + optimizer
    return {"total": total, "compute": compute, "exposed": exposed, "sync": sync, "optimizer": optimizer}


# ---------------------------------------------------------------- ILP vs closed form on an MLP (Alto/Alpa style)


class MLPLoss(nn.Module):
    def __init__(self, h: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(h, 4 * h), nn.GELU(), nn.Linear(4 * h, h))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((self.net(x) - y) ** 2).mean()


@pytest.fixture(scope="module")
def mlp_captured():
    h = 256
    return capture(MLPLoss(h), (torch.randn(8, 128, h), torch.randn(8, 128, h)))


def _solve(captured, degrees, hw=A100):
    pg = build(captured, degrees, AXES)
    ctx = context(hw, degrees)
    ilp = ShardingILP(pg, ctx, budget_bytes=hw.memory_bytes)
    solution = ilp.solve()
    assert solution is not None and solution.status == "Optimal"
    return pg, ctx, ilp, solution


def _linear_in(pg: PlanGraph, module: str) -> str:
    return next(n for n, p in pg.nodes.items() if p.module == module and "linear" in str(p.node.target))


def test_mlp_on_tp4_is_megatron_column_then_row_parallel(mlp_captured):
    pg, _, _, sol = _solve(mlp_captured, (1, 4))
    fc = chosen(pg, sol.choice, _linear_in(pg, "net.0"))
    proj = chosen(pg, sol.choice, _linear_in(pg, "net.2"))
    tp = 1
    assert fc.ins[1][tp] == S(0) and fc.outs[0][tp] == S(2)  # column-parallel: weight rows = output features
    assert proj.ins[0][tp] == S(2) and proj.ins[1][tp] == S(1)  # row-parallel: consumes the sharded hidden
    assert proj.outs[0][tp] == P  # ... and leaves a partial sum (one all-reduce per MLP, Shoeybi et al. 2019)


@pytest.mark.parametrize("degrees", [(1, 4), (2, 2)])
def test_ilp_objective_equals_the_closed_form_of_its_choice(mlp_captured, degrees):
    pg, ctx, ilp, sol = _solve(mlp_captured, degrees)
    assert all(n == 1 for n in pg.counts.values())  # no repeated layers: owners are the nodes themselves
    closed = closed_form_objective(pg, ctx, sol.choice)
    assert closed["compute"] > 0 and closed["exposed"] > 0  # the MLP output's partial sum must be reduced
    assert sol.objective_s == pytest.approx(closed["total"], rel=1e-9)


def test_ilp_choice_beats_every_single_strategy_change(mlp_captured):
    """The optimum is at least locally optimal under the closed form: changing any one node's strategy (nodes with
    a single placement aside) never lowers the step time it would be priced at."""
    pg, ctx, _, sol = _solve(mlp_captured, (1, 4))
    best = closed_form_objective(pg, ctx, sol.choice)["total"]
    for owner, k in sol.choice.items():
        for other in range(len(pg.nodes[owner].strategies)):
            if other != k:
                alt = closed_form_objective(pg, ctx, {**sol.choice, owner: other})["total"]
                assert alt >= best * (1 - 1e-3), (owner, other)


# ---------------------------------------------------------------- repeated layers


def _gpt_tiny_graph(layers: int, degrees=(2, 2)) -> PlanGraph:
    model, info = build_model("gpt-tiny", {"layers": layers}, device="meta")
    captured = capture(model, sample_inputs(info, 4, 32, device="meta"))
    return build(captured, degrees, AXES)


@pytest.fixture(scope="module")
def tiny4() -> PlanGraph:
    return _gpt_tiny_graph(4)


def test_repeated_blocks_share_the_first_blocks_owners(tiny4):
    pg = tiny4
    assert pg.block_classes == [["blocks.0", "blocks.1", "blocks.2", "blocks.3"]]
    in_blocks = [p for p in pg.nodes.values() if p.block is not None]
    assert {p.block for p in in_blocks} == {f"blocks.{i}" for i in range(4)}
    for p in in_blocks:
        owner = pg.nodes[p.owner]
        assert owner.block == "blocks.0", (p.node.name, p.owner)
        assert owner.kind == p.kind and owner.info.out_shapes == p.info.out_shapes
        if p.kind == "op":
            assert owner.node.target == p.node.target
            assert owner.module == re.sub(r"^blocks\.\d+", "blocks.0", p.module)
        else:  # a block's parameter shares the decision of the same parameter in blocks.0
            assert owner.fqn == re.sub(r"^blocks\.\d+", "blocks.0", p.fqn)
        assert owner.strategies is p.strategies
    per_block = sum(1 for p in in_blocks if p.block == "blocks.0")
    assert all(pg.counts[p.owner] == 4 for p in in_blocks if p.owner == p.node.name)
    owners = pg.owners()
    assert len(owners) == len(pg.nodes) - 3 * per_block
    assert len(owners) < 0.5 * len(pg.nodes)


def test_deeper_model_adds_no_ilp_variables(tiny4):
    tiny8 = _gpt_tiny_graph(8)
    assert len(tiny8.nodes) > len(tiny4.nodes) + 100
    ctx = context(load_hardware("cpu"), (2, 2))
    problems = [ShardingILP(pg, ctx, budget_bytes=1e30).prob for pg in (tiny4, tiny8)]
    binaries = [sum(1 for v in prob.columns() if v.isBinary()) for prob in problems]
    assert binaries[0] > 0 and binaries[0] == binaries[1]
    assert problems[0].numVariables() == problems[1].numVariables()


def test_repeated_layer_objective_is_the_whole_graph_closed_form(tiny4):
    """With owners and edge classes the ILP weights costs by counts; the closed form walks all 4 blocks."""
    ctx = context(load_hardware("cpu"), (2, 2))
    ilp = ShardingILP(tiny4, ctx, budget_bytes=1e30, micro_batches=2)
    sol = ilp.solve()
    assert sol is not None
    closed = closed_form_objective(tiny4, ctx, sol.choice, m=2)
    assert sol.objective_s == pytest.approx(closed["total"], rel=1e-9)


# ---------------------------------------------------------------- decisions by cost (acceptance items)


def _tp(placements: str) -> str:
    return placements.split("/")[1]  # plan.axis_names == ["dp", "tp"]


def test_megatron_1_7b_on_32_a100_chooses_no_tensor_parallelism():
    # Narayanan et al. 2021 (Table 1 / Fig. 1): the 1.7B GPT on 32 GPUs trains with tensor-parallel size 1.
    plan = make_plan("gpt", model_args=dict(layers=24, hidden=2304, heads=24, vocab=51200, seq=2048), devices=32,
                     hardware="a100-80gb-sxm", batch=512, seq=2048)
    assert plan.degrees["tp"] == 1, plan.degrees
    assert plan.degrees["dp"] == 32 and plan.degrees["pp"] == 1  # and PP=1, as published
    flat = [a for a in plan.alternatives if a["degrees"]["pp"] == 1]
    assert {a["degrees"]["tp"] for a in flat} == {2, 4, 8}  # they were evaluated, and lost
    assert any(a["degrees"]["pp"] > 1 for a in plan.alternatives)  # so were pipelines
    assert all(a["step_time_s"] > plan.predicted.step_time_s for a in plan.alternatives)


@pytest.fixture(scope="module")
def gpt3_xl_tp4():
    return make_plan("gpt3-1.3b", devices=8, hardware="a100-80gb-sxm", batch=2, seq=2048, fix={"dp": 2, "tp": 4})


def _linears(plan, suffix: str) -> list:
    return [d for d in plan.strategies.values() if d.op == "aten.linear.default" and d.module.endswith(suffix)]


def test_pinned_gpt3_xl_tp4_is_megatron_per_block(gpt3_xl_tp4):
    plan = gpt3_xl_tp4
    assert plan.axis_names == ["dp", "tp"] and plan.degrees["tp"] == 4
    for suffix, weight, out in [("mlp.fc", "S0", "S2"), ("mlp.proj", "S1", "P"), ("attn.q", "S0", "S2"),
                                ("attn.k", "S0", "S2"), ("attn.v", "S0", "S2"), ("attn.proj", "S1", "P")]:
        decisions = _linears(plan, suffix)
        assert len(decisions) == 24, suffix
        for d in decisions:
            assert (_tp(d.ins[1]), _tp(d.outs[0])) == (weight, out), (d.module, d.ins, d.outs)
    sdpa = [d for d in plan.strategies.values() if "scaled_dot_product_attention" in d.op]
    assert len(sdpa) == 24 and all(_tp(d.outs[0]) == "S1" for d in sdpa)  # heads split over tp
    norms = [d for d in plan.strategies.values() if "layer_norm" in d.op]
    assert any(_tp(d.outs[0]) == "S1" for d in norms)  # sequence-parallel LayerNorm (Korthikanti et al. 2022)


def test_prediction_parts_add_up(gpt3_xl_tp4):
    pred = gpt3_xl_tp4.predicted
    assert pred.exposed_comm_s > 0 and pred.compute_s > 0
    assert pred.step_time_s == pytest.approx(pred.compute_s + pred.exposed_comm_s + pred.grad_sync_exposed_s
                                             + pred.optimizer_s, rel=1e-12)
    # AdamW's passes over the 1/4 of 1.3B parameters each device holds: 80 bytes per element at memory speed
    hw = load_hardware("a100-80gb-sxm")
    assert pred.optimizer_s == pytest.approx(gpt3_xl_tp4.n_params / 4 * 80 / (
        hw.memory_bandwidth_bytes_per_s * hw.memory_efficiency), rel=0.02)
    assert pred.memory_bytes_per_device == pytest.approx(sum(pred.memory_parts.values()), rel=1e-12)
    assert pred.memory_bytes_per_device <= gpt3_xl_tp4.memory_budget_bytes
    assert pred.tokens_per_s == pytest.approx(2 * 2048 / pred.step_time_s)


@pytest.mark.parametrize("overlap", [1.0, 0.0])
def test_prediction_parts_add_up_with_exposed_gradient_sync(overlap):
    # dp=4 on gpt-tiny over gloo: the gradient all-reduces outlast the tiny backward, so part of them is exposed
    # where compute hides communication; all of it where it hides none (a CPU, whose cores run both).
    hw = replace(load_hardware("cpu"), comm_overlap=overlap)
    plan = make_plan("gpt-tiny", devices=4, hardware=hw, batch=4, fix={"dp": 4, "tp": 1})
    pred = plan.predicted
    if overlap == 1.0:
        assert 0 < pred.grad_sync_exposed_s < pred.grad_sync_s
    else:
        assert pred.grad_sync_exposed_s == pytest.approx(pred.grad_sync_s, rel=1e-12) and pred.grad_sync_s > 0
    assert pred.optimizer_s > 0
    assert pred.step_time_s == pytest.approx(pred.compute_s + pred.exposed_comm_s + pred.grad_sync_exposed_s
                                             + pred.optimizer_s, rel=1e-12)
    assert pred.memory_bytes_per_device == pytest.approx(sum(pred.memory_parts.values()), rel=1e-12)
    assert set(pred.memory_parts) <= set(PARTS) and {"params", "optimizer_state"} <= set(pred.memory_parts)
    assert pred.memory_peak_at in ("backward start", "backward end")
    assert all(v >= 0 for v in pred.memory_parts.values())


# ---------------------------------------------------------------- user errors


TINY = dict(devices=2, hardware="cpu", batch=2)


def test_memory_budget_too_small_for_any_plan_raises_plan_error():
    with pytest.raises(PlanError) as err:
        make_plan("gpt-tiny", memory_budget_bytes=2e5, **TINY)
    message = str(err.value)
    assert "memory budget" in message and "needs" in message
    assert "--memory" in message  # says what to do


def _stated_bytes(message: str) -> float:
    needed = re.search(r"needs at least ([\d.]+) (GiB|MiB|KiB|bytes|B)\b", message)
    assert needed, message
    scale = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10, "bytes": 1, "B": 1}[needed.group(2)]
    return float(needed.group(1)) * scale


def test_plan_error_states_a_minimum_that_makes_planning_succeed():
    with pytest.raises(PlanError) as err:
        make_plan("gpt-tiny", memory_budget_bytes=2e5, **TINY)
    needed = _stated_bytes(str(err.value))
    assert needed > 2e5
    plan = make_plan("gpt-tiny", memory_budget_bytes=needed * 1.01, **TINY)
    assert plan.predicted.memory_bytes_per_device <= needed * 1.01


def test_batch_not_divisible_by_pinned_dp_raises_mesh_error():
    with pytest.raises(MeshError, match="divisible") as err:
        make_plan("gpt-tiny", devices=4, hardware="cpu", batch=3, fix={"dp": 4})
    assert "dp=4" in str(err.value) and "3" in str(err.value)


def test_batch_not_divisible_by_any_dp_raises_mesh_error():
    # 16 A100s without pipelining: tp <= 8 inside a node, so dp is one of 2, 4, 8, 16; none divides 3.
    with pytest.raises(MeshError, match="divisible"):
        make_plan("gpt-tiny", devices=16, hardware="a100-80gb-sxm", batch=3, fix={"pp": 1})


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="meshes are solved in forked workers only with 2+ CPUs")
def test_planning_after_an_in_process_solve_still_finds_a_plan(mlp_captured):
    _solve(mlp_captured, (1, 4))  # any earlier plan in this process, e.g. a pinned (single-mesh) make_plan
    plan = make_plan("gpt-tiny", devices=4, hardware="cpu", batch=4)  # 3 meshes: solved in forked workers
    assert sum(d["pp"] == 1 for d in [plan.degrees, *(a["degrees"] for a in plan.alternatives)]) == 3


def test_owner_costs_kept_per_graph_are_each_contexts_own():
    """cost.owner_costs shares op costs among contexts that differ in ZeRO stage, checkpointing or dp only; every
    owner's costs must still be what node_cost gives under each context (a cost that starts to depend on those
    would be served stale)."""
    from autopar.planner.cost import owner_costs
    from autopar.planner.memory import MemoryConfig

    model, info = build_model("llama", {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "vocab": 128},
                              seq=32, device="meta")
    pg = build(capture(model, sample_inputs(info, 4, 32, device="meta")), (2, 2), AXES)
    base = context(load_hardware("h100-80gb-sxm"), (2, 2))
    for zero, ac, dp, precision in [(0, "none", 2, "bf16"), (3, "full", 2, "bf16"), (2, "selective", 4, "bf16"),
                                    (3, "none", 1, "fp32"), (0, "full", 2, "fp32")]:
        ctx = replace(base, memory=MemoryConfig(zero, ac, precision, fuse=True), dp=dp)
        assert owner_costs(pg, ctx) == {p.node.name: [node_cost(ctx, p, s) for s in p.strategies]
                                        for p in pg.owners()}, (zero, ac, dp, precision)


def test_a_tied_weights_unused_second_name_is_planned_replicated():
    """gpt-tiny's wte.weight is lm_head.weight's second name and no op reads it: it costs nothing under any
    placement, so the ILP pins it replicated rather than leaving the plan to report whatever tie the solver
    lands on (the runtime aliases it to the tensor the graph uses, api.py)."""
    pg = _gpt_tiny_graph(2)
    unused = [p for p in pg.owners() if p.kind == "param" and not p.node.users]
    assert [p.node.name for p in unused] == ["p_wte_weight"] and len(unused[0].strategies) > 1
    ilp = ShardingILP(pg, context(load_hardware("cpu"), (2, 2)), budget_bytes=1e30)
    solution = ilp.solve()
    chosen = unused[0].strategies[solution.choice["p_wte_weight"]]
    assert all(t == R for t in chosen.outs[0]), chosen
