"""A planning trace at a new batch size without tracing again.

The search needs the two-block proxy (proxy.py) at many micro-step batches: one per micro-batch count it prices,
and pipeline meshes of every dp. torch.export takes ~0.1 s per block each time, and the graphs differ only in the
integers that follow the batch. `Rebatching` traces two batch sizes for real and derives any other from them:
aligned node by node, every integer (a shape or stride of a traced value, a size in an op's arguments) is either the
same in both traces (it does not depend on the batch) or in the ratio of the two batches (it is proportional to
it), and is then written for the new batch. A graph with any other integer (a batch-dependent slice such as
`x[: len(x) // 2 + 1]`), a different op sequence or a float that moves is traced for real instead.

A context-parallel fold (cp_search.py) traces the same model at seq / cp. Its graph matches the seq trace's node for
node, and an integer follows the batch there exactly where it does at seq: given the seq traces as a `template`,
one real trace of the fold is enough, and its integers are scaled where the template's follow the batch.

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
    """`trace(batch)` like `capture` at that batch, cached; from the third batch size on, derived (see above), or
    from the second where a `template` (the same model at another sequence length) has two real traces."""

    def __init__(self, capture: Callable[[int], Captured], template: "Rebatching | None" = None) -> None:
        self.capture = capture
        self.template = template
        self.cache: dict[int, Captured] = {}
        self.derived = 0  # how many traces were derived rather than taken

    def __call__(self, batch: int) -> Captured:
        if batch not in self.cache:
            self.cache[batch] = self._derive(batch) or self.capture(batch)
        return self.cache[batch]

    def real(self) -> list[int]:
        """The batch sizes traced for real, in order."""
        return [b for b, c in self.cache.items() if not c.__dict__.get("_derived")]

    def _derive(self, batch: int) -> Captured | None:
        real = self.real()
        pair = self if len(real) >= 2 else self.template
        if not real or pair is None or len(pair.real()) < 2:
            return None
        (b1, b2), b0 = pair.real()[:2], real[0]
        try:
            out = rebatched(pair.cache[b1], pair.cache[b2], b1, b2, batch, self.cache[b0], b0)
        except NotDerivable:
            return None
        out.__dict__["_derived"] = True
        self.derived += 1
        return out


def rebatched(one: Captured, two: Captured, b1: int, b2: int, batch: int, base: Captured | None = None,
              b0: int | None = None) -> Captured:
    """The capture at `batch` from captures of the same model at b1 != b2; NotDerivable where it cannot be. With
    `base`, the model traced at batch b0 under another sequence length (matching `one` node for node), `one` and
    `two` only say which integers follow the batch, and base's are the ones scaled."""
    base, b0 = (one, b1) if base is None else (base, b0)
    nodes0, nodes1, nodes2 = list(base.graph.nodes), list(one.graph.nodes), list(two.graph.nodes)
    if not len(nodes0) == len(nodes1) == len(nodes2) or not base.user_inputs == one.user_inputs == two.user_inputs:
        raise NotDerivable("different graphs")

    def scale(z: int, x: int, y: int) -> int:  # z: base's integer; x, y: the pair's at b1, b2
        if x == y:
            return z
        if x * b2 == y * b1 and (z * batch) % b0 == 0:
            return z * batch // b0
        raise NotDerivable(f"{x} at batch {b1}, {y} at batch {b2}")

    graph, env = fx.Graph(), {}

    def arg(z, x, y):
        if isinstance(z, fx.Node):
            if not isinstance(x, fx.Node) or not isinstance(y, fx.Node) or not z.name == x.name == y.name:
                raise NotDerivable("different wiring")
            return env[z]
        if type(z) is not type(x):
            raise NotDerivable(f"argument {z!r} vs {x!r}")
        if isinstance(z, (list, tuple)):
            if type(x) is not type(y) or not len(z) == len(x) == len(y):
                raise NotDerivable("different arguments")
            return type(z)(arg(c, a, b) for c, a, b in zip(z, x, y))
        if isinstance(z, dict):
            if not z.keys() == x.keys() == y.keys():
                raise NotDerivable("different keyword arguments")
            return {k: arg(z[k], x[k], y[k]) for k in z}
        if isinstance(z, int) and not isinstance(z, bool) and isinstance(y, int):
            return scale(z, x, y)
        if x != y and not (x is y):
            raise NotDerivable(f"argument {x!r} vs {y!r}")
        return z

    def value(z, x, y):
        if isinstance(z, torch.Tensor):
            if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or \
                    not z.dim() == x.dim() == y.dim() or not z.dtype == x.dtype == y.dtype:
                raise NotDerivable("different values")
            shape = [scale(c, a, b) for c, a, b in zip(z.shape, x.shape, y.shape)]
            stride = [scale(c, a, b) for c, a, b in zip(z.stride(), x.stride(), y.stride())]
            return torch.empty_strided(shape, stride, dtype=z.dtype, device="meta", requires_grad=z.requires_grad)
        if isinstance(z, (list, tuple)):
            if type(z) is not type(x) or type(x) is not type(y) or not len(z) == len(x) == len(y):
                raise NotDerivable("different values")
            return type(z)(value(c, a, b) for c, a, b in zip(z, x, y))
        return arg(z, x, y)

    for c, a, b in zip(nodes0, nodes1, nodes2):
        if not c.op == a.op == b.op or not c.target == a.target == b.target or not c.name == a.name == b.name:
            raise NotDerivable(f"{a.name} vs {b.name}")
        node = graph.create_node(c.op, c.target, arg(c.args, a.args, b.args), arg(c.kwargs, a.kwargs, b.kwargs),
                                 name=c.name, type_expr=c.type)
        node.meta = dict(c.meta)
        if "val" in c.meta:
            node.meta["val"] = value(c.meta["val"], a.meta.get("val"), b.meta.get("val"))
        env[c] = node
    return Captured(graph, dict(base.params), dict(base.buffers), dict(base.constants), list(base.user_inputs),
                    base.program, base.method)
