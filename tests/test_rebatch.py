"""Planning traces derived at a new batch size (planner/rebatch.py) are the traces torch.export takes there.

The planner traces its two-block proxy at two batch sizes and derives the others; a derived graph must equal a
real trace op for op (names, targets, every argument) and value for value (shapes, strides, dtypes), and a model
whose integers do not follow the batch must be traced for real.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autopar.capture import capture
from autopar.models import build_model, sample_inputs
from autopar.planner.rebatch import NotDerivable, Rebatching, rebatched
from tests.graph_equality import assert_same_graph

SHAPES = {"gpt": {"layers": 2, "hidden": 64, "heads": 4, "vocab": 128, "seq": 32},
          "llama": {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "vocab": 128, "seq": 32}}


@pytest.mark.parametrize("family", list(SHAPES))
def test_derived_traces_equal_real_ones(family):
    model, info = build_model(family, SHAPES[family], seq=32, device="meta", dtype=torch.bfloat16)
    real = lambda b: capture(model, sample_inputs(info, b, 32, device="meta"))  # noqa: E731
    trace = Rebatching(real)
    trace(1), trace(4)  # the two real traces
    for b in (2, 3, 8, 12):
        derived = trace(b)
        assert derived.__dict__.get("_derived"), f"batch {b} was traced again"
        assert_same_graph(derived, real(b))
    assert trace.derived == 4


@pytest.mark.parametrize("family", list(SHAPES))
def test_a_fold_derives_its_batches_from_the_templates_pair(family):
    """A context-parallel fold traces the model at seq / cp once and derives every other batch from the seq traces'
    pair (which integers follow the batch): each equals a real trace at seq / cp."""
    model, info = build_model(family, SHAPES[family], seq=32, device="meta", dtype=torch.bfloat16)
    real = lambda b, seq: capture(model, sample_inputs(info, b, seq, device="meta"))  # noqa: E731
    template = Rebatching(lambda b: real(b, 32))
    template(1), template(4)
    fold = Rebatching(lambda b: real(b, 16), template)
    fold(1)  # its one real trace
    for b in (2, 3, 8):
        derived = fold(b)
        assert derived.__dict__.get("_derived"), f"batch {b} was traced again"
        assert_same_graph(derived, real(b, 16))
    assert fold.derived == 3 and fold.real() == [1]


class _HalfBatch(nn.Module):
    """Uses the first half of the batch (plus one): an integer that is neither constant nor proportional."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x[: x.shape[0] // 2 + 1]).sum()


def test_a_batch_dependent_integer_is_traced_for_real():
    model = _HalfBatch()
    real = lambda b: capture(model, (torch.randn(b, 8),))  # noqa: E731
    with pytest.raises(NotDerivable):
        rebatched(real(2), real(4), 2, 4, 8)
    trace = Rebatching(real)
    trace(2), trace(4)
    assert_same_graph(trace(8), real(8))
    assert trace.derived == 0


class _LongOnly(nn.Module):
    """An op only for sequences longer than 16: traced at 32 and at 16, the graphs differ."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        h = self.lin(x)
        return (h.relu() if x.shape[1] > 16 else h).sum()


def test_a_fold_that_traces_otherwise_is_traced_for_real():
    model = _LongOnly()
    real = lambda b, seq: capture(model, (torch.randn(b, seq, 8),))  # noqa: E731
    template = Rebatching(lambda b: real(b, 32))
    template(1), template(2)
    fold = Rebatching(lambda b: real(b, 16), template)
    fold(1)
    assert_same_graph(fold(4), real(4, 16))
    assert fold.derived == 0 and fold.real() == [1, 4]
