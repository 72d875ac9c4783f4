"""Tier 0: op rules as pure functions. Each rule is read off a real node: a tiny module holding the op of interest
is exported with torch.export, and the rule sees the node's shapes exactly as the planner would."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autopar.placement import P, R, S, fmt
from autopar.strategies import OpInfo, Strategy, Strategy1D, expand, grad_partial_axes, rule_for, tensor_inputs
from autopar.strategies.matmul import einsum_rule
from autopar.strategies.views import reshape_dim_map, view_groups

aten = torch.ops.aten


class _Fn(nn.Module):
    """Wrap a function of tensors (and optional submodules) as a module to export."""

    def __init__(self, fn, **modules):
        super().__init__()
        self.fn = fn
        for name, m in modules.items():
            self.add_module(name, m)

    def forward(self, *xs):
        return self.fn(self, *xs)


def _vals(node: torch.fx.Node) -> list[torch.Tensor]:
    val = node.meta["val"]
    return [val] if isinstance(val, torch.Tensor) else [v for v in val if isinstance(v, torch.Tensor)]


def op_info(module: nn.Module, *inputs: torch.Tensor, op) -> OpInfo:
    """OpInfo of the first node calling `op` (an OpOverloadPacket) in the export of module(*inputs)."""
    ep = torch.export.export(module, inputs)
    node = next(n for n in ep.graph.nodes
                if n.op == "call_function" and getattr(n.target, "overloadpacket", None) is op)
    ins = [_vals(n)[0] for n, _ in tensor_inputs(node)]
    outs = _vals(node)
    return OpInfo(node, tuple(tuple(t.shape) for t in ins), tuple(tuple(t.shape) for t in outs),
                  tuple(t.dtype for t in ins), tuple(t.dtype for t in outs))


def rules(info: OpInfo) -> list[Strategy1D]:
    rule = rule_for(info.node.target)
    assert rule is not None, f"no rule for {info.node.target}"
    return rule.strategies(info)


def table(strategies) -> set[tuple[tuple, tuple]]:
    """Single-axis strategies as ((ins...), (outs...)) of printed placements, for set comparisons."""
    return {(tuple(map(str, s.ins)), tuple(map(str, s.outs))) for s in strategies}


# ---------------------------------------------------------------- matmul-like


def test_einsum_mk_kn_shards_each_letter_and_a_contracted_k_leaves_the_output_partial():
    got = table(einsum_rule("mk,kn->mn"))
    assert got == {
        (("R", "R"), ("R",)),
        (("S0", "R"), ("S0",)),  # m: rows of the left operand, rows of the output
        (("R", "S1"), ("S1",)),  # n: columns of the right operand, columns of the output
        (("S1", "S0"), ("P",)),  # k: both operands sharded on the contracted dim, output a partial sum
    }


def test_mm_and_2d_matmul_nodes_use_the_mk_kn_einsum():
    a, b = torch.randn(4, 6), torch.randn(6, 8)
    assert table(rules(op_info(_Fn(lambda self, a, b: torch.mm(a, b)), a, b, op=aten.mm))) == table(
        einsum_rule("mk,kn->mn"))
    assert table(rules(op_info(_Fn(lambda self, a, b: a @ b), a, b, op=aten.matmul))) == table(
        einsum_rule("mk,kn->mn"))


def test_batched_matmul_against_a_2d_weight_shards_the_batch_of_one_operand_only():
    info = op_info(_Fn(lambda self, a, b: a @ b), torch.randn(3, 4, 6), torch.randn(6, 8), op=aten.matmul)
    got = table(rules(info))
    assert (("S0", "R"), ("S0",)) in got
    assert (("S2", "S0"), ("P",)) in got
    assert (("R", "S1"), ("S2",)) in got


def _linear_info(bias: bool = True) -> OpInfo:
    lin = nn.Linear(8, 12, bias=bias)
    return op_info(_Fn(lambda self, x: self.lin(x), lin=lin), torch.randn(2, 5, 8), op=aten.linear)


def test_linear_with_bias_bias_is_partial_under_k_split_and_sharded_under_n_split():
    info = _linear_info()
    assert info.in_shapes == ((2, 5, 8), (12, 8), (12,))  # x, weight, bias
    by_weight = {str(s.ins[1]): s for s in rules(info)}
    row = by_weight["S1"]  # weight [n, k] split on k: row-parallel
    assert (row.ins[0], row.outs[0], row.ins[2]) == (S(2), P, P)
    col = by_weight["S0"]  # split on n: column-parallel
    assert (col.ins[0], col.outs[0], col.ins[2]) == (R, S(2), S(0))
    batch = {s.outs[0]: s for s in rules(info)}[S(0)]  # batch-sharded: weight and bias replicated
    assert batch.ins == (S(0), R, R)


def test_linear_without_bias_has_two_inputs_per_strategy():
    strategies = rules(_linear_info(bias=False))
    assert strategies and all(len(s.ins) == 2 for s in strategies)
    assert any(s.ins == (S(2), S(1)) and s.outs == (P,) for s in strategies)


# ---------------------------------------------------------------- pointwise


def _add_info(*shapes, fn=lambda self, a, b: a + b) -> OpInfo:
    return op_info(_Fn(fn), *(torch.randn(*s) for s in shapes), op=aten.add)


def test_broadcast_add_shards_the_bias_only_along_its_own_dim():
    info = _add_info((2, 4, 8), (8,))
    by_out = {s.outs[0]: s for s in rules(info)}
    assert by_out[S(2)].ins == (S(2), S(0))  # hidden dim: the [h] operand is sharded with it
    assert by_out[S(0)].ins == (S(0), R)  # batch dim: the [h] operand broadcasts, so it stays whole
    assert by_out[S(1)].ins == (S(1), R)


def test_broadcast_add_keeps_a_size_one_dim_replicated():
    info = _add_info((2, 4, 8), (2, 1, 8))
    by_out = {s.outs[0]: s for s in rules(info)}
    assert by_out[S(1)].ins == (S(1), R)
    assert by_out[S(0)].ins == (S(0), S(0))


def test_add_of_two_partials_is_partial_but_adding_a_python_scalar_is_not():
    assert Strategy1D(outs=(P,), ins=(P, P)) in rules(_add_info((2, 8), (2, 8)))
    scalar = _add_info((2, 8), fn=lambda self, a: a + 1.0)
    assert scalar.in_shapes == ((2, 8),)
    assert all(P not in s.ins + s.outs for s in rules(scalar))  # (a1 + 1) + (a2 + 1) != a1 + a2 + 1


def test_mul_is_linear_in_one_operand_at_a_time_never_both():
    info = op_info(_Fn(lambda self, a, b: a * b), torch.randn(2, 8), torch.randn(2, 8), op=aten.mul)
    got = rules(info)
    assert Strategy1D(outs=(P,), ins=(P, R)) in got
    assert Strategy1D(outs=(P,), ins=(R, P)) in got
    assert Strategy1D(outs=(P,), ins=(P, P)) not in got  # (a1 + a2)(b1 + b2) has cross terms


def test_nonlinear_unary_never_takes_a_partial_input():
    info = op_info(_Fn(lambda self, x: F.gelu(x)), torch.randn(2, 8), op=aten.gelu)
    assert table(rules(info)) == {(("R",), ("R",)), (("S0",), ("S0",)), (("S1",), ("S1",))}


# ---------------------------------------------------------------- views


def test_reshape_dim_map_split_keeps_outer_dims_and_the_outermost_of_a_split():
    assert reshape_dim_map([2, 16, 64], [2, 16, 4, 16]) == {0: 0, 1: 1, 2: 2}


def test_reshape_dim_map_merge_keeps_only_the_outermost_dim_of_the_group():
    assert view_groups([8, 32, 128], [256, 128]) == [([0, 1], [0]), ([2], [1])]
    mapping = reshape_dim_map([8, 32, 128], [256, 128])
    assert mapping == {0: 0, 2: 1}
    assert 1 not in mapping  # a shard of dim 1 is strided inside the merged dim: not a contiguous block


def test_reshape_skips_unit_dims_when_choosing_the_group_head():
    assert reshape_dim_map([1, 8, 4], [8, 4]) == {1: 0, 2: 1}


def test_view_node_strategies_follow_the_dim_map_and_pass_partials_through():
    info = op_info(_Fn(lambda self, x: x.view(256, 128)), torch.randn(8, 32, 128), op=aten.view)
    assert table(rules(info)) == {(("R",), ("R",)), (("P",), ("P",)), (("S0",), ("S0",)), (("S2",), ("S1",))}


def test_transpose_swaps_the_two_dims_and_keeps_the_others():
    info = op_info(_Fn(lambda self, x: x.transpose(1, 2)), torch.randn(2, 3, 4), op=aten.transpose)
    got = table(rules(info))
    assert {(("S0",), ("S0",)), (("S1",), ("S2",)), (("S2",), ("S1",)), (("P",), ("P",))} <= got
    assert (("S1",), ("S1",)) not in got and (("S2",), ("S2",)) not in got


def test_permute_maps_each_input_dim_to_its_new_position():
    info = op_info(_Fn(lambda self, x: x.permute(2, 0, 1)), torch.randn(2, 3, 4), op=aten.permute)
    by_in = {s.ins[0]: s.outs[0] for s in rules(info)}
    assert (by_in[S(0)], by_in[S(1)], by_in[S(2)]) == (S(1), S(2), S(0))


# ---------------------------------------------------------------- reductions and nn ops


def test_softmax_never_shards_its_normalised_dim():
    info = op_info(_Fn(lambda self, x: F.softmax(x, dim=-1)), torch.randn(2, 3, 8), op=aten.softmax)
    assert table(rules(info)) == {(("R",), ("R",)), (("S0",), ("S0",)), (("S1",), ("S1",))}


def test_sum_over_a_sharded_dim_is_partial_and_over_a_kept_dim_stays_sharded():
    info = op_info(_Fn(lambda self, x: x.sum(dim=1)), torch.randn(2, 3, 8), op=aten.sum)
    got = table(rules(info))
    assert {(("S1",), ("P",)), (("S0",), ("S0",)), (("S2",), ("S1",)), (("P",), ("P",))} <= got


def test_amax_over_a_sharded_dim_is_not_a_partial_sum():
    info = op_info(_Fn(lambda self, x: x.amax(dim=1)), torch.randn(2, 3, 8), op=aten.amax)
    assert all(P not in s.outs + s.ins for s in rules(info))


def test_sdpa_shards_batch_and_heads_but_never_the_sequence_or_head_dim():
    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    info = op_info(_Fn(lambda self, q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)), q, k, v,
                   op=aten.scaled_dot_product_attention)
    got = table(rules(info))
    assert got == {(("R",) * 3, ("R",)), (("S0",) * 3, ("S0",)), (("S1",) * 3, ("S1",))}


def test_layer_norm_shards_dims_before_the_normalised_one_with_replicated_params():
    ln = nn.LayerNorm(8)
    info = op_info(_Fn(lambda self, x: self.ln(x), ln=ln), torch.randn(2, 4, 8), op=aten.layer_norm)
    got = table(rules(info))
    assert got == {(("R",) * 3, ("R",)), (("S0", "R", "R"), ("S0",)), (("S1", "R", "R"), ("S1",))}


def test_embedding_offers_vocab_parallel_whose_output_is_partial():
    emb = nn.Embedding(64, 16)
    info = op_info(_Fn(lambda self, idx: self.emb(idx), emb=emb), torch.randint(0, 64, (2, 8)),
                   op=aten.embedding)
    assert info.in_shapes == ((64, 16), (2, 8))  # weight, indices
    got = rules(info)
    assert Strategy1D(outs=(P,), ins=(S(0), R)) in got  # each rank looks up its rows, zeros the rest
    assert Strategy1D(outs=(S(2),), ins=(S(1), R)) in got  # hidden-sharded table
    assert Strategy1D(outs=(S(1),), ins=(R, S(1))) in got  # sequence-sharded indices
    assert all(s.outs == (P,) for s in got if s.ins[0] == S(0))  # a vocab shard never yields a full row


def test_cross_entropy_shards_rows_or_classes():
    info = op_info(_Fn(lambda self, x, t: F.cross_entropy(x, t)), torch.randn(6, 10), torch.randint(0, 10, (6,)),
                   op=aten.cross_entropy_loss)
    got = rules(info)
    assert Strategy1D(outs=(P,), ins=(S(0), S(0))) in got
    # classes split only by the vocab-parallel strategy, whose collectives make the loss whole (R), never partial
    assert [s for s in got if s.ins[0] == S(1)] == [Strategy1D(outs=(R,), ins=(S(1), R))]


# ---------------------------------------------------------------- expansion to a mesh


def _relu_info(*shape) -> OpInfo:
    return op_info(_Fn(lambda self, x: torch.relu(x)), torch.randn(*shape), op=aten.relu)


def test_expand_drops_double_sharding_and_uneven_division():
    info = _relu_info(6, 8)
    got = {fmt(s.outs[0]) for s in expand(rules(info), (2, 4), info)}
    # S0 on the degree-4 axis: 6 % 4 != 0; S0/S0 and S1/S1 shard one dim twice.
    assert got == {"R/R", "S0/R", "S1/R", "R/S1", "S0/S1"}


def test_expand_keeps_degree_one_axes_replicated():
    info = _relu_info(6, 8)
    got = expand(rules(info), (1, 2), info)
    assert {fmt(s.outs[0]) for s in got} == {"R/R", "R/S0", "R/S1"}
    assert all(s.ins[0] == s.outs[0] for s in got)


def test_expand_checks_every_input_not_only_the_output():
    info = _add_info((4, 8), (8,))  # [h] bias: its dim 0 is 8
    got = {(fmt(s.outs[0]), fmt(s.ins[1])) for s in expand(rules(info), (2, 8), info)}
    assert ("R/S1", "R/S0") in got
    assert ("S1/S1", "S0/S0") not in got  # would shard the bias dim twice


# ---------------------------------------------------------------- gradient partial axes


def _linear_mesh_strategies() -> dict[tuple[str, str], Strategy]:
    info = _linear_info()
    return {(fmt(s.ins[0]), fmt(s.ins[1])): s for s in expand(rules(info), (2, 2), info)}


def test_grad_partial_axes_are_the_replicated_inputs_on_axes_that_split_the_work():
    by_ins = _linear_mesh_strategies()
    column = by_ins[("S0/R", "R/S0")]  # dp on batch, tp column-parallel
    assert fmt(column.outs[0]) == "S0/S2"
    assert grad_partial_axes(column, 0) == [1]  # x is whole on tp but each tp rank only uses it for its columns
    assert grad_partial_axes(column, 1) == [0]  # the weight sees only this dp rank's batch
    assert grad_partial_axes(column, 2) == [0]
    row = by_ins[("S0/S2", "R/S1")]  # tp row-parallel: x sharded on both axes, bias added once (P)
    assert (fmt(row.outs[0]), fmt(row.ins[2])) == ("S0/P", "R/P")
    assert grad_partial_axes(row, 0) == []
    assert grad_partial_axes(row, 1) == [0]
    assert grad_partial_axes(row, 2) == [0]  # P on tp is not R: its gradient is already whole there


def test_grad_partial_axes_is_empty_when_nothing_is_split():
    replicated = _linear_mesh_strategies()[("R/R", "R/R")]
    assert all(grad_partial_axes(replicated, j) == [] for j in range(3))


def test_grad_partial_axes_on_a_hand_built_strategy():
    s = Strategy(outs=((S(0), R, R),), ins=((S(0), R, R), (R, R, P)))
    # axis 0 splits and input 1 is R there; axis 1 splits nothing; axis 2 splits (the P) but input 1 is P there
    assert grad_partial_axes(s, 1) == [0]
    s2 = Strategy(outs=((R, S(1)),), ins=((R, S(1)), (R, R)))
    assert grad_partial_axes(s2, 1) == [1]
