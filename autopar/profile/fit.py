"""Fit the hardware file's parameters to measured samples, through the cost model's own formulas.

Links: the alpha-beta model of `autopar.cost_models.comm` is linear in α and 1/bw for a fixed kind and group size,
t = steps·α + factor·B/bw, so both come from one least-squares solve (numpy) over every kind and message size.
`steps` and `factor` are read off `collective_time_s` itself, so the fit cannot drift from the formulas the
planner prices with. Residuals are relative (each row divided by its measured time): latency shows only in small
messages and bandwidth only in large ones, and plain residuals would let the largest message decide both. The fit
uses the messages from FIT_FLOOR_BYTES up, the sizes a training step sends (activations, gradient buckets, FSDP
units, stage boundaries), where at least 3 sizes are that large: gloo's small messages scatter around its latency
(1.4-3.4 ms for an 8 B..4 KiB all-reduce on one run here) and, 7 of 13 sizes, pulled the line under the 64 KiB..16
MiB messages by 15-25%. A fabric's latency still shows at 64 KiB (NVLink moves it in well under a microsecond).

Compute: the peak of each dtype is the best matmul throughput measured (the schema's "dense peak" for a device
without a datasheet); `matmul_efficiency` and memory `efficiency` are the fractions for which the roofline
`autopar.cost_models.compute.op_time_s` best predicts every matmul and stream sample (least squares in relative
error over a 0.001 grid: one parameter, a non-smooth max(), so a grid is exact enough and cannot diverge).
The matmul fit has a second parameter, `matmul_overhead_s`, a fixed cost per call (operand packing, cold caches)
that the activation-shaped samples (microbench.SHAPED_MATMULS) expose: for each efficiency on the grid the
overhead minimising the relative error has a closed form (the error is linear in it), clipped at 0; samples that
follow the roofline exactly fit an overhead of 0. `attention_efficiency` is fitted on a grid like the other
efficiencies, to the attention samples, and each `<family>_per_s` to the samples of that family (exp: silu,
softmax; tanh: tanh-approximated gelu; erf: gelu) over a log grid (1e6..1e13 per second, 1% steps); all hold
forward + backward as the forward the planner's 1:2 split implies (microbench.FWD_SHARE). Where the
transcendental term never binds (a GPU), the least rate at which it does not is kept: a lower bound, and inert
in the planner.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence, TypeVar

import numpy as np

from autopar.cost_models.comm import collective_time_s
from autopar.cost_models.compute import op_time_s
from autopar.cost_models.hardware import DTYPES, Hardware, Link

from .collectives import CommSample
from autopar.cost_models.compute import FAMILIES

from .microbench import FAMILY_OF, ComputeSample

EFFICIENCY_GRID = np.round(np.arange(1, 1001) / 1000, 3)  # 0.001 .. 1.000
RATE_GRID = 10 ** np.arange(6.0, 13.0, math.log10(1.01))  # 1e6 .. 1e13 per second, 1% apart
MATMUL_OPS = ("matmul", "layer_matmul")  # n x n x n cubes and [M, K] @ [K, N] layer shapes: one fit, one peak
Sample = TypeVar("Sample", ComputeSample, CommSample)


@dataclass(frozen=True)
class LinkFit:
    latency_s: float  # α per message step
    bandwidth_bytes_per_s: float  # bus bandwidth, 1/β
    rms_rel_error: float  # of the fitted model over the samples it was fitted to
    samples: int
    note: str = ""  # how it was obtained, where not by its own least squares


@dataclass(frozen=True)
class ComputeFit:
    peak_flops_per_s: dict[str, float]  # best matmul throughput per dtype
    matmul_efficiency: float
    memory_bandwidth_bytes_per_s: float  # best stream rate
    memory_efficiency: float
    launch_overhead_s: float
    matmul_rms_rel_error: float
    stream_rms_rel_error: float
    attention_efficiency: float | None = None  # None: no attention samples
    attention_rms_rel_error: float = 0.0
    per_s: dict[str, float] = field(default_factory=dict)  # transcendental family -> evaluations per second
    per_s_rms_rel_error: dict[str, float] = field(default_factory=dict)
    matmul_overhead_s: float = 0.0  # fixed seconds per matmul call


def merge_ranks(per_rank: Sequence[Sequence[Sample]]) -> list[Sample]:
    """One sample per measurement: the median over ranks of samples that differ only in `seconds`."""
    groups: dict[Sample, list[float]] = defaultdict(list)
    for samples in per_rank:
        for s in samples:
            groups[replace(s, seconds=0.0)].append(s.seconds)
    return [replace(key, seconds=statistics.median(times)) for key, times in groups.items()]


def model_terms(kind: str, nbytes: float, group_size: int) -> tuple[float, float]:
    """(steps, factor) such that collective_time_s = steps·α + factor·B/bw."""
    steps = collective_time_s(kind, nbytes, group_size, Link("probe", 1.0, math.inf))
    factor = collective_time_s(kind, nbytes, group_size, Link("probe", 0.0, 1.0)) / nbytes
    return steps, factor


FIT_FLOOR_BYTES = 64 * 2**10  # the smallest message the link fit uses (module docstring)


def fit_alpha_beta(samples: Sequence[CommSample]) -> LinkFit:
    """Least-squares α >= 0 and bw > 0 over `samples` (any mix of kinds and group sizes on one link), those of
    FIT_FLOOR_BYTES and more where they span at least 3 sizes."""
    if len(samples) < 2:
        raise ValueError(f"fitting latency and bandwidth needs at least 2 samples, got {len(samples)}")
    large = [s for s in samples if s.nbytes >= FIT_FLOOR_BYTES]
    if len({s.nbytes for s in large}) >= 3:
        samples = large
    terms = np.array([model_terms(s.kind, s.nbytes, s.group_size) for s in samples])
    nbytes = np.array([s.nbytes for s in samples], dtype=float)
    t = np.array([s.seconds for s in samples])
    design = np.column_stack([terms[:, 0], terms[:, 1] * nbytes]) / t[:, None]
    (alpha, beta), *_ = np.linalg.lstsq(design, np.ones_like(t), rcond=None)
    if alpha < 0:  # latency below resolution: the best fit with α = 0 (1-D least squares, closed form)
        x = design[:, 1]
        alpha, beta = 0.0, float(x.sum() / (x @ x))
    largest = int(np.argmax(nbytes))
    if beta <= 0 or design[largest, 1] * beta < 0.01:  # bandwidth explains under 1% of the largest message's time
        raise ValueError("collective times do not grow with message size; rerun with larger messages or "
                         "on an idle machine")
    rel = design @ np.array([alpha, beta]) - 1.0
    return LinkFit(float(alpha), float(1.0 / beta), float(np.sqrt(np.mean(rel**2))), len(samples))


def fit_compute(samples: Sequence[ComputeSample]) -> ComputeFit:
    """Roofline parameters from matmul, stream and tiny-op samples of one device (see the module docstring)."""
    matmuls = [s for s in samples if s.op in MATMUL_OPS]
    streams = [s for s in samples if s.op in ("copy", "add")]
    launch = statistics.median(s.seconds for s in samples if s.op == "tiny_add")
    missing = [d for d in DTYPES if not any(s.dtype == d for s in matmuls)]
    if missing or not streams:
        raise ValueError(f"fit_compute needs matmuls in every dtype and stream samples; missing {missing or 'streams'}")
    peaks = {d: max(s.flops / s.seconds for s in matmuls if s.dtype == d) for d in DTYPES}
    bandwidth = max(s.bytes_moved / s.seconds for s in streams)
    base = _roofline_hardware(peaks, bandwidth, launch)
    mem_eff, mem_err = _best_fraction(lambda e: replace(base, memory_efficiency=e), streams, "vector")
    base = replace(base, memory_efficiency=mem_eff)
    mm_eff, overhead, mm_err = _matmul_fit(base, matmuls)
    base = replace(base, matmul_efficiency=mm_eff, matmul_overhead_s=overhead)
    fit = ComputeFit(peaks, mm_eff, bandwidth, mem_eff, launch, mm_err, mem_err, matmul_overhead_s=overhead)
    attention = [s for s in samples if s.op == "attention"]
    if attention:
        eff, err = _best_fraction(lambda e: replace(base, attention_efficiency=e), attention, "attention")
        fit = replace(fit, attention_efficiency=eff, attention_rms_rel_error=err)
    rates, errors = {}, {}
    for family in FAMILIES:
        special = [s for s in samples if FAMILY_OF.get(s.op) == family]
        if special:
            rates[family], errors[family] = _best_fraction(lambda r: replace(base, special_per_s={family: r}),
                                                           special, "transcendental", RATE_GRID, family)
    return replace(fit, per_s=rates, per_s_rms_rel_error=errors)


def _matmul_fit(base: Hardware, matmuls: Sequence[ComputeSample]) -> tuple[float, float, float]:
    """(efficiency, overhead per call, rms relative error): for each efficiency on the grid, the overhead c >= 0
    minimising sum(((a + c) / y - 1)^2), a the roofline time without it and y the measured time, is
    c = sum((1 - a/y) / y) / sum(1 / y^2)."""
    measured = np.array([s.seconds for s in matmuls])
    best = (math.inf, 1.0, 0.0)
    for e in EFFICIENCY_GRID:
        hw = replace(base, matmul_efficiency=float(e), matmul_overhead_s=0.0)
        a = np.array([op_time_s(hw, s.flops, s.bytes_moved, s.dtype, "matmul") for s in matmuls])
        c = max(0.0, float(np.sum((1 - a / measured) / measured) / np.sum(1 / measured**2)))
        err = float(np.sqrt(np.mean(((a + c) / measured - 1.0) ** 2)))
        if err < best[0]:
            best = (err, float(e), c)
    return best[1], best[2], best[0]


def _best_fraction(hardware: Callable[[float], Hardware], samples: Sequence[ComputeSample], unit: str,
                   grid: np.ndarray = EFFICIENCY_GRID, family: str = "exp") -> tuple[float, float]:
    """The grid value whose hardware's op_time_s has the least mean squared relative error; (value, rms)."""
    measured = np.array([s.seconds for s in samples])

    def rms(value: float) -> float:
        hw = hardware(float(value))
        predicted = np.array([op_time_s(hw, s.flops, s.bytes_moved, s.dtype, unit, s.transcendentals, family)
                              for s in samples])
        return float(np.sqrt(np.mean((predicted / measured - 1.0) ** 2)))

    errors = [rms(f) for f in grid]
    best = int(np.argmin(errors))
    return float(grid[best]), errors[best]


def _roofline_hardware(peaks: dict[str, float], bandwidth: float, launch: float) -> Hardware:
    # Only the fields op_time_s reads matter; the rest are placeholders that never reach a file.
    unused = Link("unused", 0.0, 1.0)
    return Hardware(name="fit", device="fit", devices_per_node=1, peak_flops_per_s=peaks,
                    memory_bandwidth_bytes_per_s=bandwidth, memory_bytes=1, memory_reserve_bytes=0,
                    matmul_efficiency=1.0, memory_efficiency=1.0, launch_overhead_s=launch,
                    intra_node=unused, inter_node=unused, source="fit")
