"""Pointwise ops with broadcasting: sharding an output dim shards every input that has that dim at full size;
inputs that broadcast along it stay replicated. Ops linear in their tensor inputs also map P → P."""

from __future__ import annotations

import torch

from autopar.placement import R, S
from autopar.strategies.base import OpInfo, Strategy1D, linear_partial, packet_of, register, replicated

aten = torch.ops.aten

# Unary ops that are not linear (f(a+b) != f(a)+f(b)): only sharding carries through. The transcendental ones
# evaluate exp, log or sin (exp-like), tanh, or erf (GELU, exact unless approximate="tanh") per element, priced
# at the hardware's rate for that family where it has one.
TRANSCENDENTAL = [aten.silu, aten.sigmoid, aten.exp, aten.log, aten.sin, aten.cos, aten.softplus]
ERF = [aten.gelu, aten.erf]
UNARY = [
    aten.relu, aten.rsqrt, aten.sqrt, aten.pow, aten.abs, aten.reciprocal, aten.square,
    aten.logical_not, aten.bitwise_not, aten.isnan, aten.isinf, aten.tril, aten.triu,
]
# Dropout draws a mask per rank: never on partial sums (the addends would get different masks). Its backward
# needs only the mask (1 byte per element; Korthikanti et al. 2022 Sec. 4.1).
DROPOUT = [aten.dropout, aten.native_dropout]
# Unary ops that are linear in their input (neg is linear; copies and casts keep sums).
LINEAR_UNARY = [
    aten.neg, aten.clone, aten.contiguous, aten.alias, aten.detach, aten._to_copy,
    aten.to, aten.type_as, aten.lift_fresh_copy,
]
# Binary ops: add/sub are linear in both operands together; mul/div only in one operand with the other fixed.
ADDITIVE = [aten.add, aten.sub]
SCALING = [aten.mul, aten.div]
# Selection keeps only its boolean condition for backward (the gradient is routed by it, not by the values).
SELECT = [aten.where, aten.masked_fill]
COMPARE_OR_SELECT = [aten.eq, aten.ne, aten.lt, aten.le, aten.gt, aten.ge,
                     aten.maximum, aten.minimum, aten.clamp, aten.bitwise_and, aten.bitwise_or, aten.logical_and,
                     # boolean mask algebra (`a & b` on tensors is aten.__and__, as in HF's attention masks)
                     aten.__and__, aten.__or__, aten.__xor__, aten.bitwise_xor, aten.logical_or, aten.logical_xor]

# tril/triu mask by absolute position: sharding the last two dims would shift the diagonal.
_POSITIONAL = {aten.tril, aten.triu}


def broadcast_shards(info: OpInfo, skip_dims: int = 0) -> list[Strategy1D]:
    """For each output dim: shard it, and shard each input dim aligned to it from the right unless it broadcasts."""
    (out,) = info.out_shapes[:1]
    n_outs = len(info.out_shapes)
    strategies = [replicated(len(info.in_shapes), n_outs)]
    for d in range(len(out) - skip_dims):
        ins = []
        for shape in info.in_shapes:
            k = d - (len(out) - len(shape))
            ins.append(S(k) if k >= 0 and shape[k] == out[d] else R)
        strategies.append(Strategy1D(outs=(S(d),) * n_outs, ins=tuple(ins)))
    return strategies


def _scalar_args(info: OpInfo) -> bool:
    """True if a non-tensor number takes part (x + 1e-5 is not linear in a partial x)."""
    return any(isinstance(a, (int, float)) and not isinstance(a, bool) for a in info.node.args[1:2])


@register(*DROPOUT, saves="mask")
@register(*TRANSCENDENTAL, unit="transcendental")
@register(*ERF, unit="transcendental", special="erf")
@register(aten.tanh, unit="transcendental", special="tanh")
@register(*UNARY)
def unary(info: OpInfo) -> list[Strategy1D]:
    skip = 2 if packet_of(info.node.target) in _POSITIONAL else 0
    return broadcast_shards(info, skip)


@register(*LINEAR_UNARY, saves="none")
def linear_unary(info: OpInfo) -> list[Strategy1D]:
    n_outs = len(info.out_shapes)
    extra = [linear_partial(len(info.in_shapes), [0], n_outs)] if len(info.in_shapes) == 1 else []
    return broadcast_shards(info) + extra


@register(*ADDITIVE, saves="none")  # the gradient of a sum needs no saved tensor
def additive(info: OpInfo) -> list[Strategy1D]:
    n = len(info.in_shapes)
    extra = [linear_partial(n, range(n))] if not _scalar_args(info) and "alpha" not in info.node.kwargs else []
    return broadcast_shards(info) + extra


@register(*SCALING, saves="others")  # d(a*b)/da = b: each operand is kept for the other's gradient
def scaling(info: OpInfo) -> list[Strategy1D]:
    n = len(info.in_shapes)
    extra = [linear_partial(n, [0])]  # (a1 + a2) * b = a1*b + a2*b, also for a python scalar b
    if n == 2 and packet_of(info.node.target) is torch.ops.aten.mul:
        extra.append(linear_partial(n, [1]))
    return broadcast_shards(info) + extra


@register(*SELECT, saves="none")
@register(*COMPARE_OR_SELECT)
def compare_or_select(info: OpInfo) -> list[Strategy1D]:
    return broadcast_shards(info)
