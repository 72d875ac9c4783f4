"""Keep the module hierarchy: cut this rank's flat generated graph into one submodule per repeated layer.

A transformer block becomes `program.blocks_3` (a GraphModule holding that block's parameter shards under their
original paths), called in order from the top graph; code outside blocks (embeddings, head, loss) stays in
contiguous top-level segments. Blocks are the unit of FSDP sharding and of activation checkpointing
(DESIGN decision 6), and of pipeline stages. Segments are maximal runs of consecutive nodes of one
block, so the segments form a chain in program order. (torch.fx's `split_module` passes parameters in as arguments,
which would leave FSDP nothing to shard per block; hence this small pass.)
"""

from __future__ import annotations

import operator

import torch.fx as fx
from torch import nn

from autopar.codegen.emit import BLOCK_META


def split_blocks(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[str]]:
    """The same program as a chain of segment submodules; returns it and the names of the block segments.

    Each segment is a GraphModule over the values it receives, with its own `get_attr`s: a block's parameters are
    attributes of the block's submodule (what FSDP needs), not arguments passed in from outside."""
    runs = _runs(gm.graph)
    if not any(label for label, _ in runs):
        return gm, []
    top = fx.Graph()
    env: dict[fx.Node, fx.Node] = {n: top.placeholder(n.name) for n in gm.graph.nodes if n.op == "placeholder"}
    root, blocks, used = nn.Module(), [], set()
    for index, (label, nodes) in enumerate(runs):
        name = label.replace(".", "_") if label else f"top_{index}"
        name = name if name not in used else f"{name}_{index}"  # a block interrupted by outside code
        used.add(name)
        inputs, outputs, sub = _segment(nodes)
        root.add_module(name, fx.GraphModule(gm, sub, class_name=name))
        call = top.call_module(name, tuple(env[n] for n in inputs))
        call.meta[BLOCK_META] = label  # pipeline stages are cut along these labels (autopar/runtime/pipeline.py)
        for k, out in enumerate(outputs):
            env[out] = top.call_function(operator.getitem, (call, k))
        if label:
            blocks.append(name)
    result = next(n for n in gm.graph.nodes if n.op == "output")
    top.output(fx.node.map_arg(result.args[0], lambda n: env[n]))
    return fx.GraphModule(root, top, class_name="AutoparRank"), blocks


def _runs(graph: fx.Graph) -> list[tuple[str | None, list[fx.Node]]]:
    """Maximal runs of consecutive compute nodes of one block (placeholders, get_attr and output excluded)."""
    runs: list[tuple[str | None, list[fx.Node]]] = []
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        label = node.meta.get(BLOCK_META)
        if not runs or runs[-1][0] != label:
            runs.append((label, []))
        runs[-1][1].append(node)
    return runs


def _segment(nodes: list[fx.Node]) -> tuple[list[fx.Node], list[fx.Node], fx.Graph]:
    """(values it takes, values it gives to later code, its graph). Attributes are re-read inside."""
    members = set(nodes)
    inputs: list[fx.Node] = []
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in members and arg.op != "get_attr" and arg not in inputs:
                inputs.append(arg)
    outputs = [n for n in nodes if any(u not in members for u in n.users)]
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {n: g.placeholder(n.name) for n in inputs}
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and arg not in env:
                env[arg] = g.get_attr(arg.target)
        env[node] = g.node_copy(node, lambda n: env[n])
    g.output(tuple(env[n] for n in outputs))
    return inputs, outputs, g


def full_code(gm: fx.GraphModule, blocks: list[str]) -> str:
    """The top graph's code followed by each segment's, so `print(compiled.code)` still shows every collective."""
    parts = [gm.code]
    for name, module in gm.named_children():
        inner = getattr(module, "inner", module)  # a checkpoint wrapper keeps the block as `.inner`
        if isinstance(inner, fx.GraphModule):
            parts.append(f"# ---- {name}{' (block)' if name in blocks else ''}\n{inner.code}")
    return "\n".join(parts)
