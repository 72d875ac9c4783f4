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
