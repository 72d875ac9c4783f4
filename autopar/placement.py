"""Placements: how one tensor lives on one mesh axis.

`S(d)` sharded on tensor dim d, `R` replicated, `P` partial sum (each rank holds an addend). A tensor on an N-axis
mesh has one placement per axis, written `S0/R` (dp axis first). Gradients follow one convention everywhere in
autopar: the gradient of an `S(d)` tensor is `S(d)`, of an `R` tensor is `R`, of a `P` tensor is `R`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True, slots=True)
class Placement:
    kind: str  # "S" sharded, "R" replicated, "P" partial sum
    dim: int = -1  # tensor dim for "S", -1 otherwise

    def __str__(self) -> str:
        return f"S{self.dim}" if self.kind == "S" else self.kind

    @property
    def is_shard(self) -> bool:
        return self.kind == "S"


R = Placement("R")
P = Placement("P")
_SHARDS: dict[int, Placement] = {}


def S(dim: int) -> Placement:
    if dim not in _SHARDS:
        _SHARDS[dim] = Placement("S", dim)
    return _SHARDS[dim]


Placements = tuple[Placement, ...]  # one per mesh axis


def fmt(placements: Sequence[Placement]) -> str:
    return "/".join(str(p) for p in placements)


def parse(text: str) -> Placements:
    """Inverse of fmt: 'S0/R' -> (S(0), R)."""
    out = []
    for part in text.split("/"):
        if part in ("R", "P"):
            out.append(Placement(part))
        elif part.startswith("S") and part[1:].lstrip("-").isdigit():
            out.append(S(int(part[1:])))
        else:
            raise ValueError(f"bad placement {part!r} in {text!r}: expected R, P or S<dim>")
    return tuple(out)


def local_shape(shape: Sequence[int], placements: Sequence[Placement], degrees: Sequence[int]) -> tuple[int, ...]:
    """Shape of the local shard: each sharded dim divided by the degrees of the axes that shard it."""
    out = list(shape)
    for p, n in zip(placements, degrees):
        if p.is_shard:
            out[p.dim] //= n
    return tuple(out)


def shard_factor(placements: Sequence[Placement], degrees: Sequence[int]) -> int:
    """How many ways the tensor's elements are divided (1 for fully replicated or partial)."""
    f = 1
    for p, n in zip(placements, degrees):
        if p.is_shard:
            f *= n
    return f
