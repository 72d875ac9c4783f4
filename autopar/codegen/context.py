"""Context parallelism (cp) in the generated program: a cp plan runs as its fold (planner/cp_search.py), a
data-parallel program over dp x cp ranks on batch x cp samples of seq / cp tokens, with three changes:

- inputs: each sample's sequence is cut into 2 x cp load-balanced chunks, cp rank i holding chunks i and
  2cp-1-i (`fold_batch`; codegen/ring_attention.py), placed so that the program's dp x cp slice of the batch is
  this rank's (rank (d, c) of the dp x cp block holds part c of dp shard d);
- positions: `arange(seq / cp)` and rows [0, seq / cp) of a position table become this rank's true positions
  (learned position embeddings, rotary tables) -- the traced graph's positions are local offsets, so the local
  offsets index the true ones (`true_positions`), which also holds for any slice of them;
- attention: every causal `aten.scaled_dot_product_attention` becomes `comm.cp.ring_attention(q, k, v)` over the
  cp group.
The loss is already the global mean: cross-entropy over rows sharded on the (dp x cp) axis divides the local sum
by the all-reduced count of counted tokens (codegen/lower.py), which respects ignore_index; parameter gradients
reduce over dp x cp, and ZeRO shards over it, as for any data-parallel axis. The planner refuses cp for models
whose positions mix in other ways (planner/context.py `cp_refusal`), and `check_rewritten` refuses a program in
which the rewrite did not find what the planner saw.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn

from autopar.codegen.emit import BLOCK_META
from autopar.codegen.ring_attention import ring_attention, sequence_positions, shard_sequence
from autopar.errors import PlanError

aten = torch.ops.aten


def fold_batch(x: torch.Tensor, cp: int, groups: int) -> torch.Tensor:
    """[n, seq, ...] -> [n x cp, seq / cp, ...]: the rows cut into `groups` (micro-batches x dp shards, in order),
    each group followed by its cp sequence parts."""
    return torch.cat([shard_sequence(g, 1, cp, c) for g in x.chunk(groups) for c in range(cp)])


def fold_inputs(leaves: list, seq: int, cp: int, groups: int) -> list:
    """Every batch-first input with a sequence dim of `seq` (tokens, labels, masks of the sample), folded."""
    return [fold_batch(x, cp, groups) if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[1] == seq else x
            for x in leaves]


def true_positions(local: torch.Tensor, seq: int, cp: int, rank: int) -> torch.Tensor:
    """The true positions of the local offsets `local` on cp rank `rank`."""
    table = sequence_positions(seq, cp, rank, device=local.device).to(local.dtype)
    return table[local]


def true_rows(table: torch.Tensor, seq: int, cp: int, rank: int) -> torch.Tensor:
    """The rows of a position table (rotary cos/sin) at this rank's true positions."""
    if table.shape[0] < seq:
        raise PlanError(f"a position table of {table.shape[0]} rows is shorter than the sequence {seq}")
    return table.index_select(0, sequence_positions(seq, cp, rank, device=table.device))


class RingComm(nn.Module):
    """`comm.cp.ring_attention(q, k, v, scale)`: causal ring attention over the cp group."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.group = group

    def forward(self, q, k, v, scale=None):
        return ring_attention(q, k, v, self.group, scale)

    def extra_repr(self) -> str:
        return f"axis=cp, size={dist.get_world_size(self.group)}"


def rewrite(emitted, captured, sources: list[str], seq: int, cp: int, rank: int) -> None:
    """Positions and attention of this rank's generated graph (`emitted`, from the folded trace `captured`), as the
    module docstring says; `sources`: the traced position sources (planner/context.py `cp_analysis`)."""
    graph, env = emitted.graph, emitted.values
    for name in sources:
        n = env[name]
        if getattr(n.target, "overloadpacket", None) is aten.arange:
            _follow(graph, n, true_positions, (seq, cp, rank))
        else:  # rows [0, s) of a table: the rows at the true positions instead
            with graph.inserting_after(n):
                rows = _in_block_of(n, graph.call_function(true_rows, (n.args[0], seq, cp, rank)))
            n.replace_all_uses_with(rows)
            graph.erase_node(n)
    _local_position_gradients(graph, set(graph.find_nodes(op="call_function", target=true_positions)) |
                              set(graph.find_nodes(op="call_function", target=true_rows)))
    attention = [n.name for n in captured.graph.nodes
                 if getattr(n.target, "overloadpacket", None) is aten.scaled_dot_product_attention]
    for name in attention:
        n = env[name]
        args = list(n.args) + [None] * (7 - len(n.args))
        with graph.inserting_after(n):
            ring = _in_block_of(n, graph.call_module("comm.cp", (args[0], args[1], args[2]),
                                                     {"scale": n.kwargs.get("scale", args[6])}))
        n.replace_all_uses_with(ring)
        graph.erase_node(n)
    if not attention:
        raise PlanError("the plan has cp > 1 but the model has no scaled_dot_product_attention to run as ring "
                        "attention; re-plan with cp=1")
    graph.lint()


def _local_position_gradients(graph: fx.Graph, positions: set[fx.Node]) -> None:
    """The fold's planner sees a position-derived value (a learned position embedding's rows) as replicated over
    the dp x cp axis, so it sums its gradient over that axis (`comm.dp.grad_all_reduce`) before the rows'
    backward; under cp each rank holds other positions, so the sum belongs after it: the all-reduce moves from
    the region's output to the parameters entering the region (the same sum of every rank's own gradient).
    Any other dp collective on a position-derived value is refused."""
    data = set()
    for n in graph.nodes:
        if n.op == "placeholder" or any(a in data for a in n.all_input_nodes):
            data.add(n)
    region = set()
    for n in graph.nodes:
        if n in positions or (n not in data and any(a in region for a in n.all_input_nodes)):
            region.add(n)
    for n in list(graph.nodes):
        if n.op != "call_module" or not str(n.target).startswith("comm.dp.") or n.args[0] not in region:
            continue
        if n.target != "comm.dp.grad_all_reduce":
            raise PlanError(f"context parallelism: the plan moves a position-derived value over dp ({n.target}); "
                            "re-plan with cp=1")
        n.replace_all_uses_with(n.args[0])
        graph.erase_node(n)
    for n in [n for n in graph.nodes if n in region]:
        for a in n.all_input_nodes:
            if a not in region and a not in data and _has_param(a):
                with graph.inserting_before(n):
                    summed = _in_block_of(n, graph.call_module("comm.dp.grad_all_reduce", (a,)))
                n.replace_input_with(a, summed)


def _in_block_of(anchor: fx.Node, new: fx.Node) -> fx.Node:
    """`new`, in the repeated layer of the node it replaces or serves. Without the label a node splits its block in
    two (codegen/blocks.py cuts blocks at unlabelled nodes): a ring attention would run outside both halves, i.e.
    outside activation checkpointing, keeping q, k, v, its output and lse through the forward, and each half would
    be its own FSDP group, gathered and prefetched apart -- neither what the planner priced."""
    if BLOCK_META in anchor.meta:
        new.meta[BLOCK_META] = anchor.meta[BLOCK_META]
    return new


def _has_param(n: fx.Node) -> bool:
    return n.op == "get_attr" or any(_has_param(a) for a in n.all_input_nodes)


def _follow(graph: fx.Graph, n: fx.Node, fn, extra: tuple) -> None:
    """Insert fn(n, *extra) after n and make every user of n read it instead."""
    with graph.inserting_after(n):
        new = _in_block_of(n, graph.call_function(fn, (n, *extra)))
    n.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)


def cp_groups(world: int, pp: int, dp: int, cp: int, tp: int) -> dist.ProcessGroup:
    """This rank's cp group on the (pp, dp, cp, tp) layout (tp innermost; the folded mesh's dp axis is dp x cp).
    Every rank creates every group, in the same order (torch.distributed.new_group's contract)."""
    me, mine = dist.get_rank(), None
    for p in range(pp):
        for d in range(dp):
            for t in range(tp):
                ranks = [((p * dp + d) * cp + c) * tp + t for c in range(cp)]
                group = dist.new_group(ranks)
                if me in ranks:
                    mine = group
    assert mine is not None and pp * dp * cp * tp == world
    return mine
