"""Collective time in the alpha-beta model, and which link each mesh axis uses.

Ring algorithms (Thakur, Rabenseifner & Gropp, "Optimization of Collective Communication Operations in MPICH",
IJHPCA 19(1), 2005, §4), for n ranks, B bytes, per-step latency α and per-device bandwidth bw:

    all_reduce      2(n-1)·α + 2(n-1)/n · B/bw    reduce-scatter then all-gather
    all_gather       (n-1)·α +  (n-1)/n · B/bw    B = gathered (output) bytes per rank
    reduce_scatter   (n-1)·α +  (n-1)/n · B/bw    B = unscattered (input) bytes per rank
    all_to_all       (n-1)·α +  (n-1)/n · B/bw    pairwise exchange; each rank keeps 1/n of its B
    send_recv              α +           B/bw

α and bw are the link's, or the kind's own where the hardware file has them (`Link.alpha_beta`).
`Link.bandwidth_bytes_per_s` is the NCCL-tests "bus bandwidth" (nccl-tests/doc/PERFORMANCE.md), defined so that
exactly these (n-1)/n factors turn it back into wall time; that is why the TOMLs quote busbw, not link rates.
"""

from __future__ import annotations

import math
from typing import Sequence

from autopar.errors import MeshError

from .hardware import COLLECTIVES, Hardware, Link


def collective_time_s(kind: str, nbytes: float, group_size: int, link: Link) -> float:
    """Seconds for one collective of `kind` over `group_size` ranks on `link`; see the module docstring for B."""
    if kind not in COLLECTIVES:
        raise ValueError(f"unknown collective '{kind}'; expected one of: {', '.join(COLLECTIVES)}")
    if group_size < 1 or nbytes < 0:
        raise ValueError(f"collective needs group_size >= 1 and nbytes >= 0, got {group_size} and {nbytes}")
    n = group_size
    # One rank, or nothing to move: the collective is skipped, so it costs nothing.
    if n == 1 or nbytes == 0:
        return 0.0
    alpha, bandwidth = link.alpha_beta(kind)
    transfer_s = nbytes / bandwidth
    if kind == "all_reduce":
        return 2 * (n - 1) * alpha + 2 * (n - 1) / n * transfer_s
    if kind == "send_recv":
        return alpha + transfer_s
    return (n - 1) * alpha + (n - 1) / n * transfer_s


def latency_s(kind: str, group_size: int, link: Link) -> float:
    """The α part of `collective_time_s`: what one collective of `kind` costs however little it moves."""
    return collective_time_s(kind, 1.0, group_size, link) - collective_time_s(kind, 1.0, group_size,
                                                                               link.without_latency())


def exposed_s(hw: Hardware, comm_s: float, compute_s: float) -> float:
    """Seconds of `comm_s` of collectives left on the critical path when they run beside `compute_s` of compute:
    the hardware's `comm_overlap` share of the compute hides comm, and the rest of the comm is exposed (at
    overlap 1 that is max(0, comm - compute); at 0, all of it)."""
    f = hw.comm_overlap
    return max(0.0, comm_s - f * compute_s, (1.0 - f) * comm_s)


def axis_links(hw: Hardware, degrees: Sequence[tuple[str, int]]) -> dict[str, Link]:
    """The link each mesh axis's collectives cross, for axes listed outermost first (row-major rank layout).

    Ranks are numbered so the last axis is innermost: with [("dp", 4), ("tp", 8)], tp groups are ranks 0-7,
    8-15, ... and dp groups are {0, 8, 16, 24}, ... An axis uses `intra_node` only if every one of its groups sits
    on one node (node = rank // devices_per_node); a ring is as slow as its slowest hop, so one group that
    straddles nodes puts the whole axis on `inter_node`. Degree-1 axes never communicate and map to `intra_node`.
    """
    _check_degrees(degrees)
    world = math.prod(degree for _, degree in degrees)
    links: dict[str, Link] = {}
    for i, (axis, degree) in enumerate(degrees):
        inner = math.prod(d for _, d in degrees[i + 1 :])
        inside = degree == 1 or _groups_inside_nodes(degree, inner, world, hw.devices_per_node)
        links[axis] = hw.intra_node if inside else hw.inter_node
    return links


def _groups_inside_nodes(degree: int, inner: int, world: int, devices_per_node: int) -> bool:
    # A group is {first + k·inner : k < degree}; its ranks increase with k, so it lies on one node exactly when its
    # first and last ranks do. Group starts are the ranks whose coordinate on this axis is 0.
    span = degree * inner
    last_offset = (degree - 1) * inner
    return all(
        first // devices_per_node == (first + last_offset) // devices_per_node
        for block in range(0, world, span)
        for first in range(block, block + inner)
    )


def _check_degrees(degrees: Sequence[tuple[str, int]]) -> None:
    names = [axis for axis, _ in degrees]
    if len(set(names)) != len(names):
        raise MeshError(f"mesh axes {names} repeat a name; give each axis a distinct name")
    for axis, degree in degrees:
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
            raise MeshError(f"mesh axis '{axis}' has degree {degree!r}; degrees must be whole numbers >= 1")


def ring_attention_s(hw: Hardware, link: Link, kv_bytes: float, cp: int, attention_fwd_s: float,
                     attention_bwd_s: float, grad_bytes: float | None = None) -> tuple[float, float]:
    """(communication seconds, of them exposed) of one causal ring attention over `cp` ranks on `link`, forward and
    backward (autopar/codegen/ring_attention.py).

    `kv_bytes`: one rank's K and V together; `attention_{fwd,bwd}_s`: one rank's whole local attention compute (its
    1/cp of the causal work, load-balanced). The ring runs cp steps of equal work (each a 1/cp share): forward, K/V
    hop to the next rank cp-1 times, each hop beside one step's attention (Liu et al. 2023, arXiv 2310.01889,
    Sec. 3: the transfer hides when a block's compute outlasts it); backward, K/V hop cp-1 times and the dK/dV
    accumulators (`grad_bytes`, fp32: twice bf16 K/V) cp times, each beside one step's backward, the last one
    (bringing dK/dV home) with nothing to hide behind.
    """
    if cp <= 1:
        return 0.0, 0.0
    grad_bytes = kv_bytes if grad_bytes is None else grad_bytes
    hop = collective_time_s("send_recv", kv_bytes, 2, link)
    grad_hop = collective_time_s("send_recv", grad_bytes, 2, link)
    fwd_step, bwd_step = attention_fwd_s / cp, attention_bwd_s / cp
    comm = (cp - 1) * hop + (cp - 1) * hop + cp * grad_hop
    exposed = (cp - 1) * exposed_s(hw, hop, fwd_step) + (cp - 1) * exposed_s(hw, hop + grad_hop, bwd_step) + grad_hop
    return comm, exposed
