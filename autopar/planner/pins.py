"""Per-module pins: which strategies of which nodes a `--pin GLOB=INTENT` leaves to the ILP.

A pin names matmul-like nodes by their module path (fnmatch glob over `PNode.module`, e.g. `blocks.*.mlp.*`) and an
intent on the tp axis (fixspec.PIN_INTENTS). The ILP then fixes x[n,s] = 0 for every other strategy of those nodes
(ShardingILP.add_pin_constraints); the rest of the graph is searched as usual. Repeated layers share decisions, so a
pin that matches a node pins its owner: the whole class of identical blocks.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from autopar.errors import PlanError
from autopar.placement import P
from autopar.planner.graph import PlanGraph, PNode
from autopar.strategies import Strategy


def pinned_strategies(pg: PlanGraph, pins: dict[str, str]) -> dict[str, list[int]] | None:
    """Owner node -> indices of the strategies its pins allow; None if a pin cannot hold on this mesh (no tp axis,
    or no strategy of a matched node meets it). Raises PlanError for a glob that matches no matmul module."""
    allowed: dict[str, set[int]] = {}
    for glob, intent in pins.items():
        nodes = [p for p in pg.nodes.values() if _weighted_matmul(pg, p) and fnmatchcase(p.module, glob)]
        if not nodes:
            raise PlanError(f"--pin {glob}={intent} matches no module with a weight matmul; module paths look like "
                            f"{_examples(pg)}")
        for p in nodes:
            owner = pg.nodes[p.owner]
            keep = {k for k, s in enumerate(owner.strategies) if _meets(pg, owner, s, intent)}
            allowed[owner.node.name] = allowed.get(owner.node.name, keep) & keep
    if any(not keep for keep in allowed.values()):
        return None
    return {owner: sorted(keep) for owner, keep in allowed.items()}


def _weighted_matmul(pg: PlanGraph, p: PNode) -> bool:
    return p.kind == "op" and p.rule is not None and p.rule.is_matmul and bool(_weights(pg, p))


def _weights(pg: PlanGraph, p: PNode) -> list[int]:
    return [j for j, (n, _) in enumerate(p.inputs) if pg.nodes[n].kind == "param" and len(p.info.in_shapes[j]) >= 2]


def _meets(pg: PlanGraph, p: PNode, s: Strategy, intent: str) -> bool:
    if "tp" not in pg.axis_names or pg.degrees[pg.axis_names.index("tp")] == 1:
        return False
    axis = pg.axis_names.index("tp")
    if not all(s.ins[j][axis].is_shard for j in _weights(pg, p)):
        return False
    partial = s.outs[0][axis] == P  # contracted dim split: Megatron's row-parallel linear
    return intent == "tp" or (intent == "row") == partial


def _examples(pg: PlanGraph) -> str:
    paths = list(dict.fromkeys(p.module for p in pg.nodes.values() if _weighted_matmul(pg, p)))
    return ", ".join(paths[:4]) + (", ..." if len(paths) > 4 else "")
