"""View-like ops as dim maps: a sharded input dim carries over to the output dim it becomes. A reshape keeps a
shard only on the outermost (non-unit) dim of each merged or split group, where the shard stays one contiguous
block. Views move no data, so P passes through; they cost nothing and save nothing."""

from __future__ import annotations

import operator
from typing import Sequence

import torch

from autopar.placement import S
from autopar.strategies.base import OpInfo, Strategy1D, linear_partial, no_flops, packet_of, register, replicated

aten = torch.ops.aten


def view_groups(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Split two shapes of equal numel into aligned groups of dims with equal products."""
    groups, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        ga, gb, pa, pb = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                ga.append(i); pa *= a[i]; i += 1
            elif j < len(b):
                gb.append(j); pb *= b[j]; j += 1
            else:
                break
        groups.append((ga, gb))
    return groups


def reshape_dim_map(a: Sequence[int], b: Sequence[int]) -> dict[int, int]:
    """Input dim -> output dim for shards a reshape preserves."""
    mapping = {}
    for ga, gb in view_groups(a, b):
        first_a = next((d for d in ga if a[d] != 1), None)
        first_b = next((d for d in gb if b[d] != 1), None)
        if first_a is not None and first_b is not None:
            mapping[first_a] = first_b
    return mapping


def dim_map_strategies(mapping: dict[int, int], n_outs: int = 1) -> list[Strategy1D]:
    strategies = [replicated(1, n_outs), linear_partial(1, [0], n_outs)]
    strategies += [Strategy1D(outs=(S(o),) * n_outs, ins=(S(i),)) for i, o in mapping.items()]
    return strategies


def _view_info_strategies(info: OpInfo) -> list[Strategy1D]:
    return dim_map_strategies(reshape_dim_map(info.in_shapes[0], info.out_shapes[0]))


register(aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten,
         flops=no_flops, saves="none")(_view_info_strategies)


@register(aten.transpose, aten.t, aten.permute, aten.numpy_T, flops=no_flops, saves="none")
def permute(info: OpInfo) -> list[Strategy1D]:
    rank = len(info.in_shapes[0])
    target = packet_of(info.node.target)
    if target is aten.permute:
        order = [d % rank for d in info.arg(1, "dims")]
    else:
        order = list(range(rank))
        if target is aten.transpose:
            d0, d1 = info.arg(1, "dim0") % rank, info.arg(2, "dim1") % rank
        else:
            d0, d1 = 0, max(rank - 1, 0)
        order[d0], order[d1] = order[d1], order[d0]
    return dim_map_strategies({src: dst for dst, src in enumerate(order)})


@register(aten.unsqueeze, aten.squeeze, flops=no_flops, saves="none")
def squeeze_unsqueeze(info: OpInfo) -> list[Strategy1D]:
    return _view_info_strategies(info)


@register(aten.expand, flops=no_flops, saves="none")
def expand(info: OpInfo) -> list[Strategy1D]:
    a, b = info.in_shapes[0], info.out_shapes[0]
    offset = len(b) - len(a)
    return dim_map_strategies({d: d + offset for d in range(len(a)) if a[d] == b[d + offset] and a[d] != 1})


def _split_dim(info: OpInfo, default_index: int) -> int:
    dim = info.arg(default_index, "dim", 0)
    return dim % len(info.in_shapes[0])


@register(aten.split, aten.split_with_sizes, aten.chunk, aten.unbind, flops=no_flops, saves="none")
def split(info: OpInfo) -> list[Strategy1D]:
    target = packet_of(info.node.target)
    rank = len(info.in_shapes[0])
    along = _split_dim(info, 1 if target is aten.unbind else 2)
    shift = 1 if target is aten.unbind else 0  # unbind drops the dim
    mapping = {d: d - (shift if d > along else 0) for d in range(rank) if d != along}
    return dim_map_strategies(mapping, n_outs=len(info.out_shapes))


@register(aten.slice, aten.narrow, flops=no_flops, saves="none")
def slice_(info: OpInfo) -> list[Strategy1D]:
    along = _split_dim(info, 1)
    return dim_map_strategies({d: d for d in range(len(info.in_shapes[0])) if d != along})


@register(aten.select, flops=no_flops, saves="none")
def select(info: OpInfo) -> list[Strategy1D]:
    along = _split_dim(info, 1)
    rank = len(info.in_shapes[0])
    return dim_map_strategies({d: d - (1 if d > along else 0) for d in range(rank) if d != along})


@register(aten.cat, aten.stack, flops=no_flops, saves="none")  # the gradient is slices of the output's: no saved tensor
def cat(info: OpInfo) -> list[Strategy1D]:
    n = len(info.in_shapes)
    rank = len(info.in_shapes[0])
    along = info.arg(1, "dim", 0) % (rank + (1 if packet_of(info.node.target) is aten.stack else 0))
    stack = packet_of(info.node.target) is aten.stack
    strategies = [replicated(n), linear_partial(n, range(n))]
    for d in range(rank):
        if d == along and not stack:
            continue
        out_d = d + 1 if stack and d >= along else d
        strategies.append(Strategy1D(outs=(S(out_d),), ins=(S(d),) * n))
    return strategies


def getitem_strategies(info: OpInfo) -> list[Strategy1D]:
    """operator.getitem on a multi-output op: the chosen output passes through unchanged."""
    rank = len(info.out_shapes[0])
    return dim_map_strategies({d: d for d in range(rank)})


register(operator.getitem, flops=no_flops, saves="none")(getitem_strategies)
