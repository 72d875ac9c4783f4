"""A planning trace at a new batch size without tracing again.

The search needs the two-block proxy (proxy.py) at many micro-step batches: one per micro-batch count it prices,
and pipeline meshes of every dp. torch.export takes ~0.1 s per block each time, and the graphs differ only in the
integers that follow the batch. `Rebatching` traces two batch sizes for real and derives any other from them:
aligned node by node, every integer (a shape or stride of a traced value, a size in an op's arguments) is either the
same in both traces (it does not depend on the batch) or in the ratio of the two batches (it is proportional to
it), and is then written for the new batch. A graph with any other integer (a batch-dependent slice such as
`x[: len(x) // 2 + 1]`), a different op sequence or a float that moves is traced for real instead.

Only the planner sees these graphs: values are meta tensors with the derived shapes and strides, and
`Captured.program` stays the first trace's. The chosen plan is mapped onto a real trace of the full model, which
checks every node's shapes against the proxy's (search.py `_by_position`) and solves again where one differs.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from autopar.capture import Captured


class NotDerivable(Exception):
    """The two traces differ by more than the batch's integers."""


class Rebatching:
    """`trace(batch)` like `capture` at that batch, cached; from the third batch size on, derived (see above)."""

    def __init__(self, capture: Callable[[int], Captured]) -> None:
        self.capture = capture
        self.cache: dict[int, Captured] = {}
        self.derived = 0  # how many traces were derived rather than taken

    def __call__(self, batch: int) -> Captured:
        if batch not in self.cache:
            self.cache[batch] = self._derive(batch) or self.capture(batch)
        return self.cache[batch]

    def _derive(self, batch: int) -> Captured | None:
        real = [b for b, c in self.cache.items() if not c.__dict__.get("_derived")]
        if len(real) < 2:
            return None
        (b1, one), (b2, two) = (real[0], self.cache[real[0]]), (real[1], self.cache[real[1]])
        try:
            out = rebatched(one, two, b1, b2, batch)
        except NotDerivable:
            return None
        out.__dict__["_derived"] = True
        self.derived += 1
        return out


def rebatched(one: Captured, two: Captured, b1: int, b2: int, batch: int) -> Captured:
    """The capture at `batch` from captures of the same model at b1 != b2; NotDerivable where it cannot be."""
    nodes1, nodes2 = list(one.graph.nodes), list(two.graph.nodes)
    if len(nodes1) != len(nodes2) or one.user_inputs != two.user_inputs:
        raise NotDerivable("different graphs")

    def scale(x: int, y: int) -> int:
        if x == y:
            return x
        if x * b2 == y * b1 and (x * batch) % b1 == 0:
            return x * batch // b1
        raise NotDerivable(f"{x} at batch {b1}, {y} at batch {b2}")

    graph, env = fx.Graph(), {}

    def arg(x, y):
        if isinstance(x, fx.Node):
            if not isinstance(y, fx.Node) or x.name != y.name:
                raise NotDerivable("different wiring")
            return env[x]
        if isinstance(x, (list, tuple)):
            if type(x) is not type(y) or len(x) != len(y):
                raise NotDerivable("different arguments")
            return type(x)(arg(a, b) for a, b in zip(x, y))
        if isinstance(x, dict):
            if x.keys() != y.keys():
                raise NotDerivable("different keyword arguments")
            return {k: arg(x[k], y[k]) for k in x}
        if isinstance(x, int) and not isinstance(x, bool) and isinstance(y, int):
            return scale(x, y)
        if x != y and not (x is y):
            raise NotDerivable(f"argument {x!r} vs {y!r}")
        return x

    def value(x, y):
        if isinstance(x, torch.Tensor):
            if not isinstance(y, torch.Tensor) or x.dim() != y.dim() or x.dtype != y.dtype:
                raise NotDerivable("different values")
            shape = [scale(a, b) for a, b in zip(x.shape, y.shape)]
            stride = [scale(a, b) for a, b in zip(x.stride(), y.stride())]
            return torch.empty_strided(shape, stride, dtype=x.dtype, device="meta", requires_grad=x.requires_grad)
        if isinstance(x, (list, tuple)):
            if type(x) is not type(y) or len(x) != len(y):
                raise NotDerivable("different values")
            return type(x)(value(a, b) for a, b in zip(x, y))
        return arg(x, y)

    for a, b in zip(nodes1, nodes2):
        if a.op != b.op or a.target != b.target or a.name != b.name:
            raise NotDerivable(f"{a.name} vs {b.name}")
        node = graph.create_node(a.op, a.target, arg(a.args, b.args), arg(a.kwargs, b.kwargs), name=a.name,
                                 type_expr=a.type)
        node.meta = dict(a.meta)
        if "val" in a.meta:
            node.meta["val"] = value(a.meta["val"], b.meta.get("val"))
        env[a] = node
    return Captured(graph, dict(one.params), dict(one.buffers), dict(one.constants), list(one.user_inputs),
                    one.program, one.method)
