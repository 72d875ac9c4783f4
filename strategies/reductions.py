"""Reductions: a sharded reduced dim leaves a partial result (sum is linear; mean is a sum scaled by the global
count, which the lowering applies); a sharded kept dim stays sharded. Softmax-like ops normalise along one dim,
which therefore must stay whole."""

from __future__ import annotations

import torch

from autopar.placement import P, S
from autopar.strategies.base import OpInfo, Strategy1D, linear_partial, register, replicated

aten = torch.ops.aten


def reduced_dims(info: OpInfo) -> list[int] | None:
    """Dims reduced by sum/mean/amax (None means all)."""
    dims = info.arg(1, "dim")
    rank = len(info.in_shapes[0])
    if dims is None or dims == [] or dims == ():
        return None
    dims = [dims] if isinstance(dims, int) else list(dims)
    return sorted(d % rank for d in dims) if rank else []


def keepdim(info: OpInfo) -> bool:
    return bool(info.arg(2, "keepdim", False))


def reduction_strategies(info: OpInfo, partial_ok: bool) -> list[Strategy1D]:
    rank = len(info.in_shapes[0])
    dims = reduced_dims(info)
    dims = list(range(rank)) if dims is None else dims
    strategies = [replicated(1)]
    for d in range(rank):
        if d in dims:
            if partial_ok:
                strategies.append(Strategy1D(outs=(P,), ins=(S(d),)))
            continue
        out_d = d if keepdim(info) else d - sum(1 for r in dims if r < d)
        strategies.append(Strategy1D(outs=(S(out_d),), ins=(S(d),)))
    if partial_ok:
        strategies.append(linear_partial(1, [0]))
    return strategies


def _reduce_flops(ins, outs, info) -> float:
    return float(torch.Size(ins[0]).numel())


@register(aten.sum, aten.mean, flops=_reduce_flops, saves="none")
def sum_mean(info: OpInfo) -> list[Strategy1D]:
    return reduction_strategies(info, partial_ok=True)


@register(aten.amax, aten.amin, aten.max, aten.min, aten.argmax, aten.argmin, aten.var, aten.std, flops=_reduce_flops)
def max_like(info: OpInfo) -> list[Strategy1D]:
    if len(info.out_shapes) != 1:
        return [replicated(len(info.in_shapes), len(info.out_shapes))]
    return reduction_strategies(info, partial_ok=False)


def _softmax_dim(info: OpInfo) -> int:
    return info.arg(1, "dim") % len(info.in_shapes[0])


@register(aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax,
          flops=lambda ins, outs, info: 5.0 * torch.Size(outs[0]).numel(), saves="output", unit="transcendental")
def softmax(info: OpInfo) -> list[Strategy1D]:
    keep = _softmax_dim(info)
    strategies = [replicated(1)]
    for d in range(len(info.in_shapes[0])):
        if d != keep:
            strategies.append(Strategy1D(outs=(S(d),), ins=(S(d),)))
    return strategies
