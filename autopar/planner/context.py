"""Context parallelism (cp) in the cost model: what one cp rank computes, holds and sends.

Everything in a block but attention is local on the sequence shard (codegen/ring_attention.py), so a cp rank of a
(dp, cp, tp) mesh does the same matmuls, norms and element-wise work, saves the same activations and reduces the
same parameter gradients (over dp x cp) as a rank of a (dp*cp, tp) mesh running cp times the batch at 1/cp of the
sequence: `folded` gives that batch and sequence, so every per-token cost and memory term of the existing model
divides by cp without a new rule. Attention is where the two differ: a rank's causal share of a sequence of length
S is S^2/(2 cp) query-key pairs (load-balanced chunks), while the folded model prices (S/cp)^2/2, cp times less;
`ring_node_cost` (node_cost's hook when CostContext.cp > 1) prices attention at cp times the folded work plus the
ring's exposed send/recv (cost_models.comm.ring_attention_s), and `ring_buffer_terms` adds the ring's transient
buffers to the memory terms.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from autopar.cost_models import collective_time_s, exposed_s
from autopar.cost_models.comm import ring_attention_s
from autopar.placement import local_shape
from autopar.planner.cost import CostContext, NodeCost
from autopar.planner.graph import PlanGraph
from autopar.planner.memory import FP32

ATTENTION = torch.ops.aten.scaled_dot_product_attention  # what the ring replaces (models call F.sdpa)


def folded(batch: int, seq: int, cp: int) -> tuple[int, int]:
    """(batch, seq) of the model whose (dp*cp, tp) plan costs what the (dp, cp, tp) plan costs outside attention."""
    if seq % (2 * cp):
        raise ValueError(f"seq {seq} is not divisible by 2*cp={2 * cp}")
    return batch * cp, seq // cp


def ring_buffer_bytes(kv_bytes: float, itemsize: int) -> float:
    """Bytes the ring holds beyond the attention's saved tensors, at its peak (a backward ring step,
    codegen/ring_attention.py): the stacked K/V and the copy arriving, the fp32 dK/dV accumulator and the one
    arriving, the fp32 dQ accumulator (half of K/V's size) and the step's own dQ, dK, dV from the local kernel. One
    attention runs at a time, so this is per device, not per layer."""
    fp32 = kv_bytes * FP32 / itemsize
    return 2 * kv_bytes + 2 * fp32 + fp32 / 2 + 1.5 * kv_bytes


def is_attention(p) -> bool:
    return p.kind == "op" and getattr(p.node.target, "overloadpacket", None) is ATTENTION


def _kv_bytes(p, s, ctx: CostContext) -> tuple[float, int]:
    """(bytes of this rank's K and V at strategy s, their itemsize)."""
    k, v = (local_shape(p.info.in_shapes[j], s.ins[j], ctx.degrees) for j in (1, 2))
    itemsize = p.info.in_dtypes[1].itemsize
    return (math.prod(k) + math.prod(v)) * itemsize, itemsize


def ring_node_cost(ctx: CostContext, p, s, folded_cost: NodeCost) -> NodeCost:
    """An attention node's cost on a cp rank (ctx.cp > 1, ctx on the folded graph): cp times the folded attention
    (the rank's causal share, module docstring) plus the ring's send/recv that the local attention does not hide
    (forward's exposed hops in forward, the rest in backward). Other nodes cost what the fold prices."""
    if not is_attention(p):
        return folded_cost
    kv, itemsize = _kv_bytes(p, s, ctx)
    fwd, bwd = ctx.cp * folded_cost.fwd_s, ctx.cp * folded_cost.bwd_s
    _, exposed = ring_attention_s(ctx.hw, ctx.cp_link, kv, ctx.cp, fwd, bwd, kv * FP32 / itemsize)
    hop = collective_time_s("send_recv", kv, 2, ctx.cp_link)
    exposed_fwd = min(exposed, (ctx.cp - 1) * exposed_s(ctx.hw, hop, fwd / ctx.cp))  # as ring_attention_s splits it
    return replace(folded_cost, fwd_s=fwd + exposed_fwd, bwd_s=bwd + exposed - exposed_fwd)


def ring_buffer_terms(pg: PlanGraph, ctx: CostContext) -> list:
    """The ring's transient buffers (ring_buffer_bytes) as a memory term of the first attention node: one ring
    runs at a time, so it is counted once per device, not per block."""
    from autopar.planner.footprint import Term

    for p in pg.owners():
        if is_attention(p):
            values = tuple(ring_buffer_bytes(*_kv_bytes(p, s, ctx)) for s in p.strategies)
            return [Term(p.node.name, "ring_buffers", values)]
    return []


# -- which models cp can run ----------------------------------------------------------------------------------------
def _shape(n) -> tuple[int, ...] | None:
    val = n.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _seq_dims(a, b) -> int:
    """How many dims of node a (traced at seq / cp) differ from its twin b (traced at seq, same batch)."""
    sa, sb = _shape(a), _shape(b)
    if sa is None or sb is None:
        return 0
    return sum(x != y for x, y in zip(sa, sb)) if len(sa) == len(sb) else max(len(sa), 1)


def position_source(n) -> bool:
    """A node that makes positions: `arange(s)` from 0 step 1 (learned position embeddings, rotary angles
    computed in forward), or rows [0, s) of a placeholder table (a precomputed rotary cos/sin, `table[:s]`)."""
    target = getattr(n.target, "overloadpacket", None)
    if target is torch.ops.aten.arange:
        start = n.args[0] if len(n.args) > 1 else 0
        step = n.args[2] if len(n.args) > 2 else 1
        return start == 0 and step == 1
    if target is torch.ops.aten.slice and len(n.args) >= 4:
        src, dim, start = n.args[:3]
        step = n.args[4] if len(n.args) > 4 else 1
        return getattr(src, "op", None) == "placeholder" and dim == 0 and start in (0, None) and step == 1
    return False


def cp_analysis(folded, whole) -> tuple[str | None, list[str]]:
    """(why the model cannot run context-parallel or None, the position sources codegen maps to true positions).
    `folded` is the model traced at seq / cp, `whole` at seq, both Captured at the same batch: aligned node by
    node, a dim that differs is a sequence dim. Context parallelism needs every mixing of positions to be a
    causal `F.scaled_dot_product_attention` without a mask (it becomes the ring) and everything else local to a
    token. Refused: no SDPA; SDPA with a mask, dropout, is_causal=False or fewer K/V heads (repeat them first);
    a tensor with two sequence dims computed from the input (attention written as softmax(QK^T)); a tensor with a
    sequence dim built without the input that does not come from a position source (a causal mask built with
    torch.ones(s, s).triu(), a position table indexed otherwise); a model that traces differently at the two
    lengths."""
    a_nodes, b_nodes = list(folded.graph.nodes), list(whole.graph.nodes)
    if len(a_nodes) != len(b_nodes) or any(a.target != b.target for a, b in zip(a_nodes, b_nodes)):
        return "the model traces to different graphs at seq and seq / cp (shape-dependent Python)", []
    inputs, data, positions, sources, attention = set(folded.user_inputs), set(), set(), [], 0
    for a, b in zip(a_nodes, b_nodes):
        if a.op == "placeholder":
            if a.name in inputs:
                data.add(a)
            continue
        if a.op != "call_function":
            continue
        stack = a.meta.get("nn_module_stack")
        where = f"{a.name} ({(list(stack.values())[-1][0] if stack else '') or 'top level'})"
        if any(x in data for x in a.all_input_nodes):
            data.add(a)
        if getattr(a.target, "overloadpacket", None) is ATTENTION:
            attention += 1
            why = _attention_refusal(a)
            if why:
                return f"attention {where} {why}; context parallelism runs causal attention without a mask only", []
            continue
        dims = _seq_dims(a, b)
        if a in data:
            if dims >= 2:
                return (f"{where} computes a sequence x sequence tensor from the input: attention not written as "
                        "F.scaled_dot_product_attention(..., is_causal=True), which context parallelism turns "
                        "into ring attention"), []
            continue
        if any(x in positions for x in a.all_input_nodes):
            positions.add(a)
        elif dims and position_source(a):
            positions.add(a)
            sources.append(a.name)
        elif dims:
            return (f"{where} builds a tensor of the sequence's length without the input (a custom mask or "
                    "position table) that context parallelism cannot shard; only arange(seq) positions and rows "
                    "[0, seq) of a table are mapped to each rank's true positions"), []
    if not attention:
        return "the model has no F.scaled_dot_product_attention for context parallelism to run as ring attention", []
    return None, sources


def _attention_refusal(n) -> str:
    args = list(n.args) + [None] * 8
    kw = n.kwargs
    mask, dropout = kw.get("attn_mask", args[3]), kw.get("dropout_p", args[4] or 0.0)
    causal, gqa = kw.get("is_causal", args[5] or False), kw.get("enable_gqa", args[7] or False)
    q, k = _shape(args[0]), _shape(args[1])
    if mask is not None:
        return "has an attention mask"
    if dropout:
        return "has attention dropout"
    if not causal:
        return "is not causal (is_causal=False)"
    if gqa or (q and k and q[-3] != k[-3]):
        return "has fewer K/V heads than query heads (repeat K/V before attention)"
    return ""
