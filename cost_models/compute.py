"""Per-op time on one device: the roofline model (Williams, Waterman & Patterson, CACM 2009).

An op is limited either by arithmetic or by memory traffic, whichever takes longer, plus a fixed launch cost:

    t = max(flops / (peak · eff), bytes / (mem_bw · memory_efficiency)) + launch_overhead_s

Matmul-like ops (mm, bmm, addmm, conv, attention) run on the matrix units, so their ceiling is the dtype's dense
peak times `matmul_efficiency`. Every other op runs on the vector units, whose ceiling is the float32 peak for any
input dtype: PyTorch's elementwise and reduction kernels compute in float32 "opmath" even for bfloat16/float16
(aten/src/ATen/OpMathType.h). That also lets integer and bool ops (index, masks) be costed; their compute term is
negligible next to their memory term, so no per-dtype vector peak is needed.

A matmul also pays `matmul_overhead_s` per call where a profile fitted one: on this project's 2-core CPU host,
packing operands and cold caches cost ~0.2 ms per call whatever its size (fitted 175-229 us), and
[128, 256] @ [256, 768] runs at ~65% of the throughput of [2048, 256] @ [256, 768] (0 in the datasheet files).

Two optional ceilings refine this where a profile measured them (hardware.py): fused attention (SDPA) at its own
`attention_efficiency` of the matmul peak, and transcendental ops at `exp_per_s` (exp, sigmoid, log...: silu,
softmax), `tanh_per_s` (tanh, GELU's tanh approximation) or `erf_per_s` (exact GELU) evaluations per second,
which bind on a CPU (PyTorch's vectorised tanh is several times slower than its exp there) and never on a GPU,
where special-function units outrun memory. All are fitted to forward + backward together, as the planner prices
backward at twice the forward.
"""

from __future__ import annotations

import math
from typing import Any

from .hardware import FAMILIES, Hardware

UNITS = ("vector", "matmul", "attention", "transcendental")  # what bounds an op; FAMILIES: what a transcendental
# op evaluates (exp-like: exp, sigmoid, log, sin; tanh; erf)


def op_time_s(hw: Hardware, flops: float, bytes_moved: float, dtype: Any, unit: str = "vector",
              transcendentals: float = 0.0, family: str = "exp") -> float:
    """Seconds for one op moving `bytes_moved` bytes to/from device memory and doing `flops` floating-point ops,
    `transcendentals` of them evaluations of a function of `family` (FAMILIES), on the given unit (UNITS).

    Zero work (views, reshapes that alias their input) costs nothing, not even a launch: no kernel runs.
    """
    if flops < 0 or bytes_moved < 0 or transcendentals < 0:
        raise ValueError(f"op_time_s needs flops, bytes_moved and transcendentals >= 0, got {flops}, "
                         f"{bytes_moved} and {transcendentals}")
    if unit not in UNITS or family not in FAMILIES:
        raise ValueError(f"op_time_s: unit must be one of {UNITS} and family one of {FAMILIES}, got {unit!r} "
                         f"and {family!r}")
    if flops == 0 and bytes_moved == 0:
        return 0.0
    if unit == "matmul":
        flops_per_s = hw.peak_flops(dtype) * hw.matmul_efficiency
    elif unit == "attention":
        flops_per_s = hw.peak_flops(dtype) * (hw.attention_efficiency or hw.matmul_efficiency)
    else:
        flops_per_s = hw.peak_flops("float32")
    bytes_per_s = hw.memory_bandwidth_bytes_per_s * hw.memory_efficiency
    special = transcendentals / hw.special_per_s.get(family, math.inf) if unit == "transcendental" else 0.0
    fixed = hw.launch_overhead_s + (hw.matmul_overhead_s if unit == "matmul" else 0.0)
    return max(flops / flops_per_s, bytes_moved / bytes_per_s, special) + fixed
