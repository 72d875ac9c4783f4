"""Redistribution between two placements of one tensor, as an ordered list of per-axis steps.

The planner prices these steps and the code generator emits them, so both always agree. Phase 1 removes every
shard that changes (S -> R by all-gather); phase 2 reaches the target from replicated or partial
(P -> R all-reduce, P -> S reduce-scatter, R -> S local slice, R -> P keep on one rank). Because a legal placement
never shards one tensor dim on two axes, no intermediate state does either.

Each step's backward is the transposed redistribution (Megatron's f/g operators generalised, Shoeybi et al. 2019;
Korthikanti et al. 2022 for the sequence-parallel pair): all-gather <-> slice, all-reduce <-> identity,
reduce-scatter <-> all-gather, keep-on-one-rank <-> identity. When the consumer turns the gradient of a replicated
input into a partial sum on an axis (see `grad_partial_axes`), that axis needs an all-reduce in backward: fused
with a preceding all-gather it becomes a reduce-scatter (sequence parallelism's g-bar), otherwise it is an
identity-forward / all-reduce-backward step (Megatron's f).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from autopar.placement import P, R, Placement


@dataclass(frozen=True)
class Step:
    kind: str  # forward: all_gather | slice | all_reduce | reduce_scatter | keep_one | identity
    axis: int
    dim: int = -1  # tensor dim gathered / sliced / scattered
    bwd: str | None = None  # backward collective: all_gather | reduce_scatter | all_reduce | None (local)


def steps(src: Sequence[Placement], dst: Sequence[Placement], partial_grad_axes: Iterable[int] = ()) -> list[Step]:
    partial = set(partial_grad_axes)
    out: list[Step] = []
    for axis, (a, b) in enumerate(zip(src, dst)):
        if a.is_shard and a != b:
            fused = axis in partial and b == R
            out.append(Step("all_gather", axis, a.dim, "reduce_scatter" if fused else None))
            partial.discard(axis) if fused else None
    for axis, (a, b) in enumerate(zip(src, dst)):
        if a == b:
            continue
        a = R if a.is_shard else a
        if a == P and b == R:
            out.append(Step("all_reduce", axis))
        elif a == P and b.is_shard:
            out.append(Step("reduce_scatter", axis, b.dim, "all_gather"))
        elif a == R and b.is_shard:
            out.append(Step("slice", axis, b.dim, "all_gather"))
        elif a == R and b == P:
            out.append(Step("keep_one", axis))
    out += [Step("identity", axis, bwd="all_reduce") for axis in sorted(partial)]
    return out
