"""Per-op time on one device: the roofline model (Williams, Waterman & Patterson, CACM 2009).

An op is limited either by arithmetic or by memory traffic, whichever takes longer, plus a fixed launch cost:

    t = max(flops / (peak · eff), bytes / (mem_bw · memory_efficiency)) + launch_overhead_s

Matmul-like ops (mm, bmm, addmm, conv, attention) run on the matrix units, so their ceiling is the dtype's dense
peak times `matmul_efficiency`. Every other op runs on the vector units, whose ceiling is the float32 peak for any
input dtype: PyTorch's elementwise and reduction kernels compute in float32 "opmath" even for bfloat16/float16
(aten/src/ATen/OpMathType.h). That also lets integer and bool ops (index, masks) be costed; their compute term is
negligible next to their memory term, so no per-dtype vector peak is needed.
"""

from __future__ import annotations

from typing import Any

from .hardware import Hardware


def op_time_s(hw: Hardware, flops: float, bytes_moved: float, dtype: Any, is_matmul: bool) -> float:
    """Seconds for one op moving `bytes_moved` bytes to/from device memory and doing `flops` floating-point ops.

    Zero work (views, reshapes that alias their input) costs nothing, not even a launch: no kernel runs.
    """
    if flops < 0 or bytes_moved < 0:
        raise ValueError(f"op_time_s needs flops >= 0 and bytes_moved >= 0, got {flops} and {bytes_moved}")
    if flops == 0 and bytes_moved == 0:
        return 0.0
    if is_matmul:
        flops_per_s = hw.peak_flops(dtype) * hw.matmul_efficiency
    else:
        flops_per_s = hw.peak_flops("float32")
    bytes_per_s = hw.memory_bandwidth_bytes_per_s * hw.memory_efficiency
    return max(flops / flops_per_s, bytes_moved / bytes_per_s) + hw.launch_overhead_s
