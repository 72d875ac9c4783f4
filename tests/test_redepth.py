"""The full model's trace derived from its two-block copy's (planner/redepth.py) is the trace torch.export takes.

`autopar plan` searches on a two-block copy and records the chosen plan on the full model's graph by node name;
`autopar.compile` later traces the real model and refuses a plan whose fingerprint differs. A derived full graph
must therefore equal a real trace op for op (names, targets, every argument), value for value and module path for
module path, and a model whose blocks are not alike must be traced for real.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import autopar.planning as planning
from autopar.capture import capture
from autopar.models import build_model, sample_inputs
from autopar.planner.graph import build
from autopar.planner.predict import fingerprint
from autopar.planner.redepth import Deepening, NotDeepenable, deepened
from tests.graph_equality import assert_same_graph

SHAPES = {"gpt": {"hidden": 64, "heads": 4, "vocab": 128, "seq": 32},
          "llama": {"hidden": 64, "heads": 4, "kv_heads": 2, "vocab": 128, "seq": 32}}


def _trace(family: str, layers: int, batch: int):
    model, info = build_model(family, {**SHAPES[family], "layers": layers}, seq=32, device="meta",
                              dtype=torch.bfloat16)
    return capture(model, sample_inputs(info, batch, 32, device="meta"))


@pytest.mark.parametrize("depth", [3, 5])
@pytest.mark.parametrize("family", list(SHAPES))
def test_derived_full_trace_is_the_real_one(family, depth):
    derived, real = deepened(_trace(family, 2, 4), depth), _trace(family, depth, 4)
    assert_same_graph(derived, real)
    assert fingerprint(build(derived, (2, 2), ("dp", "tp"))) == fingerprint(build(real, (2, 2), ("dp", "tp")))


def test_a_plan_is_the_same_with_the_full_graph_derived_or_traced(monkeypatch):
    """make_plan on a 4-block gpt: the full graph is derived (no full trace is taken), and the plan, fingerprint
    included, is the one the real full trace gives."""
    def plan():
        said: list[str] = []
        p = planning.make_plan("gpt", model_args={**SHAPES["gpt"], "layers": 4}, devices=4, hardware="cpu", batch=8,
                               fix={"dp": 2, "tp": 2}, progress=said.append)
        return p, [s for s in said if s.startswith("tracing gpt")]

    derived, traced_then = plan()
    assert traced_then == [], "the full model was traced although its graph can be derived"
    monkeypatch.setattr(Deepening, "holds", lambda self: False)
    real, traced_now = plan()
    assert traced_now, "with the rule refused, the full model must be traced"
    assert derived.graph_fingerprint == real.graph_fingerprint
    assert derived.strategies == real.strategies and derived.params == real.params


class _Block(nn.Module):
    def __init__(self, i: int) -> None:
        super().__init__()
        self.lin, self.third = nn.Linear(8, 8), i % 3 == 2  # every third block scales its output

    def forward(self, x):
        y = self.lin(x)
        return y * 0.5 if self.third else y


class _Uneven(nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Block(i) for i in range(layers))

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x.sum()


def test_blocks_that_differ_are_traced_for_real():
    def trace(layers: int, batch: int):
        return capture(_Uneven(layers), (torch.randn(batch, 8),))

    deepening = Deepening(lambda b: trace(2, b), lambda: trace(3, Deepening.CHECK_BATCH), lambda b: trace(6, b))
    assert not deepening.holds() and deepening.why_not
    assert_same_graph(deepening(6, 4), trace(6, 4))


def test_a_model_without_two_alike_blocks_is_not_deepened():
    with pytest.raises(NotDeepenable):
        deepened(capture(_Uneven(1), (torch.randn(2, 8),)), 4)


def _deepenings(uneven: bool):
    if uneven:
        def trace(layers: int, batch: int):
            return capture(_Uneven(layers), (torch.randn(batch, 8),))
    else:
        def trace(layers: int, batch: int):
            return _trace("gpt", layers, batch)
    def counted(calls: list):
        return lambda: calls.append(1) or trace(3, Deepening.CHECK_BATCH)
    calls = [[], []]
    return [Deepening(lambda b: trace(2, b), counted(c), lambda b: trace(6, b)) for c in calls], calls


@pytest.mark.parametrize("uneven", [False, True], ids=["alike", "uneven"])
def test_the_check_beside_answers_as_the_check_here(uneven, monkeypatch):
    """Deepening.check_beside runs the check in a forked process (cp_search.py starts it while the search runs):
    holds() then gives the answer and the reason the check here gives, for blocks alike and blocks that differ. A
    process that dies before answering leaves the check to this one."""
    (here, beside), traced = _deepenings(uneven)
    beside.check_beside()
    assert beside.holds() == here.holds() == (not uneven)
    assert beside.why_not == here.why_not and (beside.why_not is None) == (not uneven)
    assert traced == [[1], []]  # the three-block trace was taken here for `here` only
    from autopar.planner import redepth

    monkeypatch.setattr(redepth, "_check_into", lambda deepening, send: os._exit(1))
    (_, dead), traced = _deepenings(uneven)
    dead.check_beside()
    assert dead.holds() == here.holds() and dead.why_not == here.why_not and traced == [[], [1]]
