"""Local lowerings: how an op runs on local shards when its strategy changes what the op must compute.

Most ops run unchanged on their shards. The exceptions, keyed by op:
- shape-taking views (view/reshape/expand/flatten/unflatten): the shape argument becomes the local shape;
- embedding with a vocab-sharded table (Megatron's vocab-parallel embedding, Shoeybi et al. 2019 Sec. 3):
  look up the local rows, zero the rest, the output is a partial sum;
- mean over a sharded dim: the local mean scaled by the shard count is this rank's addend of the global mean;
- cross_entropy_loss with sharded rows and mean reduction: the local sum over the global count of counted rows;
  with sharded classes: Megatron's vocab-parallel cross-entropy (collectives.VocabParallelCrossEntropy).
A lowering receives the emitter, the planning node, its strategy and the local args, and returns the fx value.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from autopar.placement import local_shape
from autopar.strategies import packet_of

aten = torch.ops.aten
LOWERINGS: dict[object, Callable] = {}


def lowering(*ops):
    def wrap(fn):
        for op in ops:
            LOWERINGS[op] = fn
        return fn

    return wrap


def _local_out_shape(em, p, strategy) -> list[int]:
    return list(local_shape(p.info.out_shapes[0], strategy.outs[0], em.degrees))


@lowering(aten.view, aten.reshape, aten._unsafe_view)
def view(em, p, strategy, args, kwargs):
    return em.g.call_function(p.node.target, (args[0], _local_out_shape(em, p, strategy)))


@lowering(aten.flatten, aten.unflatten)
def flatten(em, p, strategy, args, kwargs):
    return em.g.call_function(aten.reshape.default, (args[0], _local_out_shape(em, p, strategy)))


@lowering(aten.expand)
def expand(em, p, strategy, args, kwargs):
    return em.g.call_function(p.node.target, (args[0], _local_out_shape(em, p, strategy)), kwargs)


def vocab_parallel_embedding(weight: torch.Tensor, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Rows [start, start + len(weight)) live here; other ids contribute zeros to the partial sum."""
    local = ids - start
    outside = (local < 0) | (local >= weight.shape[0])
    out = torch.nn.functional.embedding(local.masked_fill(outside, 0), weight)
    return out.masked_fill(outside.unsqueeze(-1), 0.0)


@lowering(aten.embedding)
def embedding(em, p, strategy, args, kwargs):
    axes = [a for a, pl in enumerate(strategy.ins[0]) if pl.is_shard and pl.dim == 0]
    if not axes:
        return em.g.call_function(p.node.target, args, kwargs)
    (axis,) = axes  # a tensor dim is sharded on at most one axis
    rows = p.info.in_shapes[0][0] // em.degrees[axis]
    return em.g.call_function(vocab_parallel_embedding, (args[0], args[1], em.coords[axis] * rows))


@lowering(aten.mean)
def mean(em, p, strategy, args, kwargs):
    out = em.g.call_function(p.node.target, args, kwargs)
    rank = len(p.info.in_shapes[0])
    dims = p.node.args[1] if len(p.node.args) > 1 and p.node.args[1] is not None else list(range(rank))
    dims = {d % rank for d in ([dims] if isinstance(dims, int) else dims)} if rank else set()
    k = math.prod(em.degrees[a] for a, pl in enumerate(strategy.ins[0]) if pl.is_shard and pl.dim in dims)
    return out if k == 1 else em.g.call_function(aten.mul.Tensor, (out, 1.0 / k))


@lowering(aten.cross_entropy_loss, aten.nll_loss)
def cross_entropy(em, p, strategy, args, kwargs):
    rows = [a for a, pl in enumerate(strategy.ins[0]) if pl.is_shard and pl.dim == 0]
    classes = [a for a, pl in enumerate(strategy.ins[0]) if pl.is_shard and pl.dim == 1]
    reduction = p.node.args[3] if len(p.node.args) > 3 else p.node.kwargs.get("reduction", 1)
    if not classes and (not rows or reduction != 1):
        return em.g.call_function(p.node.target, args, kwargs)
    ignore = p.node.args[4] if len(p.node.args) > 4 else p.node.kwargs.get("ignore_index", -100)
    logits, target = args[0], args[1]
    g = em.g
    counted = g.call_function(aten.ne.Scalar, (target, ignore))
    if classes:  # per-row losses from class-sharded logits, whole on that axis
        (axis,) = classes
        width = p.info.in_shapes[0][1] // em.degrees[axis]
        per_row = g.call_module(f"comm.{em.axis_names[axis]}.cross_entropy",
                                (logits, target, em.coords[axis] * width))
        per_row = g.call_function(aten.mul.Tensor, (per_row, counted))
        if reduction == 0:
            return per_row
        total = g.call_function(aten.sum.default, (per_row,))
    else:
        smoothing = (0.0,) if packet_of(p.node.target) is aten.cross_entropy_loss else ()
        total = g.call_function(p.node.target, (logits, target, None, 2, ignore) + smoothing)  # 2 = sum
    if reduction == 2:
        return total
    count = g.call_function(aten.sum.dim_IntList, (counted, [0]), {"dtype": p.info.out_dtypes[0]})
    for axis in rows:  # the mean's denominator counts the rows of every shard
        count = g.call_module(f"comm.{em.axis_names[axis]}.all_reduce", (count,))
    return g.call_function(aten.div.Tensor, (total, count))
