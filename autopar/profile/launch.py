"""Start the ranks a profile runs on, under torchrun or spawned here, and turn rank 0's results into a file.

Under torchrun (RANK/WORLD_SIZE set) every rank runs `run_profile` itself. Otherwise `--nproc N` spawns N workers
with torch.multiprocessing on a free local port. The backend follows the device: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from autopar.errors import AutoparError, MeshError

from .measure import ProfileConfig, RankMeasurements, gather_on_rank0, measure_rank
from .write import HardwareProfile, build_profile, write_profile


@dataclass(frozen=True)
class ProfileRequest:
    out: Path  # the .toml to write
    name: str | None  # the file's `name`; default "cpu" on CPUs, the device's name on GPUs
    quick: bool
    devices_per_node: int | None  # default: GPUs on rank 0's host, or ranks on it for CPUs
    command: str  # the command line, for [provenance]
    raw: Path | None = None  # also write every rank's timings here as JSON


def run_profile(req: ProfileRequest, nproc: int | None, show: Callable[[HardwareProfile, Path, float], None]) -> None:
    """Profile under torchrun (every rank calls this) or spawn `nproc` local ranks; rank 0 writes `req.out`."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if nproc is not None and nproc != int(os.environ["WORLD_SIZE"]):
            raise MeshError(f"--nproc {nproc} disagrees with torchrun's world size {os.environ['WORLD_SIZE']}; "
                            "drop --nproc under torchrun")
        _rank_main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)),
                   "env://", req, show)
        return
    if nproc is None or nproc < 2:
        raise MeshError("autopar profile times collectives between ranks and needs at least 2: pass --nproc 2, "
                        "or run it under `torchrun --nproc_per_node N -m autopar.cli.main profile ...`")
    init = f"tcp://127.0.0.1:{_free_port()}"
    try:
        mp.spawn(_spawned, args=(nproc, init, req, show), nprocs=nproc, join=True)
    except mp.ProcessRaisedException as err:  # the worker's traceback is in the message; its last line says why
        raise AutoparError(f"a profile rank failed: {str(err).strip().splitlines()[-1]}") from None
    except mp.ProcessExitedException as err:
        raise AutoparError(f"a profile rank died ({err}); rerun, or run under torchrun to see its output") from None


def _spawned(rank: int, world: int, init: str, req: ProfileRequest, show: Callable[..., None]) -> None:
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # what torchrun sets for 2+ ranks per host, so both launches measure alike
    _rank_main(rank, world, rank, init, req, show)


def _rank_main(rank: int, world: int, local_rank: int, init: str, req: ProfileRequest,
               show: Callable[[HardwareProfile, Path, float], None]) -> None:
    start = time.perf_counter()
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
    try:
        config = ProfileConfig.quick() if req.quick else ProfileConfig()
        say = (lambda line: print(f"autopar profile {line}", flush=True)) if rank == 0 else (lambda line: None)
        everyone = gather_on_rank0(measure_rank(device, config, say))
        if everyone is not None:
            say(f"fitting and writing {req.out} (+{time.perf_counter() - start:.0f} s)")
            profile = _profile(everyone, req, config, backend, device)
            write_profile(profile, req.out)
            if req.raw is not None:
                req.raw.write_text(json.dumps([asdict(r) for r in everyone], indent=1), encoding="utf-8")
            show(profile, req.out, time.perf_counter() - start)
            if hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1) + 0.5:
                say(f"warning: the host was busy ({profile.provenance['host_load']}); other work slowed what "
                    "was measured, so rerun on an idle machine for numbers the planner should trust")
        # Tear the process group down together: a rank that destroyed it and exited while rank 0 was still
        # fitting aborted now and then in gloo's teardown ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _profile(ranks: list[RankMeasurements], req: ProfileRequest, config: ProfileConfig, backend: str,
             device: torch.device) -> HardwareProfile:
    local = sum(r.host == ranks[0].host for r in ranks)
    if req.devices_per_node is not None:
        per_node, how = req.devices_per_node, f"--devices-per-node {req.devices_per_node}"
    elif device.type == "cuda":
        per_node, how = torch.cuda.device_count(), "torch.cuda.device_count() on rank 0's host"
    else:
        per_node, how = local, "ranks on rank 0's host (CPU ranks are processes; --devices-per-node sets more)"
    name = req.name or ("cpu" if device.type == "cpu" else _slug(ranks[0].device_name))
    return build_profile(ranks, name, per_node, how, config, _provenance(ranks, req, backend))


def _provenance(ranks: list[RankMeasurements], req: ProfileRequest, backend: str) -> dict[str, Any]:
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": ranks[0].host,
        "command": req.command,
        "autopar_version": _version(),
        "torch_version": torch.__version__,
        "backend": backend,
        "devices": " + ".join(sorted({r.device_name for r in ranks})),
        "world_size": len(ranks),
        "nodes": len({r.host for r in ranks}),
        "threads_per_rank": torch.get_num_threads(),
        "host_load": _host_load(),
    }


def _host_load() -> str:
    # The 1-minute load average includes this profile's own ranks; far above the core count means other work
    # shared the cores and every number here is slower than the machine alone.
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"1-minute load average {load:.2f} on {os.cpu_count()} CPUs at the end of the run"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _version() -> str:
    try:
        return metadata.version("autopar")
    except metadata.PackageNotFoundError:
        return "unknown"
