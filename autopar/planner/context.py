"""Context parallelism (cp) in the cost model: what one cp rank computes, holds and sends.

Everything in a block but attention is local on the sequence shard (codegen/ring_attention.py), so a cp rank of a
(dp, cp, tp) mesh does the same matmuls, norms and element-wise work, saves the same activations and reduces the
same parameter gradients (over dp x cp) as a rank of a (dp*cp, tp) mesh running cp times the batch at 1/cp of the
sequence: `folded` gives that batch and sequence, so every per-token cost and memory term of the existing model
divides by cp without a new rule. Attention is where the two differ: a rank's causal share of a sequence of length
S is S^2/(2 cp) query-key pairs (load-balanced chunks), while the folded model prices (S/cp)^2/2, cp times less;
ring.py's `ring_node_cost` (node_cost's hook when CostContext.cp > 1) prices attention at cp times the folded work
plus the ring's exposed send/recv (cost_models.comm.ring_attention_s), and footprint.py's `ring_buffer_terms` adds
the ring's transient buffers to the memory terms. This module keeps the fold and which models cp can run.
"""

from __future__ import annotations

import torch

from autopar.planner.ring import ATTENTION


def folded(batch: int, seq: int, cp: int) -> tuple[int, int]:
    """(batch, seq) of the model whose (dp*cp, tp) plan costs what the (dp, cp, tp) plan costs outside attention."""
    if seq % (2 * cp):
        raise ValueError(f"seq {seq} is not divisible by 2*cp={2 * cp}")
    return batch * cp, seq // cp


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


def position_source(n, seq: int | None = None) -> bool:
    """A node that makes positions: `arange(s)` from 0 step 1 (learned position embeddings, rotary angles
    computed in forward), or rows [0, s) of a placeholder table (a precomputed rotary cos/sin, `table[:s]`), with
    s the (local) sequence length `seq` where given: an arange over another count that grows with the sequence
    (a mixture of experts' token x top-k slots) indexes tokens, not positions."""
    target = getattr(n.target, "overloadpacket", None)
    shape = _shape(n)
    if seq is not None and (not shape or shape[0] != seq):
        return False
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
    token. Refused: no SDPA; SDPA with a mask, dropout or is_causal=False;
    a tensor with two sequence dims computed from the input (attention written as softmax(QK^T)); a tensor with a
    sequence dim built without the input that does not come from a position source (a causal mask built with
    torch.ones(s, s).triu(), a position table indexed otherwise); a model that traces differently at the two
    lengths."""
    a_nodes, b_nodes = list(folded.graph.nodes), list(whole.graph.nodes)
    if len(a_nodes) != len(b_nodes) or any(a.target != b.target for a, b in zip(a_nodes, b_nodes)):
        return "the model traces to different graphs at seq and seq / cp (shape-dependent Python)", []
    inputs, data, positions, sources, attention = set(folded.user_inputs), set(), set(), [], 0
    seq = next((_shape(a)[1] for a in a_nodes if a.op == "placeholder" and a.name in inputs
                and len(_shape(a) or ()) >= 2), None)  # the folded trace's sequence: [batch, seq / cp, ...]
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
        elif dims and position_source(a, seq):
            positions.add(a)
            sources.append(a.name)
        elif dims:
            return (f"{where} builds a tensor of the sequence's length without the input (a custom mask, "
                    "position table, or an arange over tokens x experts) that context parallelism cannot shard; "
                    "only arange(seq) positions and rows [0, seq) of a table are mapped to each rank's true "
                    "positions"), []
    if not attention:
        return "the model has no F.scaled_dot_product_attention for context parallelism to run as ring attention", []
    return None, sources


def _attention_refusal(n) -> str:
    args = list(n.args) + [None] * 8
    kw = n.kwargs
    mask, dropout = kw.get("attn_mask", args[3]), kw.get("dropout_p", args[4] or 0.0)
    causal = kw.get("is_causal", args[5] or False)
    if mask is not None:
        return "has an attention mask"
    if dropout:
        return "has attention dropout"
    if not causal:
        return "is not causal (is_causal=False)"
    return ""  # fewer K/V heads (enable_gqa) travel the ring as they are (codegen/ring_attention.py)
