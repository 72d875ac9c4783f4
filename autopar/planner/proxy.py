"""Plan a deep model from a shallow trace: repeat the shallow copy's second block to the full depth.

Tracing a 96-layer GPT-3 with torch.export takes ~10 s per micro-batch size, and the outer search (pp x dp x tp
meshes, micro-batch counts) needs several sizes. Identical blocks share their decisions anyway (DESIGN decision
4), so the search plans on a copy of the model with two blocks, deepened here to the real depth: block 0 keeps its
inputs from the code before it, the second block's nodes are repeated for blocks 2..L-1 with each copy's inputs
taken from the copy before it, and the code after the last block reads the last copy. The result is the
planning graph the full trace would give, up to node names, so costs, memory terms and predictions need no
scaling rule of their own. Only the chosen candidate is mapped onto the full model's graph (search.py), for the
node names a plan records; that graph is the copy's trace repeated (redepth.py), taken for real only where the
blocks do not repeat alike.
"""

from __future__ import annotations

from dataclasses import replace

from autopar.planner.graph import PlanGraph, PNode


def deepen(pg: PlanGraph, depth: int) -> PlanGraph:
    """`pg` (a model with two identical blocks) as the same model with `depth` blocks."""
    if len(pg.block_classes) != 1 or len(pg.block_classes[0]) != 2 or depth < 2:
        raise ValueError("deepen needs a planning graph with exactly two identical blocks")
    first, second = pg.block_classes[0]
    members = {n for n, p in pg.nodes.items() if p.block == second}
    twin = {p.owner: n for n, p in pg.nodes.items() if n in members}  # block-0 node -> its block-1 twin
    ops = [n for n in pg.nodes if n in members and pg.nodes[n].kind == "op"]
    labels: dict[tuple[str | None, int], str | None] = {}  # (module, block or fqn, copy) -> its copy's

    def label(text: str | None, i: int) -> str | None:
        if (text, i) not in labels:
            labels[(text, i)] = _relabel(text, second, i)
        return labels[(text, i)]

    nodes: dict[str, PNode] = {}
    for name, p in pg.nodes.items():
        after = p.block is None and any(n in members for n, _ in p.inputs)  # code after the blocks
        nodes[name] = replace(p, inputs=[(_key(n, depth - 1), k) if n in members else (n, k)
                                         for n, k in p.inputs]) if after else p
        group = [name] if p.kind != "op" else ops if ops and name == ops[-1] else []
        for i in range(2, depth) if name in members else ():
            for n in group:
                q = pg.nodes[n]
                inputs = [(_key(m, i), k) if m in members else (_key(twin[m], i - 1), k) if m in twin else (m, k)
                          for m, k in q.inputs]
                nodes[_key(n, i)] = PNode(q.node, q.kind, q.info, q.rule, q.strategies, inputs, q.requires_grad,
                                          label(q.module, i), label(q.block, i), q.owner, q.fallback,
                                          label(q.fqn, i), q.saved_inputs)  # replace(), faster
    out = PlanGraph(nodes, pg.degrees, pg.axis_names)
    for p in nodes.values():
        out.counts[p.owner] = out.counts.get(p.owner, 0) + 1
    prefix = first.rsplit(".", 1)[0]
    out.block_classes = [[f"{prefix}.{i}" for i in range(depth)]]
    return out


def _key(name: str, i: int) -> str:
    """Copy i of a second-block node; copy 1 is the node itself."""
    return name if i == 1 else f"{name}__{i}"


def _relabel(text: str | None, second: str, i: int) -> str | None:
    """'blocks.1.attn.q' -> 'blocks.i.attn.q'."""
    if text is None or not (text == second or text.startswith(second + ".")):
        return text
    return f"{second.rsplit('.', 1)[0]}.{i}{text[len(second):]}"
