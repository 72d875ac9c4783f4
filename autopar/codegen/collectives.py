"""Autograd-aware collectives on one mesh axis, each the forward of a redistribution step whose backward is the
transposed redistribution (see autopar/redistribute.py for the algebra and its sources).

They are nn.Modules so the generated code names them by axis and reads like the paper's operators:
`self.comm.tp.all_gather(x, 1)`. Gradient convention: grad of S(d) is S(d), of R is R, of P is R.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from autopar.codegen.regather import remember

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = dist.get_world_size(group)
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((n * moved.shape[0],) + moved.shape[1:], dtype=x.dtype, device=x.device)
    _all_gather(out, moved, group=group)
    # Contiguous, so consumers (q, k and v of one gathered input) share it instead of each copying it for a matmul.
    # Never a view of the buffer (movedim(0, 0) is one): autograd forbids in-place ops on a view made inside a
    # custom Function's forward.
    return out if dim == 0 else out.movedim(0, dim).contiguous()


def reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = dist.get_world_size(group)
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty((moved.shape[0] // n,) + moved.shape[1:], dtype=x.dtype, device=x.device)
    _reduce_scatter(out, moved, group=group)
    return out if dim == 0 else out.movedim(0, dim).contiguous()


def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


def local_chunk(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n, r = dist.get_world_size(group), dist.get_rank(group)
    return x.chunk(n, dim)[r].contiguous()


class _AllGather(torch.autograd.Function):
    """S(d) -> R. Backward: slice the replicated gradient, or reduce-scatter it when the consumer made it partial
    (sequence parallelism's all-gather / reduce-scatter pair, Korthikanti et al. 2022)."""

    @staticmethod
    def forward(ctx, x, dim, bwd_reduce, group):
        ctx.dim, ctx.group, ctx.bwd_reduce = dim, group, bwd_reduce
        out = all_gather(x, dim, group)
        if bwd_reduce:  # a sequence-parallel gather: consumers that save it keep the shard instead (regather.py)
            remember(out, x, dim, group)
        return out

    @staticmethod
    def backward(ctx, g):
        if ctx.bwd_reduce:
            return reduce_scatter(g, ctx.dim, ctx.group), None, None, None
        return local_chunk(g, ctx.dim, ctx.group), None, None, None


class _ToShard(torch.autograd.Function):
    """Ends sharded on `dim`: the gradient (sharded too) is all-gathered back in backward."""

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.dim, ctx.group), None, None


class _Slice(_ToShard):
    """R -> S(d), no communication."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return local_chunk(x, dim, group)


class _AllReduce(torch.autograd.Function):
    """P -> R (Megatron's g). Backward: identity, the replicated gradient belongs to every addend."""

    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ReduceScatter(_ToShard):
    """P -> S(d)."""

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return reduce_scatter(x, dim, group)


class _KeepOne(torch.autograd.Function):
    """R -> P: the first rank of the axis keeps the value, the others hold zeros. Backward: identity."""

    @staticmethod
    def forward(ctx, x, group):
        return x.clone() if dist.get_rank(group) == 0 else torch.zeros_like(x)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GradAllReduce(torch.autograd.Function):
    """Identity forward, all-reduce backward (Megatron's f): the consumer split its work on this axis, so the
    replicated input's gradient comes back partial."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return all_reduce(g, ctx.group), None


class Collective(nn.Module):
    """One step's operator bound to one axis's process group, so generated code can call it by name."""

    def __init__(self, fn: type[torch.autograd.Function], group):
        super().__init__()
        self.fn, self.group = fn, group

    def forward(self, x: torch.Tensor, *args):
        return self.fn.apply(x, *args, self.group)

    def extra_repr(self) -> str:
        return self.fn.__name__.lstrip("_")


class VocabParallelCrossEntropy(nn.Module):
    """Per-row cross-entropy from logits whose classes are split over the axis, without gathering them (Megatron's
    vocab-parallel cross-entropy, Shoeybi et al. 2019 Sec. 3): the row maximum, the sum of exponentials and the
    target's logit are all-reduced ([rows] values each); the loss comes out whole on every rank. Backward flows
    through the sum all-reduces as identities, giving each rank its slice of softmax - onehot."""

    def __init__(self, group):
        super().__init__()
        self.group = group

    def forward(self, logits: torch.Tensor, target: torch.Tensor, start: int) -> torch.Tensor:
        with torch.no_grad():  # any shift is exact; the maximum keeps exp() in range
            shift = logits.max(dim=-1).values
            dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=self.group)
        z = logits - shift.unsqueeze(-1)
        sum_exp = _AllReduce.apply(z.exp().sum(-1), self.group)
        local = target - start
        inside = (local >= 0) & (local < logits.shape[-1])
        picked = z.gather(-1, local.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
        picked = _AllReduce.apply(picked * inside, self.group)
        return sum_exp.log() - picked


OPERATORS = {"all_gather": _AllGather, "slice": _Slice, "all_reduce": _AllReduce, "reduce_scatter": _ReduceScatter,
             "keep_one": _KeepOne, "grad_all_reduce": _GradAllReduce}


class AxisComm(nn.Module):
    """The collectives of one mesh axis: `comm.tp.all_gather(x, dim, bwd_reduce_scatter)`, `comm.tp.slice(x, dim)`,
    `comm.tp.all_reduce(x)`, `comm.tp.reduce_scatter(x, dim)`, `comm.tp.keep_one(x)`, `comm.tp.grad_all_reduce(x)`."""

    def __init__(self, axis: str, group):
        super().__init__()
        self.axis, self.group = axis, group
        for name, fn in OPERATORS.items():
            self.add_module(name, Collective(fn, group))
        self.cross_entropy = VocabParallelCrossEntropy(group)

    def extra_repr(self) -> str:
        return f"axis={self.axis}, size={dist.get_world_size(self.group)}"
