"""The ring's price on one cp rank, below the node cost (cost.py prices attention with it, footprint.py adds its
buffers; context.py, which builds on cost.py, explains the fold): cp times the folded attention, the ring's send/recv
that the local attention does not hide, and the ring's transient buffers. Types are left unannotated here so that
this module imports nothing of cost.py (tests/test_planner_imports.py)."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from autopar.cost_models import collective_time_s, exposed_s
from autopar.cost_models.comm import ring_attention_s
from autopar.placement import local_shape
from autopar.planner.memory import FP32

ATTENTION = torch.ops.aten.scaled_dot_product_attention  # what the ring replaces (models call F.sdpa)


def ring_buffer_bytes(kv_bytes: float, itemsize: int) -> float:
    """Bytes the ring holds beyond the attention's saved tensors, at its peak (a backward ring step,
    codegen/ring_attention.py): the stacked K/V and the copy arriving, the fp32 dK/dV accumulator and the one
    arriving, the fp32 dQ accumulator (half of K/V's size) and the step's own dQ, dK, dV from the local kernel. One
    attention runs at a time, so this is per device, not per layer."""
    fp32 = kv_bytes * FP32 / itemsize
    return 2 * kv_bytes + 2 * fp32 + fp32 / 2 + 1.5 * kv_bytes


def is_attention(p) -> bool:
    return p.kind == "op" and getattr(p.node.target, "overloadpacket", None) is ATTENTION


def kv_bytes(p, s, ctx) -> tuple[float, int]:
    """(bytes of this rank's K and V at strategy s, their itemsize)."""
    k, v = (local_shape(p.info.in_shapes[j], s.ins[j], ctx.degrees) for j in (1, 2))
    itemsize = p.info.in_dtypes[1].itemsize
    return (math.prod(k) + math.prod(v)) * itemsize, itemsize


def ring_node_cost(ctx, p, s, folded_cost):
    """An attention node's cost on a cp rank (ctx.cp > 1, ctx on the folded graph): cp times the folded attention
    (the rank's causal share, module docstring) plus the ring's send/recv that the local attention does not hide
    (forward's exposed hops in forward, the rest in backward). Other nodes cost what the fold prices."""
    if not is_attention(p):
        return folded_cost
    kv, itemsize = kv_bytes(p, s, ctx)
    fwd, bwd = ctx.cp * folded_cost.fwd_s, ctx.cp * folded_cost.bwd_s
    _, exposed = ring_attention_s(ctx.hw, ctx.cp_link, kv, ctx.cp, fwd, bwd, kv * FP32 / itemsize)
    hop = collective_time_s("send_recv", kv, 2, ctx.cp_link)
    exposed_fwd = min(exposed, (ctx.cp - 1) * exposed_s(ctx.hw, hop, fwd / ctx.cp))  # as ring_attention_s splits it
    return replace(folded_cost, fwd_s=fwd + exposed_fwd, bwd_s=bwd + exposed - exposed_fwd)
