"""Memory per device and recompute time of a candidate, as terms linear in the strategy choice.

Each term is (owner node, part, one value per strategy of that owner): the ILP adds sum value[s] * x[owner, s]
(ilp.py), and the prediction evaluates the same terms at the chosen strategies (predict.py), so the solver and the
report never disagree about what a plan needs.

The peak is the larger of two moments of a step (measured on CPU ranks; tests/benchmarks/bench_memory.py):
  backward start  model state + every saved activation + the block at work: its recomputed activations and its
                  ZeRO transients (memory.py); the loss, last of forward and first of backward, adds what it holds
                  at its own peak (cost.py: an unfused cross-entropy's copies of the logits, the fused one's chunk);
  backward end    model state + every gradient + the gradient bucket being flattened (stages 0/1) or the block's
                  reduce-scatter buffers (stages 2/3) + the block at work, when checkpointing recomputes it: the
                  last block's backward runs with every other block's gradients.
Context parallelism's ring buffers live inside the attention's backward only, so each moment counts them by what
they exceed the transients of that moment they never meet (`_ring_beyond`).
Gradients grow as activations are freed, so between the two the sum stays below the larger. With gradient
accumulation (more than one micro-batch) gradients also exist at the second micro-batch's backward start.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from autopar.runtime.checkpointing import KEEP_UNDER_SELECTIVE
from autopar.placement import local_shape
from autopar.planner.cost import CostContext, NodeCost, nbytes, saved_input_bytes
from autopar.planner.graph import PlanGraph, PNode, storage_root
from autopar.planner.memory import state_bytes_per_element, transient_bytes_per_element
from autopar.planner.ring import is_attention, kv_bytes, ring_buffer_bytes
from autopar.runtime.compiled import BUCKET_BYTES

# part -> the moments it is present at ("start", "end" of backward)
PHASES = {"params": ("start", "end"), "optimizer_state": ("start", "end"), "gathered": ("start", "end"),
          "block_grads": ("end",),
          "activations": ("start",), "inputs": ("start",), "recompute": ("start", "end"), "autocast": ("start",),
          "grads": ("end",), "buckets": ("end",),
          "p2p_buffers": ("start", "end"), "p2p_grads": ("end",),  # pipelines only (planner/pipeline.py)
          "ring_buffers": ("start",), "ring_buffers_end": ("end",)}  # context parallelism only (planner/ring.py)
PARTS = tuple(k for k in PHASES if not k.startswith(("p2p_", "ring_")))  # every plan's; pp and cp add theirs
ONE_BLOCK_PARTS = ("gathered", "recompute")  # concern the block at work, not every block


@dataclass(frozen=True)
class Term:
    owner: str
    part: str  # one of PARTS, or "recompute_s" (seconds per micro-batch)
    values: tuple[float, ...]  # per strategy of the owner


def ring_buffer_terms(pg: PlanGraph, ctx: CostContext) -> list[Term]:
    """Context parallelism's ring buffers (ring.py `ring_buffer_bytes`) as a memory term of the first attention
    node: one ring runs at a time, so it is counted once per device, not per block."""
    for p in pg.owners():
        if is_attention(p):
            values = tuple(ring_buffer_bytes(*kv_bytes(p, s, ctx)) for s in p.strategies)
            return [Term(p.node.name, "ring_buffers", values)]
    return []


def phases(part: str, micro_batches: int) -> tuple[str, ...]:
    if part == "grads" and micro_batches > 1:  # accumulated gradients wait through the next micro-batches
        return ("start", "end")
    return PHASES.get(part, ())


def terms(pg: PlanGraph, ctx: CostContext, costs: dict[str, list[NodeCost]]) -> list[Term]:
    """Every memory term (bytes per device) and recompute term (seconds per micro-batch) of the candidate."""
    out: list[Term] = []
    for p in pg.owners():
        name, n, cs = p.node.name, pg.counts[p.node.name], costs[p.node.name]
        if p.kind == "op":
            out += _activation_terms(pg, ctx, p, n, cs)
        elif p.kind != "param":
            out.append(Term(name, "inputs", tuple(n * c.activation_bytes for c in cs)))
    out += block_input_terms(pg, ctx)
    grads = gradient_terms(pg, costs, "activations" if ctx.memory.ac == "none" else "recompute")
    out += grads
    feeds = {prod for p in pg.nodes.values() if p.block is not None for prod, _ in p.inputs
             if pg.nodes[prod].block is None}  # top-level nodes whose outputs enter a block
    head = [t for t in out if t.part == "activations" and pg.nodes[t.owner].block is None and t.owner not in feeds]
    recompute = _least(out, lambda t: t.part == "recompute")
    released = _least(out, lambda t: t.part == "activations" and t not in head) / max(block_count(pg), 1)
    per_elem, forward_end = _transients(pg, ctx, costs, recompute, released)
    if ctx.memory.ac != "none":  # the end of forward or a block's recomputation, whichever holds more
        extra = _least(head, lambda t: True) + forward_end
        keep = max(0.0, extra - recompute - _block_transients(pg, ctx, costs, per_elem)) / extra if extra else 1.0
        out = [Term(t.owner, t.part, tuple(keep * v for v in t.values)) if t in head else t for t in out]
        per_elem = {**per_elem, "forward_end": keep * per_elem["forward_end"]}
    out += _param_terms(pg, ctx, costs, per_elem, _bucket_share(pg, ctx, costs, recompute))
    if ctx.cp > 1:
        out += _ring_beyond(ring_buffer_terms(pg, ctx), out, grads[0] if grads else None)
    return [t for t in out if any(t.values)]


def _ring_beyond(ring: list[Term], out: list[Term], widest: Term | None) -> list[Term]:
    """The ring's buffers by what they exceed the transients they never meet (a linear stand-in for the max, as
    `_least`). They live inside the attention's backward only, so not beside the widest operation's two gradients
    (`gradient_terms`, held in that operation's backward: present at backward start, and at its end when
    checkpointing counts them in `recompute`), nor beside the gradient bucket stages 0/1 flatten once backward has
    ended. (A block's post-backward reduce-scatter buffers, `block_grads`, also come after its ring, but part of
    its unsharded gradient exists during the ring already, so they are not subtracted.) Measured (bench_memory,
    dp=2 x cp=2 against dp=4, same tokens per rank): where a bucket makes the end moment, cp's peak equals dp's."""
    if not ring:
        return []
    (t,) = ring
    grad = min(widest.values) if widest is not None else 0.0
    end = _least(out, lambda u: u.part == "buckets") + (
        grad if widest is not None and "end" in PHASES[widest.part] else 0.0)
    return [Term(t.owner, "ring_buffers", tuple(max(0.0, v - grad) for v in t.values)),
            Term(t.owner, "ring_buffers_end", tuple(max(0.0, v - end) for v in t.values))]


def _least(all_terms: list[Term], which) -> float:
    """Sum of the chosen terms, each at its least: the reference point at which two moments that never meet are
    compared, so that the larger one counts (a linear stand-in for the max)."""
    return sum(min(t.values) for t in all_terms if which(t))


def _block_elems(pg: PlanGraph, ctx: CostContext, costs: dict[str, list[NodeCost]]) -> float:
    """Parameter elements of one block on this device, at their least."""
    first, per = _first_block(pg), max(ctx.state_bytes_per_element, 1e-30)
    return sum(min(c.state_bytes for c in costs[p.node.name]) / per for p in pg.owners()
               if p.kind == "param" and p.block == first)


def _transients(pg: PlanGraph, ctx: CostContext, costs: dict[str, list[NodeCost]], recompute: float,
                released: float) -> tuple[dict[str, float], float]:
    """(memory.py's transients per parameter element, the block at work's now combined into gathered_block;
    the bytes the end of forward holds beyond the backward's blocks, at their least). A block's backward frees
    what checkpointing kept for it (`released`: its inputs, kept outputs), which the next block's moment holds
    as the previous reduce-scatter input instead; with two blocks, the block holding that input has no next one
    to prefetch."""
    t = transient_bytes_per_element(ctx.memory, ctx.dp)
    elems = _block_elems(pg, ctx, costs)
    reduce_input = max(0.0, t["reduce_input"] - released / elems) if elems else 0.0
    prefetch = t["prefetch"]
    if block_count(pg) <= 2:
        prefetch, reduce_input = max(prefetch, reduce_input), 0.0
    per_elem = {**t, "gathered_block": t["gathered_block"] + prefetch + reduce_input}
    return per_elem, t["forward_end"] * elems


def _block_transients(pg: PlanGraph, ctx: CostContext, costs: dict[str, list[NodeCost]],
                      per_elem: dict[str, float]) -> float:
    """What a block's backward holds of ZeRO transients beyond the end of forward (at their least): the block's
    gathered copy and the previous reduce-scatter input; the prefetched next block has its counterpart there."""
    return max(0.0, per_elem["gathered_block"] - per_elem["prefetch"]) * _block_elems(pg, ctx, costs)


def _param_terms(pg: PlanGraph, ctx: CostContext, costs: dict[str, list[NodeCost]], per_elem: dict[str, float],
                 bucket: float) -> list[Term]:
    """Model state and ZeRO transients of every parameter (bytes per element: memory.py, adjusted above)."""
    out = []
    state = state_bytes_per_element(ctx.memory, ctx.dp)
    first_block = _first_block(pg)
    for p in pg.owners():
        if p.kind != "param":
            continue
        name, n, cs = p.node.name, pg.counts[p.node.name], costs[p.node.name]
        elems = [c.state_bytes / max(ctx.state_bytes_per_element, 1e-30) for c in cs]
        out += [Term(name, part, tuple(n * e * b for e in elems)) for part, b in state.items()]
        per = _param_transients(p, n, first_block, per_elem, bucket * state["grads"])
        out += [Term(name, part, tuple(e * b for e in elems)) for part, b in per.items()]
    return out


def _param_transients(p: PNode, n: int, first_block: str | None, t: dict[str, float],
                      bucket: float) -> dict[str, float]:
    """Bytes per element of this parameter: ZeRO gathers and gradient buffers concern one block (the template's
    parameters stand for it) or, for top-level parameters, every one of them; buckets and autocast copies every
    parameter."""
    first = p.block is not None and p.block == first_block
    gathered = n * t["gathered_top"] if p.block is None else (t["gathered_block"] + t["forward_end"] if first else 0.0)
    return {"gathered": gathered, "block_grads": t["block_grad"] if first else 0.0, "buckets": n * bucket,
            "autocast": n * t["autocast_copy"]}


def _bucket_share(pg: PlanGraph, ctx: CostContext, costs: dict[str, list[NodeCost]], recompute: float) -> float:
    """Fraction of the gradients held twice at once under DDP-style bucketing (ZeRO-0/1 with dp > 1), with the
    gradients at their largest placement (a linear stand-in for the min). runtime.py flattens a bucket when its
    last gradient arrives; buckets fill in reverse order of registration up to BUCKET_BYTES and also break where
    the axes a gradient is reduced over change, which on a mesh with more than the dp axis is every few
    parameters (a block's at most). When checkpointing recomputes a block, the end moment already holds that
    block's activations (`recompute`), which a flattening does not meet: the last bucket completes when backward
    ends, the others as their block's backward ends. So the bucket counts by what it exceeds them."""
    if ctx.dp <= 1 or ctx.memory.zero >= 2:
        return 0.0
    per = max(ctx.state_bytes_per_element, 1e-30)
    grad_bytes = state_bytes_per_element(ctx.memory, ctx.dp)["grads"]
    first = _first_block(pg)
    most, block = 0.0, 0.0
    for p in pg.owners():
        if p.kind == "param":
            grads = pg.counts[p.node.name] * max(c.state_bytes for c in costs[p.node.name]) / per * grad_bytes
            most += grads
            block += grads / pg.counts[p.node.name] if p.block == first else 0.0
    only_dp = all(d == 1 for d, a in zip(pg.degrees, pg.axis_names) if a != "dp")
    flattened = min(BUCKET_BYTES, most if only_dp or not block else block)
    return max(0.0, flattened - recompute) / most if most else 0.0


def _activation_terms(pg: PlanGraph, ctx: CostContext, p: PNode, n: int, cs: list[NodeCost]) -> list[Term]:
    name, ac = p.node.name, ctx.memory.ac
    if ac == "none" or p.block is None:  # with what the op holds at its own peak (a loss's logits), then too
        return [Term(name, "activations", tuple(n * (c.activation_bytes + c.transient_bytes) for c in cs))]
    # A checkpointed block keeps only its inputs (added by block_input_terms) and, under selective, the outputs of
    # its weight matmuls; the block being recomputed holds the rest of its activations once; recomputation costs
    # the forward again for every op not kept. What an op holds is never below zero: a fused chain's member saves
    # nothing (cost.fused: its anchor holds what the kernel saves), so an input the checkpoint keeps is nothing to
    # take off. Unclamped, that difference was minus the input's bytes, and the ILP bought memory with it: a
    # member reading its input gathered over dp (Llama-3-70B at dp=512 x tp=2, full checkpointing: each norm's
    # square read the residual stream of all 512 replicas, -30 GiB "recompute", 237 s of all-gathers per step).
    held = [j for j in p.saved_inputs if _kept_by_checkpoint(pg, p, j, ac)]
    out = [Term(name, "recompute", tuple(max(0.0, c.activation_bytes - sum(saved_input_bytes(ctx, p, s, j)
                                                                          for j in held))
                                         for c, s in zip(cs, p.strategies)))]
    if ac == "selective" and p.node.target in KEEP_UNDER_SELECTIVE:
        out.append(Term(name, "activations", tuple(n * c.out_bytes for c in cs)))
    else:
        out.append(Term(name, "recompute_s", tuple(n * c.fwd_s for c in cs)))
    return out


def _kept_by_checkpoint(pg: PlanGraph, p: PNode, j: int, ac: str) -> bool:
    """Input j of p is kept across the checkpointed block anyway: it comes from outside the block (the block's
    input) or, under selective, is a kept matmul output; recomputation does not hold a second copy."""
    q = pg.nodes[storage_root(pg.nodes, p.inputs[j])[0]]
    return q.block != p.block or ac == "selective" and q.kind == "op" and q.node.target in KEEP_UNDER_SELECTIVE


def gradient_terms(pg: PlanGraph, costs: dict[str, list[NodeCost]], part: str) -> list[Term]:
    """Gradients autograd holds in a block's backward besides its saved activations: the gradient of the block's
    output (the residual stream's, kept until the residual add's other branch has run) and, at the block's
    widest operation, the gradient of its output and the gradient of its input it produces. They belong to the
    block at work: `part` is where its activations are counted at backward start (its recomputation under
    checkpointing)."""
    first = _first_block(pg)
    ops = [p for p in pg.owners() if p.kind == "op" and p.block == first and p.requires_grad and p.info.out_shapes
           and not (p.rule is not None and p.rule.moves_no_data)]
    if not ops:
        return []
    users = {prod for q in pg.nodes.values() if q.block != first for prod, _ in q.inputs}
    widest = max(ops, key=lambda p: min(c.out_bytes for c in costs[p.node.name]))
    out = [Term(widest.node.name, part, tuple(2 * c.out_bytes for c in costs[widest.node.name]))]
    out += [Term(p.node.name, part, tuple(c.out_bytes for c in costs[p.node.name])) for p in ops
            if p.node.name in users]
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
            if q.block == p.block or q.kind not in ("op", "input") or (p.block, prod, k) in seen or \
                    pg.nodes[storage_root(pg.nodes, (prod, k))[0]].kind in ("param", "buffer"):
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


def block_count(pg: PlanGraph) -> int:
    """How many repeated blocks the model has (the largest class), or distinct blocks when none repeat."""
    if pg.block_classes:
        return len(max(pg.block_classes, key=len))
    return len({p.block for p in pg.nodes.values() if p.block is not None})


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
