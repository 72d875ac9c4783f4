"""Two captures equal for planning, checked independently of the code that derives one of them (planner/rebatch.py,
planner/redepth.py): op for op (names, targets, every argument), value for value (shapes, strides, dtypes),
module path for module path, and the same placeholders."""

from __future__ import annotations

import torch


def _values(v):
    if isinstance(v, torch.Tensor):
        return (tuple(v.shape), tuple(v.stride()), v.dtype)
    if isinstance(v, (list, tuple)):
        return tuple(_values(x) for x in v)
    return v


def _paths(n):
    return [p for p, _ in (n.meta.get("nn_module_stack") or {}).values()]


def assert_same_graph(a, b) -> None:
    na, nb = list(a.graph.nodes), list(b.graph.nodes)
    assert [(n.op, n.name, n.target) for n in na] == [(n.op, n.name, n.target) for n in nb]
    for x, y in zip(na, nb):
        assert str(x.args) == str(y.args) and str(x.kwargs) == str(y.kwargs), x.name
        assert _values(x.meta.get("val")) == _values(y.meta.get("val")), x.name
        assert _paths(x) == _paths(y), x.name
    assert (a.params, a.buffers, a.constants, a.user_inputs) == (b.params, b.buffers, b.constants, b.user_inputs)
