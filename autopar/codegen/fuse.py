"""Fusion pass: each rank's generated graph, after placements are lowered, with fused chains as one op each.

The chains are those the planner priced (planner/fusion.py, matched by op pattern on the traced graph). A chain is
rewritten only where this rank's program still holds it intact: every member emitted as the same op, each reading
the member before it directly (no collective or lowering in between), members reading one outside value reading
the same redistribution of it, and each used only inside the chain. Where a
placement put a collective inside a chain (an RMSNorm over a sharded hidden dim, say), the chain stays unfused, as
the planner's pricing of that placement assumed nothing else. The fused ops are `torch.ops.autopar.*`
(autopar/kernels); the head matmul + cross-entropy also absorbs the vocab-parallel lowering's collectives.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from autopar.codegen.emit import BLOCK_META
from autopar.planner.fusion import VIEWS, Chain, find_chains, flat_args
from autopar.planner.graph import PlanGraph

aten = torch.ops.aten


def fuse(graph: fx.Graph, pg: PlanGraph, values: dict[str, fx.Node]) -> list[Chain]:
    """Rewrite every intact chain in place; returns the chains fused."""
    from autopar.kernels import ops  # noqa: F401 - registers torch.ops.autopar.* (and imports triton where present)

    traced = next(iter(pg.nodes.values())).node.graph
    done = []
    for chain in find_chains(traced):
        if not _intact(chain, pg, values):
            continue
        rewrite = _cross_entropy if chain.kind == "cross_entropy" else _pointwise
        if rewrite(graph, chain, values):
            done.append(chain)
    graph.lint()
    return done


def _intact(chain: Chain, pg: PlanGraph, values: dict[str, fx.Node]) -> bool:
    members = {values.get(m) for m in chain.members}
    last = values.get(chain.anchor)
    order = {n: i for i, n in enumerate(last.graph.nodes)} if isinstance(last, fx.Node) else {}
    outside: dict[str, object] = {}  # what each outside value a member reads is here
    for name in chain.members:
        node, here = pg.nodes[name].node, values.get(name)
        if chain.kind == "cross_entropy" and name == chain.anchor:
            continue  # the loss is lowered (codegen/lower.py); _cross_entropy matches what it became
        if not isinstance(here, fx.Node) or here.op != "call_function":
            return False
        if here.target != node.target and not (node.target in VIEWS and here.target in VIEWS):
            return False  # (a view's lowering may write it as another view: codegen/lower.py)
        for i, arg in enumerate(flat_args(node)):
            if isinstance(arg, fx.Node) and arg.name in chain.members and flat_args(here)[i] is not values[arg.name]:
                return False
            if isinstance(arg, fx.Node) and arg.name not in chain.members and \
                    outside.setdefault(arg.name, flat_args(here)[i]) is not flat_args(here)[i]:
                return False  # two members read one outside value as two different redistributions of it
        escapes = [u for u in here.users if u not in members]
        if name == chain.residual_out:  # its value leaves the chain: every outside use comes after the fused op
            if any(order[u] < order[last] for u in escapes):
                return False
        elif name != chain.anchor and escapes and not (chain.kind == "cross_entropy" and name == chain.members[-2]):
            return False  # (the logits view feeds the lowered loss, which _cross_entropy checks)
    return True


def _args(chain: Chain, values: dict[str, fx.Node]) -> list:
    """The fused op's inputs: each the value its member reads here (after any redistribution), or None."""
    return [flat_args(values[ref[0]])[ref[1]] if ref is not None else None for ref in chain.inputs]


def _call(graph: fx.Graph, at: fx.Node, target, args: tuple) -> fx.Node:
    with graph.inserting_before(at):
        node = graph.call_function(target, args)
    node.meta[BLOCK_META] = at.meta.get(BLOCK_META)  # stays in the block's submodule (codegen/blocks.py)
    return node


def _pointwise(graph: fx.Graph, chain: Chain, values: dict[str, fx.Node]) -> bool:
    anchor = values[chain.anchor]
    ins = _args(chain, values)
    ops = torch.ops.autopar
    if chain.kind in ("add_norm", "norm"):
        fused = _call(graph, anchor, ops.add_norm.default, (ins[0], ins[1], ins[2], ins[3], *chain.params))
        out = _call(graph, anchor, operator.getitem, (fused, 0))
        if chain.residual_out is not None:
            members = {values[m] for m in chain.members}
            values[chain.residual_out].replace_all_uses_with(_call(graph, anchor, operator.getitem, (fused, 1)),
                                                             delete_user_cb=lambda u: u not in members)
    elif chain.kind == "swiglu":
        out = _call(graph, anchor, ops.swiglu.default, tuple(ins))
    elif chain.kind == "rotary":
        out = _call(graph, anchor, ops.rotary.default, tuple(ins))
    else:  # bias_gelu: the Linear without its bias, then bias + GELU in one pass
        matmul = _call(graph, anchor, aten.linear.default, (ins[0], ins[1]))
        out = _call(graph, anchor, ops.bias_gelu.default, (matmul, ins[2], *chain.params))
    anchor.replace_all_uses_with(out)
    _erase(graph, [values[m] for m in chain.members])
    return True


def _cross_entropy(graph: fx.Graph, chain: Chain, values: dict[str, fx.Node]) -> bool:
    """linear -> view -> (one of the cross-entropy lowerings) becomes one chunked fused call summing the counted
    rows' losses; what the lowering does with that sum (divide by the global count) stays."""
    from autopar.kernels.linear_cross_entropy import fused_linear_cross_entropy

    linear, view = values[chain.members[0]], values[chain.members[-2]]
    x, weight = flat_args(linear)[0], flat_args(linear)[1]
    ignore, reduction = chain.params
    if len(view.users) != 1:
        return False
    (loss,) = view.users
    if loss.op == "call_module" and loss.target.endswith(".cross_entropy"):  # vocab-parallel: class-sharded
        (mul,) = loss.users if len(loss.users) == 1 else (None,)
        total = next(iter(mul.users)) if mul is not None and len(mul.users) == 1 else None
        if total is None or total.target is not aten.sum.default:
            return False  # per-row losses wanted (reduction none): nothing to fuse them into
        with graph.inserting_before(total):  # the axis's process group, as the generated module holds it
            group = graph.get_attr(loss.target.rsplit(".", 1)[0] + ".group")
        group.meta[BLOCK_META] = total.meta.get(BLOCK_META)
        start, target, dead = loss.args[2], loss.args[1], [total, mul]
    elif loss.target is aten.cross_entropy_loss.default:  # rows whole or row-sharded: the loss reads all classes
        total, group, start, target, dead = loss, "", 0, loss.args[1], []
    else:
        return False
    rows = _call(graph, total, aten.flatten.using_ints, (x, 0, -2))
    fused = _call(graph, total, fused_linear_cross_entropy, (rows, weight, target, start, ignore, 0, group))
    result = fused
    if loss is total and not (len(loss.args) > 3 and loss.args[3] == 2):  # an unlowered mean: sum / count
        counted = _call(graph, total, aten.ne.Scalar, (target, ignore))
        count = _call(graph, total, aten.sum.dim_IntList, (counted, [0]))
        result = _call(graph, total, aten.div.Tensor, (fused, count))
    total.replace_all_uses_with(result)
    _erase(graph, dead + [loss] + [values[m] for m in chain.members[:-1]])
    return True


def _erase(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """Members left without users, last first (each one's inputs may be the next)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in sorted(set(nodes), key=lambda n: -order[n]):
        if not node.users:
            graph.erase_node(node)
