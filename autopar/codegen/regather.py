"""Sequence parallelism's memory saving: keep the shard of an all-gathered activation, gather it again in backward.

Korthikanti et al. 2022 (arXiv 2205.05198) Sec. 4.2.2: the input of the column-parallel matmuls after a
sequence-parallel region is all-gathered in forward; storing it whole for the matmul's weight gradient would undo
sequence parallelism's activation saving, so Megatron stores the sequence shard and re-gathers it in backward
(the gather overlaps the input-gradient matmul there). autopar does the same without touching the ops: while the
compiled forward runs, a saved-tensor hook replaces any tensor sharing storage with such a gathered activation by a
handle to its shard; the first backward use gathers it again and the consumers of one gather (q, k and v) share it.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterator

import torch

_GATHERED: dict[int, "_Shard"] = {}  # storage address of a live gathered activation -> its shard
_ACTIVE = [0]  # nesting depth of regather_saved(); gathers outside it (recomputation in backward) are not kept


class _Shard:
    __slots__ = ("gathered", "shard", "dim", "group", "full")

    def __init__(self, gathered: torch.Tensor, shard: torch.Tensor, dim: int, group):
        self.gathered = weakref.ref(gathered)
        self.shard, self.dim, self.group, self.full = shard.detach(), dim, group, None

    def regather(self) -> torch.Tensor:
        if self.full is None:
            from autopar.codegen.collectives import all_gather

            self.full = all_gather(self.shard, self.dim, self.group)
        return self.full


def remember(gathered: torch.Tensor, shard: torch.Tensor, dim: int, group) -> None:
    """Called by the sequence-parallel all-gather: `gathered` can be rebuilt from `shard`."""
    if _ACTIVE[0]:
        _GATHERED[gathered.untyped_storage().data_ptr()] = _Shard(gathered, shard, dim, group)


def _pack(t: torch.Tensor):
    """Detached, never `t` itself: a pack hook receives the live tensor with its grad_fn, and for a saved output
    that grad_fn owns the SavedVariable holding what pack returns, a cycle through C++ that gc cannot see. A
    backward with retain_graph=False breaks it; a graph without backward (the pipeline's probe) or freed after
    retain_graph=True (zero-bubble's input-gradient pass, torch's stage_backward_input) would keep every saved
    tensor of the micro-batch for good (pytorch/pytorch#115255, #189025). Unpacking re-attaches the grad_fn."""
    entry = _GATHERED.get(t.untyped_storage().data_ptr()) if t.device.type != "meta" else None
    if entry is None or entry.gathered() is None:
        return t.detach()
    return entry, t.size(), t.stride(), t.storage_offset()


def _unpack(saved):
    if isinstance(saved, torch.Tensor):
        return saved
    entry, size, stride, offset = saved
    return entry.regather().as_strided(size, stride, offset)


@contextmanager
def regather_saved() -> Iterator[None]:
    """Run a forward whose sequence-parallel gathers are stored as shards."""
    _ACTIVE[0] += 1
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _ACTIVE[0] -= 1
        _GATHERED.clear()  # the handles autograd holds keep their shards; the addresses may be reused now
