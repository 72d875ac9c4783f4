"""Measure one training step on this rank: wall time and peak bytes of live tensors, on any device.

CUDA has allocator statistics; a CPU build has none, so the peak is reconstructed from the allocator's own events:
the bytes held by live tensors when the step starts (every tensor the garbage collector can reach, each storage
counted once) plus the highest total of the blocks allocated during the step and live at once, from the CPU
allocator's events in the profiler's event tree (`profile_memory=True`), each free matched to its allocation.
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
    """Highest total of the CPU allocations live at once during the profile, matching each free to its allocation
    by address. A free the profiler did not see (a tensor released on a collective's worker thread) shows up as its
    address being handed out again; that earlier block is then no longer counted."""
    events: list[tuple[int, int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == torch._C._profiler._EventType.Allocation and event.extra_fields.device.type == "cpu":
            events.append((event.start_time_ns, event.extra_fields.alloc_size, event.extra_fields.ptr))
        stack.extend(event.children)
    live: dict[int, int] = {}
    running = peak = 0
    for _, size, ptr in sorted(events):
        if size > 0:
            running += size - live.get(ptr, 0)
            live[ptr] = size
        elif ptr in live:
            running -= live.pop(ptr)
        peak = max(peak, running)
    return float(peak)
