"""Collective microbenchmarks over a live process group: seconds per call by kind and message size.

Message sizes follow the byte conventions of `autopar.cost_models.comm` (the alpha-beta model the fit feeds):
all_gather counts the gathered output per rank, reduce_scatter the unscattered input, all_to_all the buffer each
rank sends, send_recv one message. send_recv pairs group ranks (0, 1), (2, 3), ... and times a ping-pong, whose half
is one message; an odd rank out only joins the timing reductions.

All ranks of the group must call `collective_samples` with the same arguments: the call counts are agreed on
(the slowest rank's warm-up decides), and each timing is the slowest rank's, since a collective ends for everyone
only when it ends for the last rank.

Each timed call follows GAP_S (5 ms) of compute, as every collective in a training step follows compute, and
the time is the mean over calls. Back-to-back calls pipeline: on a CPU host they hide the cost of waking the
backend's threads and of ranks arriving apart, which a training step pays on every call (gloo on 2 vCPUs: a
1 MiB all-reduce takes ~1 ms back to back, ~3 ms after compute).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from autopar.cost_models.comm import COLLECTIVES

from .microbench import synchronizer

ELEMENT_BYTES = 4  # float32 payloads: every backend reduces them
# torch 2.13 renames the tensor forms of all-gather and reduce-scatter; older releases (>= 2.6) have only the old.
_ALL_GATHER = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


@dataclass(frozen=True)
class CommSample:
    link: str  # "intra_node" | "inter_node"
    kind: str  # one of autopar.cost_models.comm.COLLECTIVES
    group_size: int
    nbytes: int  # B as autopar.cost_models.comm defines it for `kind`
    seconds: float  # median over repeats of the slowest rank's time per call


def message_bytes(requested: int, group_size: int) -> int:
    """`requested` rounded up so every rank's shard is a whole number of float32 elements."""
    quantum = ELEMENT_BYTES * group_size
    return max(quantum, -(-requested // quantum) * quantum)


def _collective(kind: str, nbytes: int, group: dist.ProcessGroup, device: torch.device) -> Callable[[], None]:
    n, numel = dist.get_world_size(group), nbytes // ELEMENT_BYTES
    full, shard = torch.ones(numel, device=device), torch.ones(numel // n, device=device)
    if kind == "all_reduce":
        return lambda: dist.all_reduce(full, group=group)
    if kind == "all_gather":
        return lambda: _ALL_GATHER(full, shard, group=group)
    if kind == "reduce_scatter":
        return lambda: _REDUCE_SCATTER(shard, full, group=group)
    if kind == "all_to_all":
        received = torch.empty_like(full)
        return lambda: dist.all_to_all_single(received, full, group=group)
    return _ping_pong(full, group)


def _ping_pong(message: torch.Tensor, group: dist.ProcessGroup) -> Callable[[], None]:
    ranks, me = dist.get_process_group_ranks(group), dist.get_rank(group)
    partner = me ^ 1
    if partner >= len(ranks):
        return lambda: None
    peer = ranks[partner]
    if me % 2 == 0:
        return lambda: (dist.send(message, peer, group=group), dist.recv(message, peer, group=group))
    return lambda: (dist.recv(message, peer, group=group), dist.send(message, peer, group=group))


def _slowest(values: list[float], group: dist.ProcessGroup, device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


GAP_S = 5e-3  # compute before each timed collective: about what separates a step's collectives
MAX_CALLS = 60  # per size: a call's time after compute is heavy-tailed on a CPU host, and the mean is what a step pays


def _time_collective(fn: Callable[[], None], group: dist.ProcessGroup, device: torch.device,
                     budget_s: float, repeats: int) -> float:
    """Mean seconds per call, each call after GAP_S of compute (module docstring); the slowest rank's mean."""
    sync, gap = synchronizer(device), _compute_gap(device, GAP_S)
    start = time.perf_counter()
    fn()
    sync()
    (first,) = _slowest([time.perf_counter() - start], group, device)  # also lines the ranks up
    calls = max(repeats, min(MAX_CALLS, int(2 * budget_s / (first + GAP_S))))
    total = 0.0
    for _ in range(calls):
        gap()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        total += time.perf_counter() - start
    (mean,) = _slowest([total / calls], group, device)
    return mean


def _compute_gap(device: torch.device, seconds: float) -> Callable[[], None]:
    """A closure running about `seconds` of 256 x 256 matmuls on `device`."""
    a, sync = torch.randn(256, 256, device=device), synchronizer(device)
    torch.mm(a, a)
    sync()
    start = time.perf_counter()
    for _ in range(4):
        torch.mm(a, a)
    sync()
    loops = max(1, round(seconds / ((time.perf_counter() - start) / 4)))

    def gap():
        for _ in range(loops):
            torch.mm(a, a)

    return gap


def collective_samples(link: str, group: dist.ProcessGroup, device: torch.device, sizes: list[int],
                       budget_s: float, kinds: tuple[str, ...] = COLLECTIVES, repeats: int = 3) -> list[CommSample]:
    """Time every kind in `kinds` at every size in `sizes` (bytes, rounded by `message_bytes`) on `group`."""
    n, out = dist.get_world_size(group), []
    for kind in kinds:
        for requested in sizes:
            nbytes = message_bytes(requested, n)
            seconds = _time_collective(_collective(kind, nbytes, group, device), group, device, budget_s, repeats)
            if kind == "send_recv":
                seconds /= 2  # a ping-pong is two messages
            out.append(CommSample(link, kind, n, nbytes, seconds))
    return out


@dataclass(frozen=True)
class OverlapSample:
    """A collective and a compute loop timed apart and together (all ranks at once)."""
    link: str
    nbytes: int  # the all-reduce's message
    compute_s: float  # the matmul loop alone
    comm_s: float  # the all-reduce alone
    both_s: float  # the all-reduce started asynchronously, the loop run, then the wait

    @property
    def fraction(self) -> float:
        """How much of the shorter of the two the longer hid: 1 = together took max(compute, comm), 0 = the sum."""
        hidden = self.compute_s + self.comm_s - self.both_s
        return min(1.0, max(0.0, hidden / min(self.compute_s, self.comm_s)))


def overlap_sample(link: str, group: dist.ProcessGroup, device: torch.device, budget_s: float,
                   nbytes: int = 16 * 2**20, repeats: int = 9) -> OverlapSample:
    """Does compute hide a collective running at the same time? NCCL runs on its own stream and SMs, so on a GPU
    together takes about max(compute, comm); gloo on a CPU needs the cores the compute is using, so together
    takes about their sum. The matmul loop is sized to take as long as the all-reduce alone, where the
    difference shows most. Every rank of `group` calls this together; times are the slowest rank's."""
    sync = synchronizer(device)
    nbytes = message_bytes(nbytes, dist.get_world_size(group))
    buf = torch.ones(nbytes // ELEMENT_BYTES, device=device)
    a = torch.randn(256, 256, device=device)
    comm_s = _time_collective(lambda: dist.all_reduce(buf, group=group), group, device, budget_s, repeats)
    start = time.perf_counter()
    for _ in range(8):
        torch.mm(a, a)
    sync()
    (one,) = _slowest([(time.perf_counter() - start) / 8], group, device)
    loops = max(1, round(comm_s / one))  # the same count on every rank: `one` is already the slowest's

    def compute():
        for _ in range(loops):
            torch.mm(a, a)

    def both():
        work = dist.all_reduce(buf, group=group, async_op=True)
        compute()
        work.wait()

    times = []
    for fn in (compute, both):
        samples = []
        for _ in range(repeats):
            _slowest([0.0], group, device)
            start = time.perf_counter()
            fn()
            sync()
            samples.append(time.perf_counter() - start)
        times.append(statistics.median(_slowest(samples, group, device)))
    return OverlapSample(link, nbytes, times[0], comm_s, times[1])
