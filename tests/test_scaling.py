"""Fidelity at scale (issue 19): the published Megatron-LM runs (Narayanan et al. 2021, arXiv 2104.04473, Table 1;
../shared/reference) predicted as they ran, and weak scaling (model and GPU count grown together) no worse than the
published runs'.

"As they ran": Megatron-LM's train_step of that time all-reduced the data-parallel gradients after the whole
forward-backward (`model.allreduce_gradients()` after `forward_backward_func`, under its default `--DDP-impl local`),
so none of that reduction hid behind backward. autopar's runtime overlaps it (runtime/compiled.py), so its own
prediction of these configurations is faster; the what-if below sets the hardware's comm_overlap to 0 to price the
published runtime instead. TFLOP/s per GPU are counted as the paper counts them, with full recompute:
F = 96 B s l h^2 (1 + s/(6h) + V/(16 l h)).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from autopar.cost_models import load_hardware
from autopar.planning import make_plan

SEQ, VOCAB = 2048, 51200
# name -> (layers, hidden, heads, tp, pp, GPUs, batch, micro-batch per replica, published TFLOP/s per GPU)
ROWS = {"1.7B": (24, 2304, 24, 1, 1, 32, 512, 16, 137), "39.1B": (48, 8192, 64, 8, 2, 512, 1536, 4, 138)}


def _tflops(name: str, hardware) -> float:
    layers, hidden, heads, tp, pp, gpus, batch, micro, _ = ROWS[name]
    dp = gpus // (tp * pp)
    fix = {"pp": pp, "tp": tp, "dp": dp, "mbs": micro, "ac": "full", "zero": 0}  # mbs: per data-parallel replica
    if pp > 1:
        fix["schedule"] = "interleaved"
    plan = make_plan("gpt", model_args=dict(layers=layers, hidden=hidden, heads=heads, vocab=VOCAB, seq=SEQ),
                     devices=gpus, hardware=hardware, batch=batch, fix=fix)
    flops = 96 * batch * SEQ * layers * hidden**2 * (1 + SEQ / (6 * hidden) + VOCAB / (16 * layers * hidden))
    return flops / plan.predicted.step_time_s / gpus / 1e12


@pytest.fixture(scope="module")
def as_published() -> dict[str, float]:
    megatron_2021 = replace(load_hardware("a100-80gb-sxm"), comm_overlap=0.0)  # reduction after the backward
    return {name: _tflops(name, megatron_2021) for name in ROWS}


@pytest.mark.parametrize("name", list(ROWS))
def test_development_rows_within_ten_percent_of_published(as_published, name):
    assert as_published[name] == pytest.approx(ROWS[name][-1], rel=0.10)


def test_weak_scaling_falls_no_faster_than_published(as_published):
    """From 1.7B on 32 GPUs to 39.1B on 512 the published per-GPU throughput holds (137 -> 138); the predicted one
    may not fall faster, within the 10% the rows are predicted to."""
    small, large = as_published["1.7B"], as_published["39.1B"]
    published = ROWS["39.1B"][-1] / ROWS["1.7B"][-1]
    assert large / small >= 0.9 * published, (small, large)
