"""Measure one training step on this rank: wall time and peak bytes of live tensors, on any device.

CUDA has allocator statistics; a CPU build has none, so the peak is reconstructed from the allocator's own events:
the bytes held by live tensors when the step starts (every tensor the garbage collector can reach, each storage
counted once) plus the highest running sum of the allocations and frees the profiler records during the step
(`profile_memory=True` records every CPU allocator call with its size in the profiler's event tree).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile


@dataclass(frozen=True)
class StepMeasurement:
    seconds: float
    peak_bytes: float  # live tensor bytes at the step's highest point
    start_bytes: float  # live tensor bytes when the step began (parameters, optimizer state, ...)


def live_tensor_bytes() -> float:
    """Bytes of every storage reachable from Python tensors (DTensor shards and parameters included)."""
    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            if not issubclass(type(obj), torch.Tensor):  # type(), not isinstance: no proxy objects' __class__
                continue
            local = obj.to_local() if hasattr(obj, "to_local") else obj
            if local.device.type == "meta":
                continue
            storage = local.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, ReferenceError, AttributeError):  # tensors without storage (fake, functional)
            continue
    return float(sum(seen.values()))


def measure_step(step: Callable[[], None]) -> StepMeasurement:
    """Run `step()` once, timing it and tracking its peak tensor memory."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = float(torch.cuda.memory_allocated())
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        return StepMeasurement(time.perf_counter() - t0, float(torch.cuda.max_memory_allocated()), start)
    start = live_tensor_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t0 = time.perf_counter()
        step()
        seconds = time.perf_counter() - t0
    return StepMeasurement(seconds, start + _peak_allocated(prof), start)


def _peak_allocated(prof) -> float:
    """Highest running sum of the CPU allocator's allocations (+) and frees (-) during the profile."""
    sizes: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == torch._C._profiler._EventType.Allocation and event.extra_fields.device.type == "cpu":
            sizes.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(event.children)
    running = peak = 0
    for _, size in sorted(sizes):
        running += size
        peak = max(peak, running)
    return float(peak)
