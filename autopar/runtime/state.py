"""Training state in plan-independent form (DESIGN decision 11): every tensor this rank holds, described as its
block of the global tensor, keyed by the model's own parameter names, so that torch.distributed.checkpoint (DCP)
reads any saved layout into any other.

A parameter's local tensor is the global tensor cut by the plan's placements, axis by axis in mesh order
(`S(d)` on an axis of degree n: torch.chunk(n, d), this rank's coordinate), then, under ZeRO-2/3, cut once more by
FSDP2 on dim 0 along dp (also torch.chunk semantics, unpadded). Every cut keeps one rectangular block, so each
rank's piece is one chunk (offsets, sizes) of the global shape, which `Block` hands to DCP through its checkpoint
protocol (`__create_write_items__`, `__create_chunk_list__`, `__get_tensor_shard__`, as DTensor does). Ranks
holding the same block (replicas, a tied parameter on two pipeline stages) write it once (DCP deduplicates).

Optimizer state follows its parameter: tensors shaped like the parameter take its block, scalars (Adam's `step`)
are saved whole; under ZeRO-1 each rank saves the states of the parameters its partition owns.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

MODEL, OPTIM, RNG = "model/", "optim/", "rng/"


class Block(torch.Tensor):
    """A rank's rectangular piece `local` of a global tensor of shape `size` at `offsets`: a tensor wrapper that
    only DCP handles (it has no data of its own; reads and writes go to `local` in place)."""

    @staticmethod
    def __new__(cls, local: torch.Tensor, size: tuple[int, ...], offsets: tuple[int, ...]) -> "Block":
        r = torch.Tensor._make_wrapper_subclass(cls, torch.Size(size), dtype=local.dtype, device=local.device)
        r.local, r.offsets = local, torch.Size(offsets)
        return r

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:
            return args[0]
        raise NotImplementedError(f"autopar Block (a checkpoint view) does not run {func}")

    def __repr__(self) -> str:
        return f"Block(size={tuple(self.shape)}, offsets={tuple(self.offsets)}, local={tuple(self.local.shape)})"

    def _chunk(self) -> ChunkStorageMetadata:
        return ChunkStorageMetadata(offsets=self.offsets, sizes=self.local.shape)

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, self.offsets), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=self._chunk(),
                                                      properties=TensorProperties.create_from_tensor(self.local),
                                                      size=self.shape))]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [self._chunk()]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        return self.local


@dataclass(frozen=True)
class Layout:
    """Where this rank's piece of each parameter lies: FQN -> (global shape, offsets)."""
    blocks: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]


def layout(compiled) -> Layout:
    """Blocks of this rank's parameters. Global shapes come from every rank's local shapes (one all-gather of
    shapes, no data): a sharded dim's global size is the sum over the ranks that split it, which holds for uneven
    splits too. An FSDP2 parameter's shape is already that of the plan's piece (FSDP's own cut is local)."""
    coords = {a: compiled.mesh.get_local_rank(a) for a in compiled.mesh.mesh_dim_names}
    mine = {fqn: tuple(compiled.local_parameter(fqn).shape) for fqn in compiled.param_paths}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (coords, mine))
    blocks = {}
    for fqn, shape in mine.items():
        cuts = _plan_cuts(compiled, fqn)
        size = _global_size(fqn, shape, cuts, coords, everyone)
        if hasattr(compiled.local_parameter(fqn), "to_local"):  # FSDP2 (ZeRO-2/3): dim 0 split along dp
            cuts.append(("dp", 0, compiled.mesh.size(compiled.mesh.mesh_dim_names.index("dp"))))
        offsets, sizes = _block(size, cuts, coords)
        local = tuple(_local(compiled.local_parameter(fqn)).shape)
        if sizes != local:
            raise RuntimeError(f"autopar: the block of {fqn} computed for checkpointing ({sizes} at {offsets}) "
                               f"is not its local shape {local}")
        blocks[fqn] = (size, offsets)
    return Layout(blocks)


def _plan_cuts(compiled, fqn: str) -> list[tuple[str, int, int]]:
    """(mesh axis, tensor dim, degree) of each of the plan's cuts of `fqn`, in the order they are made."""
    names = list(compiled.mesh.mesh_dim_names)
    axes = [a for a in compiled.plan.axis_names if a != "pp"]
    return [(axes[i], pl.dim, compiled.mesh.size(names.index(axes[i])))
            for i, pl in enumerate(compiled.param_placements[fqn]) if pl.is_shard]


def _global_size(fqn: str, shape: tuple[int, ...], cuts: list, coords: dict, everyone: list) -> tuple[int, ...]:
    """Each cut dim's size summed over the ranks that differ from this one only along the axes cutting it."""
    size = list(shape)
    for dim in {d for _, d, _ in cuts}:
        split = {a for a, d, _ in cuts if d == dim}
        size[dim] = sum(held[fqn][dim] for c, held in everyone
                        if fqn in held and all(c[a] == coords[a] for a in coords if a not in split))
    return tuple(size)


def _block(size, cuts, coords) -> tuple[tuple[int, ...], tuple[int, ...]]:
    offsets, sizes = [0] * len(size), list(size)
    for axis, dim, n in cuts:  # torch.chunk: pieces of ceil(size / n), the last ones shorter or empty
        piece = math.ceil(sizes[dim] / n)
        start = min(coords[axis] * piece, sizes[dim])
        offsets[dim] += start
        sizes[dim] = min(piece, sizes[dim] - start)
    return tuple(offsets), tuple(sizes)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def model_entries(compiled, lay: Layout) -> dict[str, Block]:
    """`model/<fqn>` -> this rank's block of each parameter it holds (none for an empty block)."""
    out = {}
    for fqn, (size, offsets) in lay.blocks.items():
        local = _local(compiled.local_parameter(fqn).detach())
        if local.numel():
            out[MODEL + fqn] = Block(local, size, offsets)
    return out


def optimizer_entries(compiled, optimizer: torch.optim.Optimizer, lay: Layout) -> dict[str, Any]:
    """`optim/<fqn>/<state>` for the parameters whose state this rank keeps, and `optim/param_groups` (the
    hyper-parameters, e.g. a scheduler's current lr)."""
    inner = _inner(optimizer)
    names = {id(compiled.local_parameter(f)): f for f in compiled.param_paths}
    out: dict[str, Any] = {OPTIM + "param_groups": _hyper(inner)}
    for p, state in inner.state.items():
        fqn = names[id(p)]
        size, offsets = lay.blocks[fqn]
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                out[f"{OPTIM}{fqn}/{key}"] = value
            elif value.dim() == 0:
                out[f"{OPTIM}{fqn}/{key}"] = value
            elif _local(value).numel():
                out[f"{OPTIM}{fqn}/{key}"] = Block(_local(value.detach()), size, offsets)
    return out


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds this rank's states: ZeroRedundancyOptimizer's local one under ZeRO-1."""
    return getattr(optimizer, "optim", optimizer)


def _hyper(optimizer: torch.optim.Optimizer) -> bytes:
    """The param groups' settings, serialised: DCP would otherwise flatten the list into keys of its own."""
    return _to_bytes([{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups])


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create every state tensor (a step with zero gradients at lr 0, parameters unchanged), so a checkpoint
    can be read into them. Collective under ZeRO-1 (the partitions broadcast): call on every rank."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    inner = _inner(optimizer)
    if all(p in inner.state for g in inner.param_groups for p in g["params"]):
        return
    lrs = [g["lr"] for g in optimizer.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p)
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    for p in params:
        p.grad = None


def set_hyper(optimizer: torch.optim.Optimizer, data: bytes) -> None:
    groups = _from_bytes(data)
    for target in {id(o): o for o in (optimizer, _inner(optimizer))}.values():
        for g, saved in zip(target.param_groups, groups):
            g.update(saved)


def rng_state() -> bytes:
    """This rank's random number generators (CPU, and CUDA where present), serialised."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return _to_bytes(state)


def set_rng_state(data: bytes) -> None:
    state = _from_bytes(data)
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _staged(entries: dict[str, Any]) -> dict[str, Any]:
    """A private copy of every tensor (on the CPU) for an asynchronous save: training may change the originals."""
    def copy(v):
        if isinstance(v, Block):
            return Block(v.local.detach().to("cpu", copy=True), tuple(v.shape), tuple(v.offsets))
        return v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v
    return {k: copy(v) for k, v in entries.items()}


def save(compiled, root, optimizer, step: int, data: dict | None, asynchronous: bool):
    """Write the training state of every rank to `root`/step_<step> (see checkpoint_io)."""
    from autopar.runtime import checkpoint_io as io_

    lay = compiled._checkpoint_layout()
    entries: dict[str, Any] = {**model_entries(compiled, lay), f"{RNG}{dist.get_rank()}": rng_state()}
    if optimizer is not None:
        entries.update(optimizer_entries(compiled, optimizer, lay))
    if asynchronous:
        entries = _staged(entries)
    manifest = {"format": io_.FORMAT, "step": step, "data": dict(data or {}), "world_size": dist.get_world_size(),
                "degrees": dict(compiled.plan.degrees), "optimizer": optimizer is not None,
                "tensors": {f: list(size) for f, (size, _) in lay.blocks.items()},
                "plan": json.loads(compiled.plan.to_json())}
    manifest["tensors"] = _all_tensors(manifest["tensors"])
    return compiled._checkpoint_writer().save(root, step, entries, manifest, asynchronous)


def _all_tensors(mine: dict[str, list[int]]) -> dict[str, list[int]]:
    """Every parameter's global shape, from every pipeline stage."""
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return dict(sorted({k: v for part in parts for k, v in part.items()}.items()))


def load(compiled, root, optimizer):
    """Read the newest complete checkpoint under `root` into the model, the optimizer and the RNGs."""
    from autopar.runtime import checkpoint_io as io_

    compiled._checkpoint_writer().wait()
    manifest = io_.read_manifest(root)
    path = Path(manifest["path"])
    lay = compiled._checkpoint_layout()
    here = _all_tensors({f: list(size) for f, (size, _) in lay.blocks.items()})
    io_.check_tensors(path, manifest["tensors"], {k: tuple(v) for k, v in here.items()})
    io_.verify_files(path, manifest)
    same = manifest["world_size"] == dist.get_world_size() and manifest["degrees"] == dict(compiled.plan.degrees)
    rng_key = f"{RNG}{dist.get_rank() if same else 0}"
    entries: dict[str, Any] = {**model_entries(compiled, lay), rng_key: None}
    if optimizer is not None:
        if not manifest.get("optimizer"):
            raise io_.CheckpointError(f"checkpoint {path} holds no optimizer state; load it without an optimizer "
                                      "(compiled.load(dir, optimizer=None)) to start a new optimizer from it")
        init_optimizer_state(optimizer)
        entries.update(optimizer_entries(compiled, optimizer, lay))
        entries[OPTIM + "param_groups"] = None
    io_.load(path, entries)
    if optimizer is not None:
        set_hyper(optimizer, entries[OPTIM + "param_groups"])
        _restore_non_tensor(compiled, optimizer, entries)
    set_rng_state(entries[rng_key])
    return io_.TrainingState(step=manifest["step"], data=manifest["data"], path=str(path), plan=manifest["plan"])


def _restore_non_tensor(compiled, optimizer, entries: dict[str, Any]) -> None:
    """Optimizer state values that are not tensors came back as objects: put them back into the state."""
    inner = _inner(optimizer)
    names = {id(compiled.local_parameter(f)): f for f in compiled.param_paths}
    for p, state in inner.state.items():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                state[key] = entries[f"{OPTIM}{names[id(p)]}/{key}"]
