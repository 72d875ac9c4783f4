"""Random ops made exact, or refused: checks at compile time that the plan draws what one process would.

The planning graph runs every random op whole on every rank (planner/graph.py `draws_random`); that is exact only
when (a) every rank's generator starts in the same state, and (b) the ops draw in the order one process would:
with several micro-batches, one process draws op 1 for the whole batch then op 2, a split step draws op 1 and op 2
per micro-batch. A single random op draws the same numbers either way (consecutive draws from one stream), so
only (b) with two or more random ops is refused.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from autopar.errors import PlanError
from autopar.planner.graph import PlanGraph, draws_random


def check_random_ops(pg: PlanGraph, micro_batches: int, pipeline: bool) -> None:
    """Raise PlanError if the plan cannot draw this graph's random numbers as one process does."""
    random = [p.node for p in pg.nodes.values() if p.kind == "op" and draws_random(p.node)]
    if not random:
        return
    names = ", ".join(f"{n.name} ({n.target})" for n in random[:4])
    if (micro_batches > 1 or pipeline) and len(random) > 1:
        raise PlanError(f"the model draws random numbers in {len(random)} ops ({names}); split into {micro_batches} "
                        "micro-batches they draw in another order than one process does, so the step could not "
                        "match it. Pin one micro-batch (fix mbs=<batch / dp>, per replica, and pp=1) or make those ops "
                        "deterministic (dropout p=0 / model.eval())")
    state = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    if len(set(states)) > 1:
        raise PlanError(f"the model draws random numbers ({names}) and the ranks' random generators differ; every "
                        "rank runs those ops whole and must draw the same numbers: call torch.manual_seed(seed) "
                        "with the same seed on every rank before autopar.compile")
