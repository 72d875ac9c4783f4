"""Checkpoints on disk: DCP's sharded files in a folder per step, written atomically, read under any plan.

    DIR/step_00000005/   .metadata, __<rank>_<n>.distcp (torch.distributed.checkpoint, FileSystemWriter)
                         autopar.json   the manifest: format, step, data position, the plan that wrote it, every
                                        tensor's global shape, every file's size and CRC-32
                         COMPLETE       written last: the folder holds a whole checkpoint

A save writes DIR/.tmp-step_00000005 and renames it once every rank's files, the manifest and the marker are in
it, so a process killed mid-save leaves the previous checkpoint as the newest complete one (`latest`); the next
save of that step removes the leftover. An asynchronous save copies the state (staging) and returns; DCP's
`async_save` writes it from a thread over a gloo group of its own, and `wait()` finishes it.
"""

from __future__ import annotations

import json
import re
import shutil
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import AsyncStager

from autopar.errors import CheckpointError

FORMAT = 1  # bumped when a newer autopar writes what this one cannot read
MANIFEST, MARKER = "autopar.json", "COMPLETE"
STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass(frozen=True)
class TrainingState:
    """What `load` restored besides the tensors."""
    step: int  # optimizer steps taken when saved
    data: dict[str, Any] = field(default_factory=dict)  # the data position the trainer saved (e.g. batches drawn)
    path: str = ""  # the checkpoint folder read
    plan: dict[str, Any] = field(default_factory=dict)  # the plan that wrote it (JSON)


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root` (or `root` itself if it is one); None if there is none."""
    root = Path(root)
    if (root / MARKER).exists():
        return root
    if not root.is_dir():
        return None
    done = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / MARKER).exists()]
    return max(done)[1] if done else None


def read_manifest(path: str | Path) -> dict:
    """The manifest of checkpoint folder `path`, checked for a format this autopar reads."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint folder {path} does not exist; give a folder written by compiled.save "
                              "(or examples/train.py --checkpoint-dir)")
    found = latest(path)
    if found is None:
        raise CheckpointError(f"{path} holds no complete checkpoint (no {MARKER} marker in it or in a step_* "
                              "folder); give a folder written by compiled.save")
    try:
        manifest = json.loads((found / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {found}: {MANIFEST} cannot be read ({e}); the checkpoint is damaged, "
                              "load an earlier one") from None
    version = manifest.get("format")
    if not isinstance(version, int) or version > FORMAT:
        raise CheckpointError(f"checkpoint {found} has format {version!r}, newer than the format {FORMAT} this "
                              "autopar reads; upgrade autopar to load it")
    manifest["path"] = str(found)
    return manifest


class _Staged(AsyncStager):
    """The state handed to async_save is already a private copy (`stage` in Checkpointer.save)."""
    _synchronize_after_execute = False

    def stage(self, state_dict):
        return state_dict


class Writer:
    """Saves of one compiled model: at most one asynchronous save in flight (`wait` finishes it)."""

    def __init__(self) -> None:
        self._group = None
        self._pending: tuple[Future, Any] | None = None
        self._pool: ThreadPoolExecutor | None = None

    def save(self, root: str | Path, step: int, state: dict[str, Any], manifest: dict, asynchronous: bool) -> Path:
        self.wait()
        final = step_dir(root, step)
        tmp = final.with_name(".tmp-" + final.name)
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a save killed midway left it
            tmp.mkdir(parents=True)
        dist.barrier()
        if not asynchronous:
            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp)))
            self._finish(tmp, final, manifest, None)
            return final
        if self._group is None:  # the thread's collectives must not interleave with training's on one group
            self._group = dist.new_group(backend="gloo")
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="autopar-checkpoint")
        upload = dcp.async_save(state, storage_writer=dcp.FileSystemWriter(str(tmp)), process_group=self._group,
                                async_stager=_Staged())
        self._pending = (self._pool.submit(self._finish, tmp, final, manifest, upload), final)
        return final

    def wait(self) -> None:
        """Finish the asynchronous save in flight, if any (its folder is complete when this returns)."""
        if self._pending is not None:
            future, _ = self._pending
            self._pending = None
            future.result()

    def close(self) -> None:
        """Finish any save and stop the writer's thread (before the process group is destroyed)."""
        self.wait()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _finish(self, tmp: Path, final: Path, manifest: dict, upload: Future | None) -> None:
        """Every rank's files are written: checksum them, then rank 0 writes the manifest and marker and renames."""
        group = self._group if upload is not None else None
        if upload is not None:
            upload.result()
        rank = dist.get_rank()
        mine = {p.name: _digest(p) for p in tmp.iterdir() if p.name.startswith(f"__{rank}_")}
        files: list = [None] * dist.get_world_size()
        dist.all_gather_object(files, mine, group=group)
        if rank == 0:
            meta = tmp / ".metadata"
            listed = {k: v for part in files for k, v in part.items()}
            listed[meta.name] = _digest(meta)
            (tmp / MANIFEST).write_text(json.dumps({**manifest, "files": listed}, indent=1))
            (tmp / MARKER).write_text("")
            old = final.with_name(".old-" + final.name)
            if final.exists():  # the same step saved again (a resumed run): replace it
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        dist.barrier(group=group)


def _digest(path: Path) -> list[int]:
    """[bytes, CRC-32]: a truncated or corrupted file is told apart from a good one before DCP reads it."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return [path.stat().st_size, crc]


def damaged(path: Path, manifest: dict, rank: int = 0, world: int = 1) -> list[str]:
    """What is wrong with the files of checkpoint `path` (every `world`-th from `rank`): missing, truncated,
    corrupted (CRC-32)."""
    bad = []
    for i, (name, (size, crc)) in enumerate(sorted(manifest["files"].items())):
        if i % world != rank:
            continue
        f = path / name
        if not f.exists():
            bad.append(f"{name} is missing")
        elif f.stat().st_size != size:
            bad.append(f"{name} has {f.stat().st_size} bytes, {size} were written (truncated?)")
        elif _digest(f)[1] != crc:
            bad.append(f"{name} does not match its CRC-32 (corrupted)")
    return bad


def verify_files(path: Path, manifest: dict) -> None:
    """Every rank checks a share of the files; all agree on the findings (one error, the same on every rank)."""
    world = dist.get_world_size()
    found: list = [None] * world
    dist.all_gather_object(found, damaged(path, manifest, dist.get_rank(), world))
    bad = sorted(b for part in found for b in part)
    if bad:
        raise CheckpointError(f"checkpoint {path} is damaged: {'; '.join(bad)}; load an earlier checkpoint "
                              "(pass its step_* folder)")


def check_tensors(path: Path, saved: dict[str, list[int]], expected: dict[str, tuple[int, ...]]) -> None:
    """The checkpoint must hold this model's parameters under the same names and global shapes."""
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    shapes = sorted(f"{k} {tuple(saved[k])} saved, {tuple(expected[k])} here" for k in expected
                    if k in saved and tuple(saved[k]) != tuple(expected[k]))
    parts = ([f"missing {_few(missing)}"] if missing else []) + ([f"unknown {_few(extra)}"] if extra else []) + \
        ([f"shapes differ: {_few(shapes)}"] if shapes else [])
    if parts:
        raise CheckpointError(f"checkpoint {path} is of another model: {'; '.join(parts)}; load a checkpoint of "
                              "this model (same names and shapes), or start without one")


def _few(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def load(path: Path, state: dict[str, Any]) -> None:
    """Read `path` into `state` in place (DCP reshards each block from whatever blocks were saved)."""
    try:
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(path)))
    except Exception as e:  # noqa: BLE001 - DCP wraps every rank's failure; name the checkpoint
        raise CheckpointError(f"checkpoint {path} could not be read ({str(e).splitlines()[0][:300]}); load an "
                              "earlier checkpoint") from None
