"""Prices of one strategy of one node, and of moving a tensor between placements, on one mesh.

Times are for one micro-batch unless named otherwise. Backward is priced at twice the forward (two matmuls per
forward matmul: input and weight gradients; Narayanan et al. 2021 eq. 3 uses the same 1:2 split).
Model-state bytes per parameter element depend on the ZeRO stage and precision (memory.py).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from autopar.cost_models import Hardware, Link, collective_time_s, op_time_s
from autopar.placement import P, R, Placement, local_shape
from autopar.planner.fusion import Chain, chain_of
from autopar.planner.graph import PNode
from autopar.planner.ring import ring_node_cost
from autopar.planner.memory import MemoryConfig, activation_scale, state_bytes_per_element
from autopar.redistribute import Step, steps
from autopar.strategies import Strategy

BACKWARD_FACTOR = 2.0
# Bytes of memory traffic per parameter element in one AdamW step: torch's default multi-tensor implementation
# (torch/optim/adamw.py -> adam.py `_multi_tensor_adam`) makes 8 passes over float32 tensors: lerp_ (exp_avg,
# read 2 write 1), mul_ (exp_avg_sq, 1+1), addcmul_ (2+1), weight decay mul_ (params, 1+1), sqrt (1+1), div_
# (1+1), add_ eps (1+1), addcdiv_ (params, 3+1): 20 accesses of 4 bytes.
OPTIMIZER_BYTES_PER_ELEMENT = 80.0


@dataclass(frozen=True)
class CostContext:
    hw: Hardware
    degrees: tuple[int, ...]
    links: tuple[Link, ...]  # one per axis
    memory: MemoryConfig = MemoryConfig()  # ZeRO stage, checkpointing, precision of this candidate
    dp: int = 1  # the data-parallel degree ZeRO partitions over (dp x cp under context parallelism: the fold)
    cp: int = 1  # context-parallel degree: attention runs as a ring over cp ranks (planner/context.py)
    cp_link: Link | None = None  # the link the cp ring's send/recv crosses

    def __hash__(self) -> int:
        """Computed once: the price caches (edge_price, redistribution_time_s) hash the context on every lookup,
        and hashing the hardware's every field each time was a tenth of planning."""
        if "_hash" not in self.__dict__:
            object.__setattr__(self, "_hash", hash((self.hw, self.degrees, self.links, self.memory, self.dp, self.cp,
                                                   self.cp_link)))
        return self.__dict__["_hash"]

    @property
    def state_bytes_per_element(self) -> float:
        return sum(state_bytes_per_element(self.memory, self.dp).values())

    @property
    def bucketed(self) -> "CostContext":
        """The same mesh with latency-free links: parameter gradients are reduced in buckets (runtime/compiled.py), so
        their latency is paid per bucket, not per parameter."""
        return replace(self, links=tuple(link.without_latency() for link in self.links))


@dataclass(frozen=True)
class NodeCost:
    fwd_s: float
    bwd_s: float
    activation_bytes: float  # saved for backward, one micro-batch
    state_bytes: float  # parameters + gradients + optimizer state
    out_bytes: float = 0.0  # the outputs, one micro-batch (kept by selective checkpointing for weight matmuls)
    step_s: float = 0.0  # once per optimizer step, whatever the micro-batches: a parameter's optimizer update
    transient_bytes: float = 0.0  # held at the op's own peak besides what it saves (a loss's copies of the logits)


def optimizer_s(ctx: CostContext, shape: Sequence[int]) -> float:
    """AdamW's update of one parameter as this device holds it (tensor-parallel shards): memory-bound passes over
    its elements. Priced the same at every ZeRO stage: a sharded step updates 1/dp of them, but FSDP copies every
    gathered parameter out of its all-gather buffer and every gradient into its reduce-scatter buffer (8 bytes
    per element each), which the model does not price either; leaving out both keeps ZeRO-2 as fast as DP, as
    the search assumes (space.py `frontier`)."""
    bytes_per_s = ctx.hw.memory_bandwidth_bytes_per_s * ctx.hw.memory_efficiency
    return math.prod(shape) * OPTIMIZER_BYTES_PER_ELEMENT / bytes_per_s


def nbytes(shape: Sequence[int], dtype: torch.dtype) -> float:
    return float(math.prod(shape)) * dtype.itemsize


def owner_costs(pg, ctx: CostContext) -> dict[str, list[NodeCost]]:
    """Every owner's cost per strategy under `ctx`, kept on the planning graph per context: the ILP, its bounds,
    the prediction and the pipeline layouts price the same candidate, often more than once. An op's cost does not
    depend on the ZeRO stage, checkpointing or data-parallel degree (only placeholders' state and optimizer step
    do), so op costs are shared by the contexts that differ only in those."""
    cache = pg.__dict__.setdefault("_owner_costs", {})
    if ctx not in cache:
        ops = cache.setdefault(("ops", ctx.hw, ctx.degrees, ctx.memory.precision, ctx.memory.fuse, ctx.cp,
                                ctx.cp_link), {})
        out = {}
        for p in pg.owners():
            name = p.node.name
            if p.kind != "op" or name not in ops:
                out[name] = [node_cost(ctx, p, s) for s in p.strategies]
                if p.kind == "op":
                    ops[name] = out[name]
            else:
                out[name] = ops[name]
        cache[ctx] = out
    return cache[ctx]


def node_cost(ctx: CostContext, p: PNode, s: Strategy) -> NodeCost:
    if p.kind in ("param", "buffer", "input"):
        return _placeholder_cost(ctx, p, s)
    if p.kind == "output" or not p.info.out_shapes:
        return NodeCost(0, 0, 0, 0)
    outs = [local_shape(sh, pl, ctx.degrees) for sh, pl in zip(p.info.out_shapes, s.outs)]
    chain = fused_chain(ctx, p, s)
    if chain is not None and p.node.name != chain.anchor:
        # absorbed into its chain's kernel (`fused`): it costs nothing and saves nothing, its outputs' bytes
        # remain; half of a fused model's op costs are such members, so they are not priced in full first
        return NodeCost(0.0, 0.0, 0.0, 0.0, _activation_scale(ctx, p) * sum(
            nbytes(sh, dt) for sh, dt in zip(outs, p.info.out_dtypes)))
    ins = [local_shape(sh, pl, ctx.degrees) for sh, pl in zip(p.info.in_shapes, s.ins)]
    flops = p.rule.flops(ins, outs, p.info) if p.rule else float(sum(math.prod(o) for o in outs))
    moved = 0.0
    if p.rule is None or not p.rule.moves_no_data:
        moved = sum(nbytes(sh, dt) for sh, dt in zip(ins, p.info.in_dtypes))
        moved += sum(nbytes(sh, dt) for sh, dt in zip(outs, p.info.out_dtypes))
    unit = p.rule.unit if p.rule else "vector"
    dtype = p.info.out_dtypes[0] if p.info.out_dtypes else torch.float32
    special = p.rule.transcendentals(ins) if p.rule else 0.0
    family = p.rule.family(p.info) if p.rule else "exp"
    fwd = op_time_s(ctx.hw, flops, moved, dtype, unit, special, family) if (flops or moved) else 0.0
    bwd = BACKWARD_FACTOR * fwd if p.requires_grad else 0.0
    saves = saved_kinds(p)
    scale = _activation_scale(ctx, p)
    out_bytes = scale * sum(nbytes(sh, dt) for sh, dt in zip(outs, p.info.out_dtypes))
    act = sum(saved_input_bytes(ctx, p, s, j) for j in p.saved_inputs) \
        if "inputs" in saves or saves == "others" else 0.0
    if "output" in saves:
        act += out_bytes
    elif saves == "mask":  # a boolean per element (aten.dropout runs native_dropout, which returns it)
        act += float(math.prod(outs[-1]))
    transient = loss_copies_bytes(p, ins) if p.requires_grad else 0.0
    cost = fused(ctx, p, s, NodeCost(fwd, bwd, act, 0.0, out_bytes, transient_bytes=transient))
    if ctx.cp > 1:  # attention is a ring over cp ranks: its true work and exposed send/recv (planner/ring.py)
        return ring_node_cost(ctx, p, s, cost)
    return cost


# An unfused cross-entropy holds, at its peak, two fp32 [rows x classes] copies of the logits besides the one its
# backward saves: the vocab-parallel lowering (codegen/collectives.py) holds the logits and logits - max while
# exp() (saved) is written; aten's cross_entropy_loss (log_softmax + nll_loss) in backward holds the gradient of
# log_softmax's output and of its input beside log_softmax's output (saved). Autocast runs both in fp32.
LOSS_COPIES = 2


def loss_copies_bytes(p: PNode, ins: Sequence[Sequence[int]]) -> float:
    """Transient bytes of an unfused cross-entropy over local logits of shape ins[0] (0 for other ops)."""
    if p.node.target is not torch.ops.aten.cross_entropy_loss.default or len(ins[0]) != 2:
        return 0.0
    return LOSS_COPIES * nbytes(ins[0], torch.float32)


def recomputed(ctx: CostContext, p: PNode) -> bool:
    """p runs inside a checkpointed block: backward runs it (and the moves into it) again, and what it saves is
    held for one block at a time."""
    return p.block is not None and ctx.memory.ac != "none"


def _activation_scale(ctx: CostContext, p: PNode) -> float:
    return activation_scale(ctx.memory, p.info.out_dtypes[0].itemsize) if p.info.out_dtypes else 1.0


def saved_input_bytes(ctx: CostContext, p: PNode, s: Strategy, j: int) -> float:
    """Bytes of input j that autograd keeps for p's backward (j in p.saved_inputs), at strategy s."""
    return nbytes(local_shape(p.info.in_shapes[j], s.ins[j], ctx.degrees), p.info.in_dtypes[j]) * \
        _activation_scale(ctx, p)


def saved_kinds(p: PNode) -> str:
    """What autograd keeps for this node's backward ("" when no gradient flows through it)."""
    if not p.requires_grad:
        return ""
    return p.rule.saves if p.rule is not None else "inputs+output"


def _placeholder_cost(ctx: CostContext, p: PNode, s: Strategy) -> NodeCost:
    if not p.info.out_shapes or not p.node.users:  # an unused placeholder (e.g. the second name of a tied weight)
        return NodeCost(0, 0, 0, 0)
    shape = local_shape(p.info.out_shapes[0], s.outs[0], ctx.degrees)
    if p.kind == "param":
        return NodeCost(0, 0, 0, math.prod(shape) * ctx.state_bytes_per_element, step_s=optimizer_s(ctx, shape))
    return NodeCost(0, 0, nbytes(shape, p.info.out_dtypes[0]), 0)


def redistribution_time_s(ctx: CostContext, shape: Sequence[int], dtype: torch.dtype, src: Sequence[Placement],
                          dst: Sequence[Placement], requires_grad: bool, partial_axes: Sequence[int] = ()) -> float:
    """Forward collectives of the steps plus, when a gradient flows back, their backward collectives."""
    return _moves_time_s(ctx.degrees, ctx.links, tuple(shape), dtype, tuple(src), tuple(dst), requires_grad,
                         tuple(partial_axes))


@functools.lru_cache(maxsize=1 << 17)
def _moves_time_s(degrees, links, shape, dtype, src, dst, requires_grad: bool, partial_axes) -> float:
    """redistribution_time_s by what it depends on: the mesh's degrees and links, not the ZeRO stage, checkpointing
    or fusion of a candidate, whose contexts would each miss the cache."""
    total = 0.0
    current = list(src)
    for step in _steps(src, dst, partial_axes if requires_grad else ()):
        n, link = degrees[step.axis], links[step.axis]
        before = nbytes(local_shape(shape, current, degrees), dtype)
        full = before * n if step.kind == "all_gather" else before  # bytes with this axis unsharded
        if step.kind in ("all_gather", "all_reduce", "reduce_scatter"):
            total += collective_time_s(step.kind, full, n, link)
        if requires_grad and step.bwd:
            total += collective_time_s(step.bwd, full, n, link)
        current[step.axis] = R if step.kind == "all_gather" else dst[step.axis]
    return total


@functools.lru_cache(maxsize=1 << 14)
def _steps(src: tuple[Placement, ...], dst: tuple[Placement, ...], partial: tuple[int, ...] = ()) -> tuple[Step, ...]:
    """redistribute.steps, kept per placement pair: the planner prices the same few pairs for every tensor, shape
    and mesh."""
    return tuple(steps(src, dst, partial))


def _regather_saving(ctx: CostContext, shape, dtype, src, dst, partial) -> float:
    """Bytes a sequence-parallel gather saves by keeping its shard for backward (codegen/regather.py). Under
    checkpointing the saved tensors of a block are those of its recomputation, which runs in backward outside
    the hooks and keeps the gathered tensor whole: no saving (edge_price does not see whether the consumer is in a
    block; the head's few consumers lose a saving they have)."""
    if ctx.memory.ac != "none":
        return 0.0
    moves = _steps(src, dst, tuple(partial))
    if not moves or any(m.kind != "all_gather" or m.bwd != "reduce_scatter" for m in moves):
        return 0.0
    scale = activation_scale(ctx.memory, dtype.itemsize)
    return scale * (nbytes(local_shape(shape, src, ctx.degrees), dtype) - nbytes(local_shape(shape, dst, ctx.degrees), dtype))


@functools.lru_cache(maxsize=1 << 16)
def edge_price(ctx: CostContext, shape: tuple[int, ...], dtype: torch.dtype, requires_grad: bool, is_param: bool,
               src: tuple[Placement, ...], dst: tuple[Placement, ...], partial: tuple[int, ...],
               kept: bool = False, rerun: bool = False) -> tuple[float, float, float]:
    """(exposed seconds, gradient-sync seconds, bytes kept) for one tensor moving from `src` to `dst` once.

    Everything is exposed except a parameter's backward collectives: gradients are reduced once per step, off the
    critical path where backward can hide them (runtime/compiled.py), and priced by bandwidth only (see `bucketed`).
    A parameter gathered for a consumer that saves its inputs stays gathered until backward (`kept`): plain
    autograd holds that copy, so it is memory the plan pays for. An activation the consumer saves (`kept`, counted
    at the consumer's placement by node_cost) that arrives through sequence-parallel all-gathers is stored as its
    shard and gathered again in backward (codegen/regather.py): bytes kept is then the (negative) difference.
    A move into a checkpointed block (`rerun`) runs its forward collectives again when backward recomputes the
    block (Korthikanti et al. 2022 Sec. 5: full recomputation repeats the forward's tensor-parallel all-reduces)."""
    total = redistribution_time_s(ctx, shape, dtype, src, dst, requires_grad, partial)
    if rerun and not is_param:  # moved inside a checkpointed block: its recomputation moves it again
        total += redistribution_time_s(ctx, shape, dtype, src, dst, False)
    if not is_param:
        return total, 0.0, _regather_saving(ctx, shape, dtype, src, dst, partial) if kept else 0.0
    forward = redistribution_time_s(ctx, shape, dtype, src, dst, False)
    flat = ctx.bucketed
    sync = (redistribution_time_s(flat, shape, dtype, src, dst, True, partial)
            - redistribution_time_s(flat, shape, dtype, src, dst, False))
    held = nbytes(local_shape(shape, dst, ctx.degrees), dtype) if kept and not _is_view(shape, src, dst) else 0.0
    return forward, sync, held


def _is_view(shape: tuple[int, ...], src: tuple[Placement, ...], dst: tuple[Placement, ...]) -> bool:
    """The moved tensor shares the source's storage: no move, or only local slices (codegen/collectives.py
    `local_chunk`: `chunk(...)[r].contiguous()`), each along a dim that only dims of size 1 precede, where a chunk
    of a contiguous tensor is contiguous already (a weight's rows, a bias)."""
    moves = [m for m in _steps(src, dst) if m.kind != "identity"]
    return all(m.kind == "slice" and math.prod(shape[:m.dim]) == 1 for m in moves)


def zero_sync(ctx: CostContext, sync: float) -> tuple[float, float]:
    """(overlappable, exposed after the step) gradient-sync seconds of a parameter under the ZeRO stage.
    Rajbhandari et al. 2020 Sec. 7: ZeRO-2 moves what DP moves (reduce-scatter + all-gather = all-reduce), ZeRO-3
    1.5x (parameters gathered in forward and again in backward); torch's ZeroRedundancyOptimizer (ZeRO-1) keeps
    DP's all-reduce and broadcasts the updated partitions after the step (an all-gather's volume, not hidden)."""
    stage = ctx.memory.zero if ctx.dp > 1 else 0
    if stage == 3:
        return 1.5 * sync, 0.0
    if stage == 1:
        return sync, 0.5 * sync
    return sync, 0.0


# ---- fused chains (planner/fusion.py finds them) ---------------------------------------------------------------
# (external tensors the fused kernel reads + writes) in units of its output; saved tensors likewise
_TRAFFIC = {"add_norm": 4, "norm": 2, "swiglu": 3, "bias_gelu": 2, "rotary": 2}
_SAVED = {"add_norm": 1, "norm": 1, "swiglu": 2, "bias_gelu": 1, "rotary": 0}


def fused(ctx: CostContext, p: PNode, s: Strategy, cost: NodeCost) -> NodeCost:
    """The cost of node p at strategy s when its chain (planner/fusion.py) runs fused (ctx.memory.fuse): a fused
    chain's tensors are read and written once at the memory bandwidth, with one launch (op_time_s' roofline and
    launch floor), its backward at BACKWARD_FACTOR x forward, priced at the chain's anchor; the members it absorbs
    cost nothing (node_cost prices them without calling this). Saved for
    backward: add_norm/norm keep their input and two fp32 numbers per row, swiglu its two inputs, rotary nothing
    (its tables are buffers), bias_gelu the pre-activation, cross_entropy the input's and weight's gradients
    (computed in forward) instead of the [tokens x vocab/tp] logits."""
    chain = fused_chain(ctx, p, s)
    if chain is None:
        return cost
    if chain.kind == "cross_entropy":
        return _cross_entropy_cost(ctx, p, s, cost, chain)
    return _pointwise_cost(ctx, p, s, cost, chain)


def fused_chain(ctx: CostContext, p: PNode, s: Strategy) -> Chain | None:
    """The chain node p runs fused in at strategy s (`fused`); None where it is priced as itself."""
    if not ctx.memory.fuse or p.kind != "op":
        return None
    chain = chain_of(p.node)
    if chain is None or (chain.kind in ("bias_gelu", "cross_entropy") and p.node.name == chain.members[0]):
        return None  # the Linear stays a matmul at its own price
    if chain.kind == "add_norm" and p.node.name == chain.members[0] and P in s.outs[0]:
        # a partial sum is all-reduced before any norm reads it (codegen/emit.py): the collective splits the chain
        # there, codegen/fuse.py leaves it unfused, and the add runs on its own; the search sees the price and
        # keeps the residual sum whole where the fused chain is cheaper (Megatron's order: reduce, then add)
        return None
    return chain


def _local_out(ctx: CostContext, p: PNode, s: Strategy) -> tuple[tuple[int, ...], torch.dtype]:
    return tuple(local_shape(p.info.out_shapes[0], s.outs[0], ctx.degrees)), p.info.out_dtypes[0]


def _pointwise_cost(ctx: CostContext, p: PNode, s: Strategy, cost: NodeCost, chain: Chain) -> NodeCost:
    shape, dtype = _local_out(ctx, p, s)
    elements = float(math.prod(shape))
    big = elements * dtype.itemsize
    rows = elements / shape[-1] if shape else 1.0
    stats = 8.0 * rows if chain.kind in ("add_norm", "norm") else 0.0  # fp32 mean and 1/std per row
    special = elements if chain.kind in ("swiglu", "bias_gelu") else 0.0
    family = p.rule.family(p.info) if chain.kind == "bias_gelu" and p.rule else "exp"
    fwd = op_time_s(ctx.hw, 8.0 * elements, _TRAFFIC[chain.kind] * big + stats, dtype, "vector", special, family)
    bwd = BACKWARD_FACTOR * fwd if p.requires_grad else 0.0
    saved = (_SAVED[chain.kind] * big + stats) * _activation_scale(ctx, p) if p.requires_grad else 0.0
    return replace(cost, fwd_s=fwd, bwd_s=bwd, activation_bytes=saved)


def _cross_entropy_cost(ctx: CostContext, p: PNode, s: Strategy, cost: NodeCost, chain: Chain) -> NodeCost:
    """Forward: the logits chunk is written by the matmul (the Linear's price), read for max/sum-exp and read and
    written once more as softmax - onehot; the gradient matmuls move from backward into forward (the Linear's
    price already has them). Backward scales the saved dx and dW. Saved: dx [tokens x hidden] and dW
    [vocab/tp x hidden] instead of the logits. Transient, per chunk of tokens (kernels.ce_chunk_rows): the fp32
    logits and exp(logits - max) beside them (the reference path; the Triton kernel reads the logits in place, so
    on GPUs this is one chunk too many), and below fp32 the matmul's own output and dW's fp32 accumulator."""
    from autopar.kernels import ce_chunk_rows  # the package's __init__: no triton, no kernels

    logits = local_shape(p.info.in_shapes[0], s.ins[0], ctx.degrees)
    dtype = p.info.in_dtypes[0]
    tokens, vocab = logits
    grads = float(tokens + vocab) * chain.hidden * dtype.itemsize
    fwd = op_time_s(ctx.hw, 4.0 * tokens * vocab, 3.0 * tokens * vocab * dtype.itemsize, dtype, "transcendental",
                    float(tokens * vocab), "exp")
    bwd = op_time_s(ctx.hw, float(tokens + vocab) * chain.hidden, 2.0 * grads, dtype) if p.requires_grad else 0.0
    saved = grads * _activation_scale(ctx, p) if p.requires_grad else 0.0
    chunk = float(ce_chunk_rows(tokens, vocab, chain.hidden) * vocab)
    transient = 2 * nbytes((chunk,), torch.float32)
    if dtype != torch.float32:
        transient += chunk * dtype.itemsize + vocab * chain.hidden * (dtype.itemsize + 4.0)
    return replace(cost, fwd_s=fwd, bwd_s=bwd, activation_bytes=saved, transient_bytes=transient)
