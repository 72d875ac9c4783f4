"""What one rank measures, phase by phase, and how the ranks' measurements come together on rank 0.

Phases: the launch floor and memory streams, matmuls per dtype and size, fused attention and transcendental ops
(forward and backward), then collectives on each link class the ranks span, with one all-reduce also timed
against concurrent compute (how much of it compute hides): `intra_node` among ranks that share a host,
`inter_node` among ranks with the same local index on different hosts (one host measures only `intra_node`);
last, on a CPU host, FSDP2's own work per parameter on a one-rank mesh. The process group is passed in, never
global state.
"""

from __future__ import annotations

import os
import platform
import socket
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from .collectives import CommSample, OverlapSample, collective_samples, overlap_sample
from .microbench import (DTYPES, ComputeSample, attention_samples, fsdp_overhead_fit, launch_sample, matmul_samples,
                         shaped_matmul_samples, stream_samples, transcendental_samples)


@dataclass(frozen=True)
class ProfileConfig:
    """How much to measure. At world 2 on a 2-core CPU the default measures for 25-40 s, `quick()` for 5-10 s."""

    matmul_sizes: tuple[int, ...] = (256, 512, 1024, 2048)  # n of n x n x n; model-sized, to fit the efficiency
    stream_numels: tuple[int, ...] = (2**21, 2**23, 2**25)  # float32 elements: 8, 32 and 128 MiB buffers
    message_bytes: tuple[int, ...] = tuple(4**k for k in range(1, 14))  # 4 B .. 64 MiB
    budget_s: float = 0.25  # wall time per timed measurement, split over 3 repeats

    @classmethod
    def quick(cls) -> ProfileConfig:
        return cls(matmul_sizes=(256, 512, 1024), stream_numels=(2**21, 2**23),
                   message_bytes=tuple(8**k for k in range(1, 9)), budget_s=0.06)


@dataclass
class RankMeasurements:
    rank: int
    host: str
    device_name: str
    compute: list[ComputeSample] = field(default_factory=list)
    comm: list[CommSample] = field(default_factory=list)
    memory_total_bytes: int = 0
    memory_available_bytes: int = 0  # free for training when measured, after this rank's runtime started
    overlap: list[OverlapSample] = field(default_factory=list)  # one per link class this rank measured
    fsdp_per_param_s: dict[int, float] = field(default_factory=dict)  # ZeRO stage -> FSDP2's host seconds
    fsdp_per_byte_s: dict[int, float] = field(default_factory=dict)  # ZeRO stage -> and per parameter byte


def measure_rank(device: torch.device, config: ProfileConfig, say: Callable[[str], None]) -> RankMeasurements:
    """Run every phase on this rank (all ranks call it together) and return what this rank measured."""
    start = time.perf_counter()
    rank, world = dist.get_rank(), dist.get_world_size()
    hosts: list[str] = [""] * world
    dist.all_gather_object(hosts, socket.gethostname())
    out = RankMeasurements(rank, hosts[rank], device_name(device))
    layout = link_layout(hosts)
    fsdp = device.type == "cpu"  # on a GPU FSDP's host work runs ahead of the kernels: not measured, counted as 0
    phases = 3 + len(layout) + fsdp
    say(f"[1/{phases}] launch floor and memory bandwidth ({stream_mib(config.stream_numels)} MiB float32 streams)")
    out.compute.append(launch_sample(device, config.budget_s))
    out.compute += stream_samples(device, list(config.stream_numels), config.budget_s)
    sizes = "..".join(str(n) for n in (config.matmul_sizes[0], config.matmul_sizes[-1]))
    dtype = "bfloat16" if device.type == "cuda" else "float32"  # what training runs matmuls and attention in
    say(f"[2/{phases}] matmul throughput, {', '.join(DTYPES)} at n = {sizes}, and {dtype} at layer shapes "
        f"(+{time.perf_counter() - start:.0f} s)")
    out.compute += matmul_samples(device, list(DTYPES), list(config.matmul_sizes), config.budget_s)
    out.compute += shaped_matmul_samples(device, dtype, config.budget_s)
    say(f"[3/{phases}] {dtype} attention and gelu/silu/softmax, forward + backward "
        f"(+{time.perf_counter() - start:.0f} s)")
    out.compute += attention_samples(device, dtype, config.budget_s)
    out.compute += transcendental_samples(device, config.budget_s)
    for i, (link, groups) in enumerate(layout.items(), start=4):
        say(f"[{i}/{phases}] {link} collectives, {len(groups[0])} ranks per group, messages "
            f"{config.message_bytes[0]} B..{config.message_bytes[-1] // 2**20} MiB "
            f"(+{time.perf_counter() - start:.0f} s)")
        group = _my_group(groups, world)
        if group is not None:
            out.comm += collective_samples(link, group, device, list(config.message_bytes), config.budget_s)
            out.overlap.append(overlap_sample(link, group, device, config.budget_s))
    if fsdp:
        say(f"[{phases}/{phases}] FSDP2's own work per parameter, on a one-rank mesh "
            f"(+{time.perf_counter() - start:.0f} s)")
        alone, _ = dist.new_subgroups_by_enumeration([[r] for r in range(world)])  # every rank creates all
        mesh = DeviceMesh.from_group(alone, "cpu")
        for z in (2, 3):
            out.fsdp_per_param_s[z], out.fsdp_per_byte_s[z] = fsdp_overhead_fit(mesh, z == 3, config.budget_s)
    out.memory_total_bytes, out.memory_available_bytes = memory_bytes(device)
    dist.barrier(device_ids=[device.index]) if device.type == "cuda" else dist.barrier()
    return out


def gather_on_rank0(mine: RankMeasurements) -> list[RankMeasurements] | None:
    """Every rank's measurements on rank 0 (None elsewhere)."""
    everyone = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, everyone, dst=0)
    return everyone  # type: ignore[return-value]


def link_layout(hosts: list[str]) -> dict[str, list[list[int]]]:
    """Groups of global ranks to measure each link class on; a class with no group of 2+ ranks is absent."""
    by_host: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        by_host.setdefault(host, []).append(rank)
    per_host = list(by_host.values())
    intra = [ranks for ranks in per_host if len(ranks) >= 2]
    deepest = max(len(ranks) for ranks in per_host)
    inter = [[ranks[i] for ranks in per_host if i < len(ranks)] for i in range(deepest)]
    layout = {"intra_node": intra, "inter_node": [g for g in inter if len(g) >= 2]}
    return {link: groups for link, groups in layout.items() if groups}


def _my_group(groups: list[list[int]], world: int) -> dist.ProcessGroup | None:
    if groups == [list(range(world))]:
        return dist.group.WORLD
    # Every rank creates every subgroup (torch requires it) and gets back the one it belongs to, if any.
    mine, _ = dist.new_subgroups_by_enumeration(groups)
    return mine


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_bytes(device: torch.device) -> tuple[int, int]:
    """(total, available) device memory: the GPU's, or the host RAM that CPU ranks share."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        return total, free
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total, _meminfo_available() or total


def _meminfo_available() -> int | None:
    try:
        for line in open("/proc/meminfo", encoding="utf-8"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the file states kB, meaning KiB
    except OSError:
        pass
    return None


def stream_mib(numels: tuple[int, ...]) -> str:
    return ", ".join(str(4 * n // 2**20) for n in numels)
