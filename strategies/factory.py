"""Tensor factories (arange, zeros, full, ...) have no tensor inputs: every rank builds the whole tensor (R);
consumers that need a shard take it locally, which costs no communication. `x.new_ones(size)` and friends read
only x's dtype and device, never its values or shape, so x may come in any placement: no move is ever needed."""

from __future__ import annotations

import torch

from autopar.placement import P, R, S
from autopar.strategies.base import OpInfo, Strategy1D, register, replicated

aten = torch.ops.aten


@register(aten.arange, aten.zeros, aten.ones, aten.full, aten.empty, aten.scalar_tensor, aten.zeros_like,
          aten.ones_like, aten.full_like, aten.empty_like, aten.rand, aten.randn, aten.ones_like,
          saves="none")
def factory(info: OpInfo) -> list[Strategy1D]:
    return [replicated(len(info.in_shapes), len(info.out_shapes))]


@register(aten.new_ones, aten.new_zeros, aten.new_full, aten.new_empty, saves="none")
def new_like(info: OpInfo) -> list[Strategy1D]:
    rank = len(info.in_shapes[0])
    return [Strategy1D(outs=(R,), ins=(placement,)) for placement in (R, P, *(S(d) for d in range(rank)))]
