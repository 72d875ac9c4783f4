"""Matmul-like ops as einsum rules: sharding a letter shards every operand that has it; a contracted letter
leaves the output partial (P). Bias follows the output: sharded with it, replicated, or partial (added once)."""

from __future__ import annotations

import math

import torch

from autopar.strategies.base import OpInfo, Strategy1D, register, replicated
from autopar.placement import P, R, S, Placement

aten = torch.ops.aten
_BATCH = "abcdefghij"


def einsum_rule(spec: str) -> list[Strategy1D]:
    """Single-axis strategies for an einsum like 'mk,kn->mn' (no ellipsis)."""
    lhs, out = spec.replace(" ", "").split("->")
    operands = lhs.split(",")
    letters = dict.fromkeys(c for op in operands for c in op)
    strategies = [replicated(len(operands))]
    for c in letters:
        ins = tuple(S(op.index(c)) if c in op else R for op in operands)
        strategies.append(Strategy1D(outs=(S(out.index(c)) if c in out else P,), ins=ins))
    return strategies


def einsum_flops(spec: str, shapes) -> float:
    """2 · product of every letter's extent (multiply-add per point of the iteration space)."""
    lhs, _ = spec.replace(" ", "").split("->")
    size: dict[str, int] = {}
    for op, shape in zip(lhs.split(","), shapes):
        size.update(zip(op, shape))
    return 2.0 * math.prod(size.values())


def _bias_placement(out: Placement, out_rank: int, bias_rank: int) -> Placement:
    """Bias broadcasts against the output from the right."""
    if out == P:
        return P
    if out.is_shard and out.dim >= out_rank - bias_rank:
        return S(out.dim - (out_rank - bias_rank))
    return R


def _with_bias(strategies: list[Strategy1D], out_rank: int, bias_rank: int, bias_first: bool) -> list[Strategy1D]:
    result = []
    for s in strategies:
        b = _bias_placement(s.outs[0], out_rank, bias_rank)
        ins = (b,) + s.ins if bias_first else s.ins + (b,)
        result.append(Strategy1D(outs=s.outs, ins=ins))
    return result


def _linear_spec(x_rank: int) -> str:
    batch = _BATCH[: x_rank - 1]
    return f"{batch}k,nk->{batch}n"


@register(aten.linear, unit="matmul", flops=lambda ins, outs, info: einsum_flops(_linear_spec(len(ins[0])), ins[:2]))
def linear(info: OpInfo) -> list[Strategy1D]:
    spec = _linear_spec(len(info.in_shapes[0]))
    strategies = einsum_rule(spec)
    if len(info.in_shapes) == 3:
        strategies = _with_bias(strategies, len(info.out_shapes[0]), len(info.in_shapes[2]), bias_first=False)
    return strategies


@register(aten.mm, unit="matmul", flops=lambda ins, outs, info: einsum_flops("mk,kn->mn", ins))
def mm(info: OpInfo) -> list[Strategy1D]:
    return einsum_rule("mk,kn->mn")


@register(aten.addmm, unit="matmul", flops=lambda ins, outs, info: einsum_flops("mk,kn->mn", ins[1:]))
def addmm(info: OpInfo) -> list[Strategy1D]:
    return _with_bias(einsum_rule("mk,kn->mn"), 2, len(info.in_shapes[0]), bias_first=True)


@register(aten.bmm, unit="matmul", flops=lambda ins, outs, info: einsum_flops("bmk,bkn->bmn", ins))
def bmm(info: OpInfo) -> list[Strategy1D]:
    return einsum_rule("bmk,bkn->bmn")


def _matmul_spec(ra: int, rb: int, ro: int) -> str | None:
    """aten.matmul for operands of rank >= 2 whose batch dims are equal (broadcast batch dims are replicated)."""
    if ra < 2 or rb < 2:
        return None
    batch = _BATCH[: ro - 2]
    a = batch[len(batch) - (ra - 2):] + "mk"
    b = batch[len(batch) - (rb - 2):] + "kn"
    return f"{a},{b}->{batch}mn"


def _matmul_flops(ins, outs, info: OpInfo) -> float:
    k = ins[0][-1] if ins[0] else 1
    return 2.0 * math.prod(outs[0]) * k


@register(aten.matmul, unit="matmul", flops=_matmul_flops)
def matmul(info: OpInfo) -> list[Strategy1D]:
    (a, b), (o,) = info.in_shapes, info.out_shapes
    spec = _matmul_spec(len(a), len(b), len(o))
    if spec is None or any(x != y for x, y in zip(a[:-2][::-1], b[:-2][::-1])):
        return [replicated(2)]
    return einsum_rule(spec)


def _einsum_equation(info: OpInfo) -> str | None:
    eq = info.arg(0, "equation")
    if not isinstance(eq, str) or "..." in eq or "->" not in eq:
        return None
    return eq


@register(aten.einsum, unit="matmul",
          flops=lambda ins, outs, info: einsum_flops(_einsum_equation(info), ins) if _einsum_equation(info) else 2.0 * math.prod(outs[0]))
def einsum(info: OpInfo) -> list[Strategy1D]:
    eq = _einsum_equation(info)
    if eq is None:  # implicit output or ellipsis: replicated, priced at its true cost
        return [replicated(len(info.in_shapes))]
    return einsum_rule(eq)
