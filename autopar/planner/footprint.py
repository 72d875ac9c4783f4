"""Memory per device and recompute time of a candidate, as terms linear in the strategy choice.

Each term is (owner node, part, one value per strategy of that owner): the ILP adds sum value[s] * x[owner, s]
(ilp.py), and the prediction evaluates the same terms at the chosen strategies (predict.py), so the solver and the
report never disagree about what a plan needs.

The peak is the larger of two moments of a step (measured on CPU ranks; tests/benchmarks/bench_memory.py):
  backward start  model state + every saved activation + the transients of the block being recomputed;
  backward end    model state + every gradient + the gradient bucket being flattened (stages 0/1).
Gradients grow as activations are freed, so between the two the sum stays below the larger. With gradient
accumulation (more than one micro-batch) gradients also exist at the second micro-batch's backward start.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from autopar.checkpointing import KEEP_UNDER_SELECTIVE
from autopar.placement import local_shape
from autopar.planner.cost import CostContext, NodeCost, nbytes
from autopar.planner.graph import PlanGraph, PNode
from autopar.planner.memory import state_bytes_per_element, transient_bytes_per_element
from autopar.runtime import BUCKET_BYTES

# part -> the moments it is present at ("start", "end" of backward)
PHASES = {"params": ("start", "end"), "optimizer_state": ("start", "end"), "gathered": ("start", "end"),
          "block_grads": ("end",),
          "activations": ("start",), "inputs": ("start",), "recompute": ("start",), "autocast": ("start",),
          "grads": ("end",), "buckets": ("end",)}
PARTS = tuple(PHASES)
ONE_BLOCK_PARTS = ("gathered", "recompute")  # concern the block at work, not every block


@dataclass(frozen=True)
class Term:
    owner: str
    part: str  # one of PARTS, or "recompute_s" (seconds per micro-batch)
    values: tuple[float, ...]  # per strategy of the owner


def phases(part: str, micro_batches: int) -> tuple[str, ...]:
    if part == "grads" and micro_batches > 1:  # accumulated gradients wait through the next micro-batches
        return ("start", "end")
    return PHASES.get(part, ())


def terms(pg: PlanGraph, ctx: CostContext, costs: dict[str, list[NodeCost]]) -> list[Term]:
    """Every memory term (bytes per device) and recompute term (seconds per micro-batch) of the candidate."""
    out: list[Term] = []
    state = state_bytes_per_element(ctx.memory, ctx.dp)
    transient = transient_bytes_per_element(ctx.memory, ctx.dp)
    bucket = _bucket_share(pg, ctx, costs, state["grads"])
    first_block = _first_block(pg)
    for p in pg.owners():
        name, n, cs = p.node.name, pg.counts[p.node.name], costs[p.node.name]
        if p.kind == "param":
            elems = [c.state_bytes / max(ctx.state_bytes_per_element, 1e-30) for c in cs]
            out += [Term(name, part, tuple(n * e * b for e in elems)) for part, b in state.items()]
            per = _param_transients(p, n, first_block, transient, bucket * state["grads"], ctx.memory.ac)
            out += [Term(name, part, tuple(e * b for e in elems)) for part, b in per.items()]
        elif p.kind != "op":
            out.append(Term(name, "inputs", tuple(n * c.activation_bytes for c in cs)))
        else:
            out += _activation_terms(p, n, cs, ctx.memory.ac)
    out += block_input_terms(pg, ctx)
    return [t for t in out if any(t.values)]


def _param_transients(p: PNode, n: int, first_block: str | None, t: dict[str, float], bucket: float,
                      ac: str) -> dict[str, float]:
    """Bytes per element of this parameter: ZeRO gathers and gradient buffers concern one block (the template's
    parameters stand for it) or, for top-level parameters, every one of them; buckets and autocast copies every
    parameter. A block's unsharded gradient appears as its backward runs, after the activations saved for it are
    freed, so without full checkpointing it counts at backward end only; under full checkpointing the peak is
    inside a block's backward (recomputed activations and its gradient together)."""
    first = p.block is not None and p.block == first_block
    gathered = n * t["gathered_top"] if p.block is None else (t["gathered_block"] if first else 0.0)
    block_grad = t["block_grad"] if first else 0.0
    if ac == "full":
        return {"gathered": gathered + block_grad, "buckets": n * bucket, "autocast": n * t["autocast_copy"]}
    return {"gathered": gathered, "block_grads": block_grad, "buckets": n * bucket, "autocast": n * t["autocast_copy"]}


def _bucket_share(pg: PlanGraph, ctx: CostContext, costs: dict[str, list[NodeCost]], grad_bytes: float) -> float:
    """Fraction of the gradients held twice at once under DDP-style bucketing (ZeRO-0/1 with dp > 1): one bucket
    while it is flattened, i.e. min(1, bucket / gradients), with the gradients at their largest placement (a
    linear stand-in for the min)."""
    if ctx.dp <= 1 or ctx.memory.zero >= 2:
        return 0.0
    per = max(ctx.state_bytes_per_element, 1e-30)
    most = sum(pg.counts[p.node.name] * max(c.state_bytes for c in costs[p.node.name]) / per * grad_bytes
               for p in pg.owners() if p.kind == "param")
    return min(1.0, BUCKET_BYTES / most) if most else 0.0


def _activation_terms(p: PNode, n: int, cs: list[NodeCost], ac: str) -> list[Term]:
    name = p.node.name
    if ac == "none" or p.block is None:
        return [Term(name, "activations", tuple(n * c.activation_bytes for c in cs))]
    # A checkpointed block keeps only its inputs (added by block_input_terms) and, under selective, the outputs of
    # its weight matmuls; the block being recomputed holds its activations once; recomputation costs the forward
    # again for every op not kept.
    out = [Term(name, "recompute", tuple(c.activation_bytes for c in cs))]
    if ac == "selective" and p.node.target in KEEP_UNDER_SELECTIVE:
        out.append(Term(name, "activations", tuple(n * c.out_bytes for c in cs)))
    else:
        out.append(Term(name, "recompute_s", tuple(n * c.fwd_s for c in cs)))
    return out


def block_input_terms(pg: PlanGraph, ctx: CostContext) -> list[Term]:
    """Under checkpointing each block keeps the activations it receives from outside (the residual stream), at
    the placement their producer made them in."""
    if ctx.memory.ac == "none":
        return []
    seen: set[tuple[str, str, int]] = set()
    acc: dict[tuple[str, int], float] = defaultdict(float)
    for p in pg.nodes.values():
        if p.kind != "op" or p.block is None:
            continue
        for prod, k in p.inputs:
            q = pg.nodes[prod]
            if q.block == p.block or q.kind not in ("op", "input") or (p.block, prod, k) in seen:
                continue
            seen.add((p.block, prod, k))
            acc[(q.owner, k)] += 1
    out = []
    for (owner, k), count in acc.items():
        q = pg.nodes[owner]
        if not q.info.out_dtypes[k].is_floating_point:
            continue
        values = tuple(count * nbytes(local_shape(q.info.out_shapes[k], s.outs[k], ctx.degrees), q.info.out_dtypes[k])
                       for s in q.strategies)
        out.append(Term(owner, "activations", values))
    return out


def _first_block(pg: PlanGraph) -> str | None:
    """The template block whose parameters stand for "one block" in the transients (the largest class's)."""
    if not pg.block_classes:
        blocks = {p.block for p in pg.nodes.values() if p.block is not None}
        return min(blocks) if blocks else None
    return max(pg.block_classes, key=len)[0]


def evaluate(all_terms: list[Term], choice: dict[str, int]) -> dict[str, float]:
    """Sum of each part at the chosen strategies (`choice`: owner -> strategy index)."""
    total: dict[str, float] = defaultdict(float)
    for t in all_terms:
        total[t.part] += t.values[choice[t.owner]]
    return dict(total)


def peak(parts: dict[str, float], micro_batches: int) -> tuple[str, dict[str, float]]:
    """(the moment of the peak, the parts present then)."""
    at = {phase: {k: v for k, v in parts.items() if phase in phases(k, micro_batches)} for phase in ("start", "end")}
    moment = max(at, key=lambda ph: sum(at[ph].values()))
    return moment, at[moment]
