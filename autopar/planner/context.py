"""Context parallelism (cp) in the cost model: what one cp rank computes, holds and sends.

Everything in a block but attention is local on the sequence shard (codegen/ring_attention.py), so a cp rank of a
(dp, cp, tp) mesh does the same matmuls, norms and element-wise work, saves the same activations and reduces the
same parameter gradients (over dp x cp) as a rank of a (dp*cp, tp) mesh running cp times the batch at 1/cp of the
sequence: `folded` gives that batch and sequence, so every per-token cost and memory term of the existing model
divides by cp without a new rule. Attention is where the two differ: a rank's causal share of a sequence of length
S is S^2/(2 cp) query-key pairs (load-balanced chunks), while the folded model prices (S/cp)^2/2, cp times less;
`ring_correction` adds the (cp - 1) x missing attention work and the ring's send/recv (cost_models.comm
.ring_attention_s), and `ring_buffer_bytes` the ring's transient buffers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from autopar.cost_models import Hardware, Link
from autopar.cost_models.comm import ring_attention_s
from autopar.placement import local_shape
from autopar.planner.cost import CostContext, node_cost
from autopar.planner.graph import PlanGraph
from autopar.planner.memory import FP32

ATTENTION = torch.ops.aten.scaled_dot_product_attention  # what the ring replaces (models call F.sdpa)


def folded(batch: int, seq: int, cp: int) -> tuple[int, int]:
    """(batch, seq) of the model whose (dp*cp, tp) plan costs what the (dp, cp, tp) plan costs outside attention."""
    if seq % (2 * cp):
        raise ValueError(f"seq {seq} is not divisible by 2*cp={2 * cp}")
    return batch * cp, seq // cp


@dataclass(frozen=True)
class RingCost:
    attention_fwd_s: float  # forward attention the folded model leaves out, per micro-batch
    attention_bwd_s: float
    comm_s: float  # ring send/recv, forward and backward, per micro-batch
    exposed_s: float  # of it, not hidden by the local attention
    buffer_bytes: float  # transient: K/V in flight and the travelling dK/dV accumulators


def ring_correction(hw: Hardware, cp_link: Link, pg: PlanGraph, ctx: CostContext, choice: dict[str, int],
                    cp: int) -> RingCost:
    """The ring's cost for every attention node of the folded graph `pg` at its chosen strategy (`choice`: owner
    -> strategy index), summed over the repeated blocks."""
    if cp <= 1:
        return RingCost(0.0, 0.0, 0.0, 0.0, 0.0)
    fwd = bwd = comm = exposed = buffers = 0.0
    for p in pg.nodes.values():
        if p.kind != "op" or getattr(p.node.target, "overloadpacket", None) is not ATTENTION:
            continue
        owner = pg.nodes[p.owner]
        s = owner.strategies[choice[p.owner]]
        cost = node_cost(ctx, owner, s)
        # the rank's true attention is cp times the folded one (module docstring)
        fwd, bwd = fwd + (cp - 1) * cost.fwd_s, bwd + (cp - 1) * cost.bwd_s
        k, v = (local_shape(p.info.in_shapes[j], s.ins[j], ctx.degrees) for j in (1, 2))
        itemsize = p.info.in_dtypes[1].itemsize
        kv = (math.prod(k) + math.prod(v)) * itemsize
        c, e = ring_attention_s(hw, cp_link, kv, cp, cp * cost.fwd_s, cp * cost.bwd_s, kv * FP32 / itemsize)
        comm, exposed = comm + c, exposed + e
        buffers = max(buffers, ring_buffer_bytes(kv, itemsize))
    return RingCost(fwd, bwd, comm, exposed, buffers)


def ring_buffer_bytes(kv_bytes: float, itemsize: int) -> float:
    """Bytes the ring holds beyond the attention's saved tensors, at its peak (backward): the stacked K/V and the
    copy arriving, plus the fp32 dK/dV accumulator and the one arriving (codegen/ring_attention.py). One attention
    runs at a time, so this is per device, not per layer."""
    return 2 * kv_bytes + 2 * kv_bytes * FP32 / itemsize
