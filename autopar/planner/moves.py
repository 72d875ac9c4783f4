"""Redistributions as codegen emits them: one move per (producing node, output, target placement), shared by every
consumer that reads the value in that placement (codegen/emit.py `_input_value`: q, k and v read one all-gathered
input). The ILP (ilp.py), the prediction (predict.py) and the pipeline pieces (staging.py) all count moves here, so
the solver's objective and the report price the same collectives.

Repeated layers share decisions, so moves are counted by class: an `EdgeGroup` is a producer owner's output k
together with the consumer classes (consumer owner, input position) that one producing node feeds; `count` is how
many producing nodes feed exactly those classes. Each of them makes one move per distinct target its readers choose.
(The residual stream of blocks 0..L-2 feeds the next block's norm and add; that of block L-1 feeds the final norm:
two groups. A RoPE buffer feeds every block: one producing node, one move per target, whatever the depth.)
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from autopar.placement import Placement
from autopar.planner.cost import CostContext, recomputed, saved_kinds
from autopar.planner.graph import PlanGraph, PNode
from autopar.strategies import Strategy, grad_partial_axes

Target = tuple[tuple[Placement, ...], tuple[int, ...]]  # (placement, axes whose input gradient is a partial sum)


@dataclass(frozen=True)
class EdgeGroup:
    producer: str  # owner of the producing nodes
    k: int  # their output index
    readers: tuple[tuple[str, int], ...]  # consumer classes (consumer owner, input position), in graph order
    count: int  # producing nodes feeding exactly these classes


@dataclass(frozen=True)
class Role:
    """What one reader asks of the move it reads: whether it runs again in backward (a checkpointed block moves its
    inputs again, Korthikanti et al. 2022 Sec. 5), and how many copies of the moved tensor autograd keeps for it
    (0: not saved; 1: saved inside a checkpointed block, one block at a time; else one per producing node)."""
    rerun: bool
    held: int


@dataclass(frozen=True)
class Move:
    """One redistribution of the chosen plan, made `count` times per micro-batch."""
    producer: str
    k: int
    src: tuple[Placement, ...]
    dst: tuple[Placement, ...]
    partial: tuple[int, ...]
    count: int
    rerun: bool  # some reader is recomputed in backward
    held: int  # copies kept: the most any reader keeps
    reader: str  # the reader counted most (for where the time is spent)
    keeper: str | None  # the reader whose copies are kept, if any


def target(pp: PNode, s: Strategy, j: int) -> Target:
    return s.ins[j], tuple(grad_partial_axes(s, j)) if pp.requires_grad else ()


def is_free_view(p: PNode) -> bool:
    return p.kind == "op" and p.rule is not None and p.rule.moves_no_data and len(p.inputs) == 1


def takes_as_produced(pg: PlanGraph, prod: str, k: int, cons: str) -> bool:
    """A view costs nothing and moves no data, so it takes its input as produced whenever it can (ilp.py
    `_add_equal_placement`): the edge never moves, and any redistribution happens on the view's output."""
    cp = pg.nodes[cons]
    if not is_free_view(cp):
        return False
    outs = {s.outs[k] for s in pg.nodes[prod].strategies}
    return outs <= {s.ins[0] for s in cp.strategies}


def edge_groups(pg: PlanGraph) -> list[EdgeGroup]:
    """Every producing node's consumer classes, grouped; views taking their input as produced are left out.
    Cached on the graph (one per mesh)."""
    cached = pg.__dict__.get("_edge_groups")
    if cached is not None:
        return cached
    readers: dict[tuple[str, int], dict[tuple[str, int], None]] = defaultdict(dict)
    for p in pg.nodes.values():
        for j, (prod, k) in enumerate(p.inputs):
            readers[(prod, k)][(p.owner, j)] = None
    counts: dict[tuple, int] = defaultdict(int)
    views: dict[tuple, bool] = {}

    def as_produced(owner: str, k: int, cons: str) -> bool:  # once per (producer owner, output, consumer owner)
        if (owner, k, cons) not in views:
            views[(owner, k, cons)] = takes_as_produced(pg, owner, k, cons)
        return views[(owner, k, cons)]

    for (prod, k), classes in readers.items():
        owner = pg.nodes[prod].owner
        kept = tuple(sorted(c for c in classes if not as_produced(owner, k, c[0])))
        if kept:
            counts[(owner, k, kept)] += 1
    groups = [EdgeGroup(prod, k, classes, n) for (prod, k, classes), n in counts.items()]
    pg.__dict__["_edge_groups"] = groups
    return groups


def role(pg: PlanGraph, ctx: CostContext, g: EdgeGroup, cons: str, j: int) -> Role:
    pp, cp = pg.nodes[g.producer], pg.nodes[cons]
    rerun = recomputed(ctx, cp)
    keeps = "inputs" in saved_kinds(cp) and (pp.kind == "param" or j in cp.saved_inputs)
    return Role(rerun, (1 if rerun else g.count) if keeps else 0)


def chosen_moves(pg: PlanGraph, ctx: CostContext, choice: dict[str, int]) -> list[Move]:
    """The moves codegen emits for the chosen strategies (owner -> strategy index)."""
    out = []
    for g in edge_groups(pg):
        pp = pg.nodes[g.producer]
        src = pp.strategies[choice[g.producer]].outs[g.k]
        by_target: dict[Target, list[tuple[str, Role]]] = defaultdict(list)
        for cons, j in g.readers:
            s = pg.nodes[cons].strategies[choice[cons]]
            by_target[target(pp, s, j)].append((cons, role(pg, ctx, g, cons, j)))
        for (dst, partial), readers in by_target.items():
            keeper = max(readers, key=lambda r: r[1].held)
            out.append(Move(g.producer, g.k, src, dst, partial, g.count, any(r.rerun for _, r in readers),
                            keeper[1].held, readers[0][0], keeper[0] if keeper[1].held else None))
    return out
