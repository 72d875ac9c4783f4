"""Measure one training step on this rank: wall time and peak bytes of live tensors, on any device.

CUDA has allocator statistics; a CPU build has none, so the peak is reconstructed from the allocator's own events:
the bytes held by live tensors when the step starts (every tensor the garbage collector can reach, each storage
counted once) plus the highest total of the blocks the step allocates and holds at once, from the CPU allocator's
events in the profiler's event tree (`profile_memory=True`), each free matched to its allocation by address.

Two things the event stream alone gets wrong, both from collectives' worker threads (gloo runs each collective on
one, ProcessGroupGloo.cpp `runLoop`):
- Buffers of the collective backend itself are not counted: gloo's copy of a reduce-scatter's input
  (`reduce_scatter_tensor_coalesced` clones it and all-reduces the clone) and its flat all-gather output (allocated on
  the worker). CUDA's allocator statistics do not see NCCL's buffers either, and these live as long as the worker
  keeps its reference to the Work, i.e. as the OS schedules it: identical runs showed one block's gradients at the
  peak or not. They are the blocks allocated under a `c10d::` operator or on another thread than the step's.
- A block the program drops while a worker still references it (an all-gather's output after its copy-out) is
  freed by the worker, out of the profiler's sight or late; its free is dated at its last use by an operator
  (`record_shapes=True` names each operator's input storages), when the program no longer needed it.
"""

from __future__ import annotations

import bisect
import gc
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

_STEP = "autopar::measured_step"  # marks the thread that runs the step
_ALLOCATION, _OP = torch._C._profiler._EventType.Allocation, torch._C._profiler._EventType.TorchOp
_TensorMeta = torch._C._profiler._TensorMetadata


@dataclass(frozen=True)
class StepMeasurement:
    seconds: float
    peak_bytes: float  # live tensor bytes at the step's highest point
    start_bytes: float  # live tensor bytes when the step began (parameters, optimizer state, ...)


def live_storages() -> dict[int, int]:
    """Address -> bytes of every storage reachable from Python tensors (DTensor shards and parameters included)."""
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
    return seen


def live_tensor_bytes() -> float:
    return float(sum(live_storages().values()))


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
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        t0 = time.perf_counter()
        with record_function(_STEP):
            step()
        seconds = time.perf_counter() - t0
    peak = peak_allocated(prof.profiler.kineto_results.experimental_event_tree(), set(live_storages()))
    return StepMeasurement(seconds, start + peak, start)


@dataclass
class _Block:
    start_ns: int
    size: int
    ptr: int
    counted: bool  # the program's, not the collective backend's
    end_ns: float | None = None  # None: freed out of sight (dated at its last use)
    uses_until: int | None = None  # a later block took its address: its uses end there


def peak_allocated(event_tree, live_after: set[int]) -> float:
    """Highest total of the program's CPU blocks live at once during the profiled step. `live_after`: addresses of
    storages still reachable after it (never freed, so they stay to the end)."""
    allocs, frees, uses, step_tid = _events(event_tree)
    blocks: list[_Block] = []
    owner: dict[int, _Block] = {}
    events = sorted([(t, 1, i) for i, (t, *_rest) in enumerate(allocs)] + [(t, 0, i) for i, (t, *_r) in enumerate(frees)])
    for t, is_alloc, i in events:
        if is_alloc:
            _, size, ptr, tid, in_collective = allocs[i]
            if ptr in owner:  # the address handed out again: its last block was freed where the profiler missed it
                owner[ptr].uses_until = t
            owner[ptr] = _Block(t, size, ptr, tid == step_tid and not in_collective)
            blocks.append(owner[ptr])
        else:
            _, ptr, tid = frees[i]
            block = owner.pop(ptr, None)
            if block is not None:
                block.end_ns = t if tid == step_tid else None
                block.uses_until = t
    end = float("inf")
    for block in blocks:
        if block.end_ns is None and block.uses_until is None and block.ptr in live_after and owner.get(block.ptr) is block:
            block.end_ns = end  # still held after the step
        elif block.end_ns is None:
            block.end_ns = _last_use(uses.get(block.ptr, []), block)
    return _highest([b for b in blocks if b.counted])


def _events(event_tree):
    """(allocations (ns, bytes, address, thread, inside a collective), frees (ns, address, thread),
    address -> sorted end times of the operators reading it, the step's thread)."""
    allocs, frees, uses, step_tid = [], [], defaultdict(list), None
    stack = [(e, False) for e in event_tree]
    while stack:
        event, in_collective = stack.pop()
        if event.tag == _ALLOCATION and event.extra_fields.device.type == "cpu":
            f = event.extra_fields
            if f.alloc_size > 0:
                allocs.append((event.start_time_ns, f.alloc_size, f.ptr, event.start_tid, in_collective))
            else:
                frees.append((event.start_time_ns, f.ptr, event.start_tid))
        elif event.tag == _OP:
            step_tid = event.start_tid if event.name == _STEP else step_tid
            in_collective = in_collective or event.name.startswith("c10d::")
            for t in _tensors(event.extra_fields.inputs):
                uses[t.storage_data_ptr].append(event.end_time_ns)
        stack.extend((child, in_collective) for child in event.children)
    for times in uses.values():
        times.sort()
    return allocs, frees, uses, step_tid


def _tensors(inputs):
    for x in inputs:
        if isinstance(x, _TensorMeta):
            yield x
        elif isinstance(x, list):
            yield from (y for y in x if isinstance(y, _TensorMeta))


def _last_use(times: list[int], block: _Block) -> int:
    """End of the last operator reading the block's address while the block held it (its allocation if none)."""
    hi = bisect.bisect_left(times, block.uses_until) if block.uses_until is not None else len(times)
    lo = bisect.bisect_left(times, block.start_ns)
    return max(times[hi - 1], block.start_ns) if hi > lo else block.start_ns


def _highest(blocks: list[_Block]) -> float:
    running = peak = 0
    for _, delta in sorted([(b.start_ns, b.size) for b in blocks] + [(b.end_ns, -b.size) for b in blocks]):
        running += delta
        peak = max(peak, running)
    return float(peak)
