"""Scans along one dim (cumsum, cumprod, diff): every output element depends on the whole scanned dim, so that dim
stays whole; every other dim is independent and shards through. cumsum and diff are linear (a prefix sum or a
difference of partial sums is the partial sum of prefix sums or differences), so they also map P -> P."""

from __future__ import annotations

import torch

from autopar.placement import S
from autopar.strategies.base import OpInfo, Strategy1D, linear_partial, register, replicated

aten = torch.ops.aten


def scan_strategies(info: OpInfo, along: int, linear: bool) -> list[Strategy1D]:
    """Shard any dim but `along`, on every tensor input alike (diff's prepend/append match the input off `along`)."""
    n = len(info.in_shapes)
    rank = len(info.in_shapes[0])
    strategies = [replicated(n)]
    strategies += [Strategy1D(outs=(S(d),), ins=(S(d),) * n) for d in range(rank) if d != along]
    if linear:
        strategies.append(linear_partial(n, range(n)))
    return strategies


def _dim(info: OpInfo, index: int, name: str, default: int | None = None) -> int:
    rank = len(info.in_shapes[0])
    return info.arg(index, name, default) % max(rank, 1)


@register(aten.cumsum, saves="none")
def cumsum(info: OpInfo) -> list[Strategy1D]:
    return scan_strategies(info, _dim(info, 1, "dim"), linear=True)


@register(aten.cumprod)
def cumprod(info: OpInfo) -> list[Strategy1D]:
    return scan_strategies(info, _dim(info, 1, "dim"), linear=False)


@register(aten.diff, saves="none")
def diff(info: OpInfo) -> list[Strategy1D]:
    return scan_strategies(info, _dim(info, 2, "dim", -1), linear=True)
