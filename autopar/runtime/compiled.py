"""The compiled training object: this rank's generated graph (one submodule per block), its local parameter
shards, the plan's activation checkpointing and ZeRO stage, gradient synchronisation for parameters whose
gradient is partial along an axis (data parallelism's all-reduce) where FSDP does not own it, and the training
step: the plan's micro-batches, accumulated (pp = 1) or run by a pipeline schedule over this rank's stages
(pp > 1, autopar/runtime/pipeline.py), gradients synchronised once per step.

Synchronisation follows DDP's design (Li et al. 2020, "PyTorch Distributed", VLDB): parameters are grouped into
buckets in reverse order of use; when every gradient of a bucket has been accumulated, the bucket is flattened and
all-reduced asynchronously while backward continues, the gradients becoming views of the reduced buffer; the end
of backward waits for the buckets.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from autopar.runtime.checkpointing import apply_checkpointing
from autopar.codegen.blocks import full_code, split_blocks
from autopar.codegen.collectives import all_gather
from autopar.codegen.regather import regather_saved
from autopar.errors import NotSupportedYet, PlanError
from autopar.runtime.pipeline import Pipeline, local_stages
from autopar.placement import Placement
from autopar.runtime.zero import make_optimizer, shard_with_fsdp

BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb


class CompiledModel(nn.Module):
    """Train it with `loss = compiled.train_step(*batch)` (the model's arguments, the global batch on every rank)
    and `.optimizer(torch.optim.AdamW, lr=...)` (any torch optimizer over the local shards; partitioned under
    ZeRO-1). Without a pipeline it can also be called like the original model on one micro-batch. `.code` is the
    generated per-rank program."""

    def __init__(self, root: nn.Module, graph: fx.Graph, plan, mesh, out_spec,
                 param_placements: dict[str, tuple[Placement, ...]], deferred: dict[str, tuple[int, ...]],
                 aliases: dict[str, str]):
        super().__init__()
        program, self.blocks = split_blocks(fx.GraphModule(root, graph, class_name="AutoparRank"))
        self.plan, self.mesh = plan, mesh
        self.zero = plan.zero if "dp" in plan.axis_names and plan.degrees["dp"] > 1 else 0
        self._autocast = plan.precision == "bf16" and self.zero < 2
        apply_checkpointing(program, {name: ac_mode(plan, name) for name in self.blocks})
        self.pp = plan.degrees.get("pp", 1)
        shared: dict[str, tuple[int, ...]] = {}
        if self.pp > 1:  # keep only this rank's pipeline stages (autopar/runtime/pipeline.py)
            program, shared = local_stages(program, plan, mesh.get_local_rank("pp"), self._autocast)
        self.param_paths = _param_paths(program, param_placements)  # FQN -> attribute path in `program`
        if self.zero >= 2:  # FSDP owns the dp reduction of the parameters the graph leaves dp-partial on every use
            keep = {program.get_parameter(p) for f, p in self.param_paths.items() if f not in deferred}
            for root in (program if self.pp > 1 else [program]):  # one FSDP root per pipeline stage
                body = getattr(root, "body", root)
                blocks = [getattr(body, b) for b in self.blocks if hasattr(body, b)]
                shard_with_fsdp(root, blocks, mesh["dp"], self.zero, plan.precision, keep)
        self.program = program
        self._out_spec = out_spec
        self.param_placements = param_placements  # FQN -> placement per axis
        self.aliases = aliases  # tied FQN -> the FQN that holds the tensor
        deferred = {f: axes for f, axes in deferred.items() if f in self.param_paths}  # this rank's stages
        self._sync = _GradSync(self, deferred) if deferred and self.zero < 2 else None
        self.pipeline = None
        self.planned = plan  # the plan as made; a cp plan runs as its fold, `plan` (autopar/codegen/context.py)
        self.fold_inputs = None  # cp > 1: (leaves, groups) -> the leaves cut into each rank's sequence chunks
        if self.pp > 1:
            held = {f: (ranks, self.local_parameter(f) if f in self.param_paths else None)
                    for f, ranks in shared.items() if f in param_placements}
            self.pipeline = Pipeline(program, plan, mesh, held)

    @property
    def code(self) -> str:
        if self.pp == 1:
            return full_code(self.program, self.blocks)
        return "\n".join(f"# ==== pipeline stage {s.index}\n{full_code(s.body, self.blocks)}" for s in self.program)

    def forward(self, *args, **kwargs):
        """The model's forward on one micro-step (micro_batch_size x dp samples, the global batch of one
        micro-batch per replica); pp = 1 only."""
        leaves = pytree.tree_leaves((args, kwargs))
        if self.fold_inputs is not None:  # one micro-step: dp groups, each cut into cp parts
            leaves = self.fold_inputs(leaves, groups=self.planned.degrees["dp"])
        out = self._run(leaves)
        return pytree.tree_unflatten(list(out) if isinstance(out, (list, tuple)) else [out], self._out_spec)

    def _run(self, leaves: list):
        if self.pipeline is not None:
            raise NotSupportedYet("a pipelined model (pp > 1) runs whole training steps: call "
                                  "compiled.train_step(*batch), not compiled(*batch)")
        with torch.autocast(leaves[0].device.type, torch.bfloat16, enabled=self._autocast), regather_saved():
            return self.program(*leaves)

    def train_step(self, *args, **kwargs) -> torch.Tensor:
        """Forward and backward of one global batch (the arguments of the model's forward, batch-first), in the
        plan's micro-batches; gradients are synchronised once, after the last. Returns the mean loss over the
        micro-batches, the same value on every rank. The forward must return the loss."""
        leaves = pytree.tree_leaves((args, kwargs))
        m, batch = self.plan.num_micro_batches, leaves[0].shape[0] if leaves[0].dim() else 0
        mbs, dp = self.planned.micro_batch_size, self.planned.degrees["dp"]
        if batch != mbs * dp * m:
            raise PlanError(f"train_step got a batch of {batch} samples but the plan runs {m} micro-batches of "
                            f"{mbs} per replica x dp={dp}; pass the plan's global batch ({self.planned.batch})")
        if self.fold_inputs is not None:  # context parallelism: micro-batches x dp groups, each cut into cp parts
            leaves = self.fold_inputs(leaves, groups=m * dp)
        if self.pipeline is not None:
            # Each bucket's reduction starts as its gradients' last micro-batch lands, during the schedule's
            # last backward passes; the step waits for them after the schedule (_GradSync.pipelined).
            with self._sync.pipelined(m) if self._sync is not None else nullcontext():
                loss = self.pipeline.step(leaves)
            if self._sync is not None:
                self._sync.reduce_all()
            self.pipeline.sum_shared_grads()
            return loss
        losses = []
        for i, chunk in enumerate(zip(*(leaf.chunk(m) for leaf in leaves))):
            with self.no_sync() if i < m - 1 else nullcontext():  # gradient accumulation
                loss = self._run(list(chunk))
                loss = loss[0] if isinstance(loss, (list, tuple)) else loss
                (loss / m if m > 1 else loss).backward()
            losses.append(loss.detach())
        return torch.stack(losses).mean() if m > 1 else losses[0]

    def optimizer(self, cls: type[torch.optim.Optimizer] = torch.optim.AdamW, **kwargs) -> torch.optim.Optimizer:
        """The optimizer for this rank's shards, with its state partitioned over dp under ZeRO-1."""
        group = self.mesh.get_group("dp") if self.zero == 1 else None
        self._optimizer = make_optimizer(self.parameters(), cls, self.zero, group, **kwargs)
        return self._optimizer

    def save(self, directory: str | Path, step: int, *, data: dict | None = None, optimizer=None,
             asynchronous: bool = False) -> Path:
        """Save the training state (parameters, the optimizer's state, every rank's RNG, `step`, the data
        position `data`, this plan) to `directory`/step_<step>, atomically; any plan can load it
        (autopar/runtime/state.py). Every rank calls it. `asynchronous`: copy the state and write it from a thread
        (DCP async_save); `wait_for_save()` or the next save finishes it. Returns the checkpoint folder."""
        from autopar.runtime import state

        return state.save(self, directory, optimizer or getattr(self, "_optimizer", None), step, data, asynchronous)

    def load(self, directory: str | Path, *, optimizer=None):
        """Load the newest complete checkpoint under `directory` (or that checkpoint folder), written under any
        plan, into the parameters, the optimizer (default: the one `.optimizer()` made) and the RNGs. Returns its
        TrainingState (step, data position, path, the plan that wrote it). Every rank calls it."""
        from autopar.runtime import state

        return state.load(self, directory, optimizer or getattr(self, "_optimizer", None))

    def export(self, directory: str | Path, model: nn.Module | None = None) -> Path:
        """Write the full parameters as one single-device state dict (model.safetensors); with `model`, the module
        that was compiled, a transformers model is written as a from_pretrained folder (config.json too)."""
        from autopar.runtime.export import export

        return export(self, directory, model)

    def wait_for_save(self) -> None:
        """Finish an asynchronous save in flight and stop its thread (call before destroying the process group)."""
        if getattr(self, "_writer", None) is not None:
            self._writer.close()

    def _checkpoint_writer(self):
        from autopar.runtime.checkpoint_io import Writer

        if getattr(self, "_writer", None) is None:
            self._writer = Writer()
        return self._writer

    def _checkpoint_layout(self):
        from autopar.runtime.state import layout

        if getattr(self, "_layout", None) is None:
            self._layout = layout(self)
        return self._layout

    def local_parameter(self, fqn: str) -> torch.Tensor:
        """This rank's tensor of parameter `fqn` (an FSDP DTensor under ZeRO-2/3)."""
        return self.program.get_parameter(self.param_paths[self.aliases.get(fqn, fqn)])

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Skip gradient synchronisation (gradient accumulation over micro-batches, like DDP.no_sync): the dp
        bucket reductions, or FSDP's reduce-scatter under ZeRO-2/3 (pp = 1; pipelining drives FSDP itself)."""
        fsdp = self.zero >= 2 and self.pipeline is None
        if self._sync is not None:
            self._sync.enabled = False
        if fsdp:
            self.program.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            if self._sync is not None:
                self._sync.enabled = True
            if fsdp:
                self.program.set_requires_gradient_sync(True)

    def full_tensor(self, fqn: str, local: torch.Tensor) -> torch.Tensor:
        """All-gather a local shard (a parameter or its gradient) of parameter `fqn` into the full tensor."""
        fqn = self.aliases.get(fqn, fqn)
        out = local.full_tensor() if hasattr(local, "full_tensor") else local  # FSDP's dp shards first
        for axis, pl in enumerate(self.param_placements[fqn]):
            if pl.is_shard:
                out = all_gather(out.contiguous(), pl.dim, self.mesh.get_group(self.plan.axis_names[axis]))
        return out

    def full_state(self, grads: bool = False) -> dict[str, torch.Tensor]:
        """Full parameters (or gradients) by original FQN, identical on every rank (gathered from every pipeline
        stage when pp > 1)."""
        out = {}
        for fqn in list(self.param_placements) + list(self.aliases):
            if self.aliases.get(fqn, fqn) not in self.param_paths:  # held by another pipeline rank
                continue
            p = self.local_parameter(fqn)
            t = p.grad if grads else p.detach()
            if t is not None:
                out[fqn] = self.full_tensor(fqn, t)
        return self.pipeline.gather(out) if self.pipeline is not None else out


class _GradSync:
    def __init__(self, model: CompiledModel, deferred: dict[str, tuple[int, ...]]):
        self.enabled = True
        self.groups = {a: model.mesh.get_group(name) for a, name in enumerate(model.plan.axis_names)}
        params = [(model.local_parameter(fqn), axes) for fqn, axes in deferred.items()]
        self.buckets = _make_buckets(params)
        self.pending: list[tuple[Any, torch.Tensor, tuple]] = []
        self.ready: dict[int, int] = {}
        self.launched: set[int] = set()
        self.queued = False
        self.passes = 1  # backward passes that accumulate into each gradient per step (pipelined: m)
        self.scheduled = False  # inside a pipeline schedule: reduce_all, not an autograd callback, ends the step
        for b, bucket in enumerate(self.buckets):
            for p in bucket["params"]:
                p.register_post_accumulate_grad_hook(self._hook(b))

    def _hook(self, b: int):
        def hook(p: torch.Tensor) -> None:
            if not self.enabled:
                return
            if not self.queued and not self.scheduled:  # under a schedule the step finishes (reduce_all)
                torch.autograd.Variable._execution_engine.queue_callback(self._finish)
                self.queued = True
            self.ready[b] = self.ready.get(b, 0) + 1
            if self.ready[b] == self.passes * len(self.buckets[b]["params"]):
                self._launch(b)

        return hook

    @contextmanager
    def pipelined(self, m: int) -> Iterator[None]:
        """Under a pipeline schedule, which runs one backward per micro-batch and stage: a bucket is final after
        m accumulations of each of its gradients and is reduced then, while backward goes on through the stage's
        earlier layers and the rank's other stages (as DDP overlaps within one backward); no backward waits for
        it: the step does, after the schedule (reduce_all)."""
        self.passes, self.scheduled = m, True
        try:
            yield
        finally:
            self.passes, self.scheduled = 1, False

    def reduce_all(self) -> None:
        """After a pipeline schedule: reduce the buckets no hook launched (the zero-bubble schedule accumulates
        weight gradients by hand, where no post-accumulate hook fires) and wait for all of them."""
        for b, bucket in enumerate(self.buckets):
            if b not in self.launched and all(p.grad is not None for p in bucket["params"]):
                self._launch(b)
        self._finish()

    def _launch(self, b: int) -> None:
        """Flatten the bucket and make its gradients views of the flat buffer (DDP's gradient_as_bucket_view):
        the reduction then happens in place and only one bucket is ever held twice, while it is flattened."""
        bucket = self.buckets[b]
        params = bucket["params"]
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        offset = 0
        for p in params:
            p.grad = flat[offset: offset + p.numel()].view_as(p)
            offset += p.numel()
        first, rest = bucket["axes"][0], bucket["axes"][1:]
        work = dist.all_reduce(flat, group=self.groups[first], async_op=True)
        self.pending.append((work, flat, rest))
        self.launched.add(b)

    def _finish(self) -> None:
        for b in range(len(self.buckets)):  # buckets whose params got no gradient this step
            if b not in self.launched and self.ready.get(b, 0) > 0:
                raise RuntimeError(f"autopar: only some parameters of gradient bucket {b} received a gradient; "
                                   "every parameter must take part in the loss")
        for work, flat, rest in self.pending:
            work.wait()
            for axis in rest:
                dist.all_reduce(flat, group=self.groups[axis])
        self.pending.clear()
        self.ready.clear()
        self.launched.clear()
        self.queued = False


def ac_mode(plan, block_module: str) -> str:
    """The plan's checkpointing for a block submodule ("blocks_3" runs layer "blocks.3")."""
    for layer, mode in plan.ac_layers.items():
        if layer.replace(".", "_") == block_module:
            return mode
    return plan.ac


def _param_paths(program: nn.Module, fqns) -> dict[str, str]:
    """Where each original parameter lives after the split (`blocks_3.inner.blocks.3.attn.q.weight`)."""
    paths: dict[str, str] = {}
    for path, _ in program.named_parameters(remove_duplicate=False):
        for fqn in fqns:
            if fqn not in paths and (path == fqn or path.endswith("." + fqn)):
                paths[fqn] = path
    return paths


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
