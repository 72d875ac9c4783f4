"""The compiled training object: this rank's generated graph, its local parameter shards, and gradient
synchronisation for parameters whose gradient is partial along an axis (data parallelism's all-reduce).

Synchronisation follows DDP's design (Li et al. 2020, "PyTorch Distributed", VLDB): parameters are grouped into
buckets in reverse order of use; when every gradient of a bucket has been accumulated, the bucket is flattened and
all-reduced asynchronously while backward continues; the end of backward waits for the buckets and copies back.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from autopar.codegen.collectives import all_gather
from autopar.placement import Placement

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb


class CompiledModel(nn.Module):
    """Call it like the original model (same arguments, the global batch on every rank); train it with any torch
    optimizer over `.parameters()` (the local shards). `.code` is the generated per-rank program."""

    def __init__(self, root: nn.Module, graph: fx.Graph, plan, mesh, out_spec,
                 param_placements: dict[str, tuple[Placement, ...]], deferred: dict[str, tuple[int, ...]],
                 aliases: dict[str, str]):
        super().__init__()
        self.program = fx.GraphModule(root, graph, class_name="AutoparRank")
        self.plan, self.mesh = plan, mesh
        self._out_spec = out_spec
        self.param_placements = param_placements  # FQN -> placement per axis
        self.aliases = aliases  # tied FQN -> the FQN that holds the tensor
        self._sync = _GradSync(self, deferred) if deferred else None

    @property
    def code(self) -> str:
        return self.program.code

    def forward(self, *args, **kwargs):
        leaves = pytree.tree_leaves((args, kwargs))
        out = self.program(*leaves)
        return pytree.tree_unflatten(list(out) if isinstance(out, (list, tuple)) else [out], self._out_spec)

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Skip gradient synchronisation (gradient accumulation over micro-batches, like DDP.no_sync)."""
        if self._sync is None:
            yield
            return
        self._sync.enabled = False
        try:
            yield
        finally:
            self._sync.enabled = True

    def full_tensor(self, fqn: str, local: torch.Tensor) -> torch.Tensor:
        """All-gather a local shard (a parameter or its gradient) of parameter `fqn` into the full tensor."""
        fqn = self.aliases.get(fqn, fqn)
        out = local
        for axis, pl in enumerate(self.param_placements[fqn]):
            if pl.is_shard:
                out = all_gather(out.contiguous(), pl.dim, self.mesh.get_group(self.plan.axis_names[axis]))
        return out

    def full_state(self, grads: bool = False) -> dict[str, torch.Tensor]:
        """Full parameters (or gradients) by original FQN, identical on every rank."""
        out = {}
        for fqn in list(self.param_placements) + list(self.aliases):
            p = self.program.get_parameter(self.aliases.get(fqn, fqn))
            t = p.grad if grads else p.detach()
            if t is not None:
                out[fqn] = self.full_tensor(fqn, t)
        return out


class _GradSync:
    def __init__(self, model: CompiledModel, deferred: dict[str, tuple[int, ...]]):
        self.enabled = True
        self.groups = {a: model.mesh.get_group(name) for a, name in enumerate(model.plan.axis_names)}
        params = [(model.program.get_parameter(fqn), axes) for fqn, axes in deferred.items()]
        self.buckets = _make_buckets(params)
        self.pending: list[tuple[Any, torch.Tensor, list]] = []
        self.ready: dict[int, int] = {}
        self.queued = False
        for b, bucket in enumerate(self.buckets):
            for p in bucket["params"]:
                p.register_post_accumulate_grad_hook(self._hook(b))

    def _hook(self, b: int):
        def hook(p: torch.Tensor) -> None:
            if not self.enabled:
                return
            if not self.queued:
                torch.autograd.Variable._execution_engine.queue_callback(self._finish)
                self.queued = True
            self.ready[b] = self.ready.get(b, 0) + 1
            if self.ready[b] == len(self.buckets[b]["params"]):
                self._launch(b)

        return hook

    def _launch(self, b: int) -> None:
        bucket = self.buckets[b]
        grads = [p.grad for p in bucket["params"]]
        flat = torch.cat([g.reshape(-1) for g in grads])
        first, rest = bucket["axes"][0], bucket["axes"][1:]
        work = dist.all_reduce(flat, group=self.groups[first], async_op=True)
        self.pending.append((work, flat, grads, rest))

    def _finish(self) -> None:
        for b in range(len(self.buckets)):  # buckets whose params got no gradient this step
            if 0 < self.ready.get(b, 0) < len(self.buckets[b]["params"]):
                raise RuntimeError(f"autopar: only some parameters of gradient bucket {b} received a gradient; "
                                   "every parameter must take part in the loss")
        for work, flat, grads, rest in self.pending:
            work.wait()
            for axis in rest:
                dist.all_reduce(flat, group=self.groups[axis])
            offset = 0
            for g in grads:
                g.copy_(flat[offset: offset + g.numel()].view_as(g))
                offset += g.numel()
        self.pending.clear()
        self.ready.clear()
        self.queued = False


def _make_buckets(params: list[tuple[torch.Tensor, tuple[int, ...]]]) -> list[dict]:
    """Reverse registration order approximates the order backward produces gradients (DDP does the same)."""
    buckets: list[dict] = []
    for p, axes in reversed(params):
        last = buckets[-1] if buckets else None
        if last is None or last["axes"] != axes or last["dtype"] != p.dtype or last["bytes"] >= BUCKET_BYTES:
            last = {"axes": axes, "dtype": p.dtype, "bytes": 0, "params": []}
            buckets.append(last)
        last["params"].append(p)
        last["bytes"] += p.numel() * p.element_size()
    return buckets
