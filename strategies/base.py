"""The rule framework: how an op rule is declared and how it becomes N-axis strategies.

A rule is written for ONE mesh axis (like DTensor's single-dim strategies): it lists the legal ways to place the
op's tensor inputs and outputs on a single axis. `expand` turns that into strategies over every axis of the mesh by
taking one single-axis choice per axis and dropping combinations that shard a tensor dim twice or that do not
divide a dim evenly. Degree-1 axes are always `R`.

Tensor inputs are the fx.Node arguments of a node in the order torch.fx visits them (args, then kwargs; lists
flattened; duplicates kept), see `tensor_inputs`.
"""

from __future__ import annotations

import functools
import itertools
import operator
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.fx as fx

from autopar.placement import P, R, Placement

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Strategy1D:
    """One legal single-axis placement of an op's outputs and tensor inputs."""

    outs: tuple[Placement, ...]  # one per output tensor (a single-output op has one)
    ins: tuple[Placement, ...]  # one per tensor input


@dataclass(frozen=True)
class Strategy:
    """An N-axis strategy: placements per tensor per axis (axis order = mesh order)."""

    outs: tuple[tuple[Placement, ...], ...]  # outs[i][axis]
    ins: tuple[tuple[Placement, ...], ...]  # ins[j][axis]

    def splits(self, axis: int) -> bool:
        """True if the op's work is divided on `axis` (any tensor sharded or partial there)."""
        return any(t[axis] != R for t in self.outs + self.ins)


@dataclass(frozen=True)
class OpInfo:
    """What a rule sees of a node: shapes of its tensor inputs and outputs, and its non-tensor arguments."""

    node: fx.Node
    in_shapes: tuple[Shape, ...]
    out_shapes: tuple[Shape, ...]
    in_dtypes: tuple[torch.dtype, ...]
    out_dtypes: tuple[torch.dtype, ...]

    @property
    def args(self) -> tuple:
        return self.node.args

    def arg(self, index: int, name: str, default=None):
        """Positional-or-keyword argument of the aten schema."""
        if index < len(self.node.args):
            return self.node.args[index]
        return self.node.kwargs.get(name, default)


RuleFn = Callable[[OpInfo], list[Strategy1D]]
FlopFn = Callable[[Sequence[Shape], Sequence[Shape], OpInfo], float]


@dataclass(frozen=True)
class OpRule:
    strategies: RuleFn
    flops: FlopFn  # FLOPs of the forward op evaluated on the given (local) shapes
    unit: str = "vector"  # what bounds it (cost_models/compute.py UNITS): "matmul", "attention", "transcendental"
    # (one evaluation per element of its first input, of `special`: "exp"-like, "tanh" or "erf"), or "vector"
    special: str = "exp"
    saves: str = "inputs"  # kept for backward: "inputs" (consumed activations), "output", "inputs+output", "mask"
    # (dropout's boolean mask), "others" (an input only when another input needs a gradient: mul), "none"

    @property
    def is_matmul(self) -> bool:
        return self.unit in ("matmul", "attention")

    def transcendentals(self, ins: Sequence[Shape]) -> float:
        return float(numel(ins[0])) if self.unit == "transcendental" and ins else 0.0

    def family(self, info: OpInfo) -> str:
        """What the op evaluates (cost_models/compute.py FAMILIES); GELU's tanh approximation evaluates tanh."""
        if self.special == "erf" and info.arg(1, "approximate", "none") == "tanh":
            return "tanh"
        return self.special

    @property
    def moves_no_data(self) -> bool:
        """Views and other free ops: no FLOPs, no bytes, nothing saved."""
        return self.flops is no_flops


RULES: dict[object, OpRule] = {}


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def elementwise_flops(ins: Sequence[Shape], outs: Sequence[Shape], info: OpInfo) -> float:
    return float(sum(numel(s) for s in outs))


def no_flops(ins: Sequence[Shape], outs: Sequence[Shape], info: OpInfo) -> float:
    return 0.0


def register(*ops, flops: FlopFn = elementwise_flops, unit: str = "vector", saves: str = "inputs",
             special: str = "exp"):
    """Decorator: register a single-axis rule for aten ops (OpOverloadPacket covers every overload)."""

    def wrap(fn: RuleFn) -> RuleFn:
        for op in ops:
            RULES[op] = OpRule(fn, flops, unit=unit, saves=saves, special=special)
        return fn

    return wrap


# Python operators that reach a graph as call targets (fx symbolic tracing, `operator.getitem` on multi-output
# ops, arithmetic some exporters leave on tensors) are the aten op they dispatch to on tensors.
BUILTIN_OPS = {operator.add: torch.ops.aten.add, operator.sub: torch.ops.aten.sub, operator.mul: torch.ops.aten.mul,
               operator.truediv: torch.ops.aten.div, operator.neg: torch.ops.aten.neg,
               operator.pow: torch.ops.aten.pow, operator.and_: torch.ops.aten.__and__,
               operator.or_: torch.ops.aten.__or__, operator.xor: torch.ops.aten.__xor__,
               operator.eq: torch.ops.aten.eq, operator.ne: torch.ops.aten.ne, operator.lt: torch.ops.aten.lt,
               operator.le: torch.ops.aten.le, operator.gt: torch.ops.aten.gt, operator.ge: torch.ops.aten.ge,
               operator.matmul: torch.ops.aten.matmul, operator.invert: torch.ops.aten.bitwise_not}


def packet_of(target) -> object:
    """What rules and lowerings are keyed by: an aten overload's packet (`aten.mul` for `aten.mul.Tensor`), the
    aten op a Python operator dispatches to, or the target itself (`operator.getitem`, any other callable)."""
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return packet
    return BUILTIN_OPS.get(target, target) if _hashable(target) else target


def op_name(target) -> str:
    """A readable name for any call target: 'transpose', 'getitem', 'add'."""
    packet = packet_of(target)
    return getattr(packet, "__name__", None) or str(packet)


def rule_for(target) -> OpRule | None:
    packet = packet_of(target)
    return RULES.get(target if packet is target else packet) if _hashable(target) else None


def _hashable(target) -> bool:
    try:
        hash(target)
    except TypeError:
        return False
    return True


def tensor_values(node: fx.Node) -> list[torch.Tensor]:
    """The fake tensors a node produces: one, several (split, unbind), or none (symbolic ints, output)."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (list, tuple)):
        return [v for v in val if isinstance(v, torch.Tensor)]
    return []


def tensor_inputs(node: fx.Node) -> list[tuple[fx.Node, int]]:
    """(producer, output index) per tensor input; getitem reads one output of a multi-output producer."""
    if node.target is operator.getitem:
        return [(node.args[0], int(node.args[1]))]
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return [(n, 0) for n in found if tensor_values(n)]


def replicated(n_ins: int, n_outs: int = 1) -> Strategy1D:
    return Strategy1D(outs=(R,) * n_outs, ins=(R,) * n_ins)


def expand(rules1d: Sequence[Strategy1D], degrees: Sequence[int], info: OpInfo) -> list[Strategy]:
    """All N-axis strategies: one single-axis choice per axis of degree > 1, legal for every tensor."""
    return list(_expand(tuple(rules1d), tuple(degrees), tuple(info.out_shapes), tuple(info.in_shapes)))


@functools.lru_cache(maxsize=1 << 14)
def _expand(rules1d: tuple[Strategy1D, ...], degrees: tuple[int, ...], out_shapes: tuple[Shape, ...],
            in_shapes: tuple[Shape, ...]) -> tuple[Strategy, ...]:
    """expand by what it depends on, cached: the planner builds a graph per mesh and micro-step batch, and the
    nodes of repeated blocks, the parameters, and every graph of the same shapes ask again."""
    n_outs, n_ins = len(out_shapes), len(in_shapes)
    base = replicated(n_ins, n_outs)
    per_axis = [list(dict.fromkeys(rules1d)) if d > 1 else [base] for d in degrees]
    shapes = out_shapes + in_shapes
    out: list[Strategy] = []
    for combo in itertools.product(*per_axis):
        tensors = [tuple(c.outs[i] for c in combo) for i in range(n_outs)]
        tensors += [tuple(c.ins[j] for c in combo) for j in range(n_ins)]
        if all(_legal(t, s, degrees) for t, s in zip(tensors, shapes)):
            out.append(Strategy(outs=tuple(tensors[:n_outs]), ins=tuple(tensors[n_outs:])))
    return tuple(out)


def _legal(placements: Sequence[Placement], shape: Shape, degrees: Sequence[int]) -> bool:
    seen: set[int] = set()
    for p, d in zip(placements, degrees):
        if not p.is_shard:
            continue
        if p.dim in seen or p.dim >= len(shape) or shape[p.dim] % d != 0:
            return False
        seen.add(p.dim)
    return True


def linear_partial(n_ins: int, partial_inputs: Sequence[int], n_outs: int = 1) -> Strategy1D:
    """P in → P out for ops linear in the given inputs (the others replicated)."""
    ins = tuple(P if j in partial_inputs else R for j in range(n_ins))
    return Strategy1D(outs=(P,) * n_outs, ins=ins)


def grad_partial_axes(strategy: Strategy, input_index: int) -> list[int]:
    """Axes on which the gradient of a replicated input comes out as a partial sum.

    When the op's work is divided on an axis, each rank sees only its part of the iteration space; a replicated
    input that takes part in all of it (a weight under a batch-sharded matmul, x under a column-parallel linear)
    gets from each rank only that rank's contribution. Those gradients need an all-reduce on that axis in backward
    (Megatron's f operator; for parameters along the batch axis this is data-parallel gradient synchronisation).
    """
    ins = strategy.ins[input_index]
    return [a for a, p in enumerate(ins) if p == R and strategy.splits(a)]
