"""Neural-network ops: embedding, normalisation, attention, cross-entropy.

- embedding: batch/sequence of the indices shardable; the table sharded on hidden (output sharded on its last
  dim) or on vocab (Megatron's vocab-parallel embedding: each rank looks up its rows, masks the rest, output P).
- layer_norm / rms_norm: any dim before the normalised ones (sequence parallelism is S on the sequence dim).
- scaled_dot_product_attention: batch or heads (Megatron head-parallel attention); the sequence stays whole
  (sharding it is context parallelism, a later capability).
- cross_entropy_loss: rows shardable; the mean becomes a partial sum over the global count (the lowering divides).
  Or classes shardable (Megatron's vocab-parallel cross-entropy): max, sum of exponentials and the target's logit
  are reduced across the axis, so the loss comes out whole (R) without gathering the logits.
"""

from __future__ import annotations

import math

import torch

from autopar.placement import P, R, S
from autopar.strategies.base import OpInfo, Strategy1D, packet_of, register, replicated

aten = torch.ops.aten


@register(aten.embedding, flops=lambda ins, outs, info: 0.0)
def embedding(info: OpInfo) -> list[Strategy1D]:
    idx = info.in_shapes[1]
    out_rank = len(info.out_shapes[0])
    strategies = [replicated(2)]
    strategies += [Strategy1D(outs=(S(d),), ins=(R, S(d))) for d in range(len(idx))]
    strategies.append(Strategy1D(outs=(S(out_rank - 1),), ins=(S(1), R)))  # hidden-sharded table
    strategies.append(Strategy1D(outs=(P,), ins=(S(0), R)))  # vocab-parallel table
    return strategies


def _norm_rule(info: OpInfo, normalized_rank: int) -> list[Strategy1D]:
    x_rank = len(info.in_shapes[0])
    n_params = len(info.in_shapes) - 1
    strategies = [replicated(len(info.in_shapes), len(info.out_shapes))]
    for d in range(x_rank - normalized_rank):
        strategies.append(Strategy1D(outs=(S(d),) * len(info.out_shapes), ins=(S(d),) + (R,) * n_params))
    return strategies


@register(aten.layer_norm, aten.native_layer_norm, flops=lambda ins, outs, info: 8.0 * math.prod(ins[0]))
def layer_norm(info: OpInfo) -> list[Strategy1D]:
    return _norm_rule(info, len(info.arg(1, "normalized_shape")))


@register(aten.rms_norm, flops=lambda ins, outs, info: 5.0 * math.prod(ins[0]))
def rms_norm(info: OpInfo) -> list[Strategy1D]:
    return _norm_rule(info, len(info.arg(1, "normalized_shape")))


def _sdpa_flops(ins, outs, info: OpInfo) -> float:
    q, k = ins[0], ins[1]
    b_h = math.prod(q[:-2])
    causal = 0.5 if info.arg(5, "is_causal", False) else 1.0
    return 4.0 * b_h * q[-2] * k[-2] * q[-1] * causal  # QK^T and PV, 2 flops per multiply-add each


@register(aten.scaled_dot_product_attention, unit="attention", flops=_sdpa_flops, saves="inputs+output")
def sdpa(info: OpInfo) -> list[Strategy1D]:
    q = info.in_shapes[0]
    strategies = [replicated(len(info.in_shapes))]
    for d in range(len(q) - 2):  # batch dims and heads; never the sequence or head_dim
        ins = [S(d), S(d), S(d)]
        for mask in info.in_shapes[3:]:  # a mask broadcasts from the right against [.., s_q, s_k]
            k = d - (len(q) - len(mask))
            ins.append(S(k) if k >= 0 and mask[k] == q[d] else R)
        strategies.append(Strategy1D(outs=(S(d),), ins=tuple(ins)))
    return strategies


@register(aten.cross_entropy_loss, flops=lambda ins, outs, info: 4.0 * math.prod(ins[0]),
          unit="transcendental")  # its log_softmax: an exp and a log per logit
@register(aten.nll_loss, aten.nll_loss_forward, flops=lambda ins, outs, info: 4.0 * math.prod(ins[0]))
def cross_entropy(info: OpInfo) -> list[Strategy1D]:
    logits, target = info.in_shapes[0], info.in_shapes[1]
    n_extra = len(info.in_shapes) - 2  # class weights stay replicated
    reduction = info.arg(3, "reduction", 1)
    strategies = [replicated(len(info.in_shapes), len(info.out_shapes))]
    weighted = n_extra > 0 or info.arg(2, "weight") is not None
    smoothing = info.arg(5, "label_smoothing", 0.0) not in (0, 0.0) or len(info.node.args) > 5 and info.node.args[5]
    if len(logits) == 2 and len(target) == 1 and len(info.out_shapes) == 1 and not weighted and not smoothing:
        out = S(0) if reduction == 0 else P
        strategies.append(Strategy1D(outs=(out,), ins=(S(0), S(0)) + (R,) * n_extra))
        if packet_of(info.node.target) is aten.cross_entropy_loss:  # vocab-parallel: logits split by class
            strategies.append(Strategy1D(outs=(R,), ins=(S(1), R)))
    return strategies
