"""Tensor factories (arange, zeros, full, ...) have no tensor inputs: every rank builds the whole tensor (R);
consumers that need a shard take it locally, which costs no communication."""

from __future__ import annotations

import torch

from autopar.strategies.base import OpInfo, Strategy1D, register, replicated

aten = torch.ops.aten


@register(aten.arange, aten.zeros, aten.ones, aten.full, aten.empty, aten.scalar_tensor, aten.zeros_like,
          aten.ones_like, aten.full_like, aten.empty_like, aten.rand, aten.randn, aten.ones_like,
          saves="none")
def factory(info: OpInfo) -> list[Strategy1D]:
    return [replicated(len(info.in_shapes), len(info.out_shapes))]
