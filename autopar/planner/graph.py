"""The planning graph: every traced node with its shapes, its candidate strategies on a mesh, and which node of a
repeated layer owns its decision variables.

Analysis results live in `PNode` objects keyed by fx node name, never in globals. Repeated layers (identical
transformer blocks: same ops, shapes and parameter shapes, in the same order) share one set of decisions: the
first block of each class is the template; `owner` maps every node to its template node (DESIGN decision 4).
Blocks are the items of an nn.ModuleList (module paths ending in `.<index>`); their equality is checked on an
exact ordered signature, which also gives the node-to-node correspondence a structural hash alone would not.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
import torch.fx as fx

from autopar.capture import Captured
from autopar.errors import MeshError
from autopar.placement import R, S
from autopar.strategies import (OpInfo, OpRule, Strategy, Strategy1D, expand, op_name, packet_of, rule_for,
                                tensor_inputs, tensor_values)

@dataclass
class PNode:
    node: fx.Node
    kind: str  # "param" | "buffer" | "input" | "op" | "output"
    info: OpInfo
    rule: OpRule | None  # None for placeholders, outputs and ops without a rule
    strategies: list[Strategy]
    inputs: list[tuple[str, int]]  # (producer name, producer output index) per tensor input
    requires_grad: bool
    module: str  # module path ("blocks.0.attn"), "" at top level
    block: str | None = None  # "blocks.0" for nodes inside a repeated-layer item
    owner: str = ""  # template node whose decisions this node shares
    fallback: bool = False  # no rule: replicated at its true cost
    fqn: str | None = None  # parameter / buffer name
    saved_inputs: tuple[int, ...] = ()  # inputs whose consumed copy autograd keeps (activations, not weights)


@dataclass
class PlanGraph:
    nodes: dict[str, PNode]  # in graph (topological) order
    degrees: tuple[int, ...]
    axis_names: tuple[str, ...]
    counts: dict[str, int] = field(default_factory=dict)  # owner -> how many nodes share it
    block_classes: list[list[str]] = field(default_factory=list)  # each: block names sharing a template

    def owners(self) -> list[PNode]:
        """The nodes that own decisions, in graph order (computed once: a graph's nodes do not change once built)."""
        if "_owners" not in self.__dict__:
            self.__dict__["_owners"] = [p for p in self.nodes.values() if p.owner == p.node.name]
        return self.__dict__["_owners"]


def differentiable(dtype: torch.dtype) -> bool:
    """Autograd carries gradients through floating and complex tensors alike: a complex intermediate (a rotation
    as complex pairs, an FFT) between two weights must not end the gradient path the planner and codegen see."""
    return dtype.is_floating_point or dtype.is_complex


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] for v in stack.values()]
    return paths[-1] if paths else ""


def _block_of(path: str) -> str | None:
    """Outermost ModuleList item on a module path: 'blocks.3.attn.q' -> 'blocks.3'."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit() and i > 0:
            return ".".join(parts[: i + 1])
    return None


def _info(node: fx.Node, graph_nodes: dict[str, fx.Node], inputs: list[tuple[str, int]]) -> OpInfo:
    ins = [tensor_values(graph_nodes[name])[idx] for name, idx in inputs]
    outs = tensor_values(node)
    return OpInfo(node, tuple(tuple(t.shape) for t in ins), tuple(tuple(t.shape) for t in outs),
                  tuple(t.dtype for t in ins), tuple(t.dtype for t in outs))


def _placeholder_rules(shape: Sequence[int]) -> list[Strategy1D]:
    return [Strategy1D(outs=(R,), ins=())] + [Strategy1D(outs=(S(d),), ins=()) for d in range(len(shape))]


def build(captured: Captured, degrees: Sequence[int], axis_names: Sequence[str]) -> PlanGraph:
    """Planning graph on a mesh. The mesh-independent analysis is cached on `captured`; strategies are
    enumerated once per owner and shared by the nodes it owns."""
    base = captured.analysis
    if base is None:
        base = captured.analysis = _analyse(captured)
    nodes: dict[str, PNode] = {}
    for name, b in base.items():
        if b.owner == name:
            strategies = _role_strategies(b, degrees, axis_names, base)
        else:
            strategies = nodes[b.owner].strategies
        nodes[name] = replace(b, strategies=strategies)
    pg = PlanGraph(nodes, tuple(degrees), tuple(axis_names))
    for p in nodes.values():
        pg.counts[p.owner] = pg.counts.get(p.owner, 0) + 1
    pg.block_classes = captured.block_classes
    return pg


def _analyse(captured: Captured) -> dict[str, PNode]:
    graph_nodes = {n.name: n for n in captured.graph.nodes}
    nodes: dict[str, PNode] = {}
    for node in captured.graph.nodes:
        nodes[node.name] = _pnode(node, captured, graph_nodes, nodes)
    captured.block_classes = _assign_owners(nodes)
    _count_saved_once(nodes)
    return nodes


def _count_saved_once(nodes: dict[str, PNode]) -> None:
    """Autograd keeps one copy of a tensor however many ops save it (q, k and v all save the same normed input):
    each saved tensor, traced back through views to the tensor that owns its storage, is counted by its producer
    when the producer saves its output, else by the first consumer that saves it (`saved_inputs` keeps only the
    inputs counted there). A consumer that saves a redistributed copy is approximated by the tensor it came from.
    A reshape of a transposed tensor copies (torch cannot view it), so its output owns new storage. A view of a
    parameter or buffer (RoPE's cos/sin rows) keeps their storage, which is model state, not an activation."""
    counted: set[tuple[str, int]] = set()
    for name, p in nodes.items():
        saves = p.rule.saves if p.rule else "inputs+output"
        if p.kind == "op" and p.requires_grad and "output" in saves:
            counted.update(storage_root(nodes, (name, k)) for k in range(len(p.info.out_shapes)))
        elif p.kind == "op" and p.requires_grad and saves == "mask":
            counted.add((name, 1))
    for p in nodes.values():
        keep = []
        saves = p.rule.saves if p.rule else "inputs+output"
        saves_inputs = p.requires_grad and ("inputs" in saves or saves == "others")
        for j in p.saved_inputs if saves_inputs else ():
            key = storage_root(nodes, p.inputs[j])
            if key not in counted and nodes[key[0]].kind not in ("param", "buffer"):
                counted.add(key)
                keep.append(j)
        p.saved_inputs = tuple(keep)


def storage_root(nodes: dict[str, PNode], key: tuple[str, int]) -> tuple[str, int]:
    """(node, output) whose storage the tensor `key` views: back through ops that move no data."""
    p = nodes[key[0]]
    while p.kind == "op" and p.rule is not None and p.rule.moves_no_data and len(p.inputs) == 1 \
            and not _copies(p, nodes):
        key = p.inputs[0]
        p = nodes[key[0]]
    return key


_PERMUTING = ("transpose", "permute", "t", "numpy_T")


def _copies(p: PNode, nodes: dict[str, PNode]) -> bool:
    """A reshape whose input is (a view of) a transposed tensor: the data is copied. Except after attention:
    the SDPA kernels (flash, memory-efficient, CPU) lay their output out as (batch, seq, heads, dim), so the usual
    transpose-and-merge-heads is a view."""
    if packet_of(p.node.target) is not torch.ops.aten.reshape:
        return False
    q, permuted = nodes[p.inputs[0][0]], False
    while q.kind == "op" and q.rule is not None and q.rule.moves_no_data and len(q.inputs) == 1:
        permuted = permuted or op_name(q.node.target) in _PERMUTING
        q = nodes[q.inputs[0][0]]
    return permuted and "scaled_dot_product" not in str(q.node.target)


def _role_strategies(p: PNode, degrees: Sequence[int], axis_names: Sequence[str],
                     nodes: dict[str, PNode]) -> list[Strategy]:
    every = _strategies(p, degrees)
    fitting = [s for s in every if _fits_role(p, s, degrees, axis_names, nodes)]
    if fitting or p.kind != "input":  # an op no role placement divides keeps its free choice
        return fitting or every
    shape = p.info.out_shapes[0]
    mesh = " x ".join(f"{a}={d}" for a, d in zip(axis_names, degrees))
    raise MeshError(f"input '{p.node.name}' of shape {list(shape)} cannot be split over the mesh {mesh}: its batch "
                    f"dim {shape[0]} must be divisible by dp; use a batch that is a multiple of the dp degree")


def _fits_role(p: PNode, s: Strategy, degrees: Sequence[int], axis_names: Sequence[str],
               nodes: dict[str, PNode]) -> bool:
    """What the axis names promise a user; everything else stays the solver's choice.

    dp: every rank works on its own slice of the batch: inputs S0, and matmul-like ops take their activation
    operand batch-sharded (S0); parameters are replicated (ZeRO shards their states). tp: the ranks of a group see the same batch (inputs R) and every matmul-like op
    consumes its weight matrices split (column, row, heads, vocab: whichever dim is cheapest)."""
    is_matmul = p.kind == "op" and p.rule is not None and p.rule.is_matmul
    if p.kind == "param" and "dp" in axis_names and p.info.out_shapes:  # dp replicates parameters; sharding their
        dp = axis_names.index("dp")  # states over dp is the ZeRO stage's job (DESIGN decision 2), not a placement
        return degrees[dp] == 1 or s.outs[0][dp] == R
    if p.kind != "input" and not is_matmul or not p.info.out_shapes:
        return True
    for axis, (name, degree) in enumerate(zip(axis_names, degrees)):
        if degree == 1:
            continue
        if p.kind == "input" and p.info.out_shapes[0]:
            if name == "dp" and s.outs[0][axis] != S(0) or name == "tp" and s.outs[0][axis] != R:
                return False
        if is_matmul and name == "dp" and s.ins[_activation(p, nodes)][axis] != S(0):
            return False
        if is_matmul and name == "tp":
            weights = [j for j, (n, _) in enumerate(p.inputs)
                       if nodes[n].kind == "param" and len(p.info.in_shapes[j]) >= 2]
            if any(not s.ins[j][axis].is_shard for j in weights):
                return False
    return True


def _activation(p: PNode, nodes: dict[str, PNode]) -> int:
    """A matmul's activation operand: its first input that is not a parameter (addmm's is 1, after the bias)."""
    return next((j for j, (n, _) in enumerate(p.inputs) if nodes[n].kind not in ("param", "buffer")), 0)


def _strategies(p: PNode, degrees: Sequence[int]) -> list[Strategy]:
    if p.kind == "output":
        return [Strategy(outs=(), ins=tuple((R,) * len(degrees) for _ in p.inputs))]
    if p.kind != "op":
        rules = _placeholder_rules(p.info.out_shapes[0]) if p.info.out_shapes else [Strategy1D((), ())]
    elif p.rule is not None and not draws_random(p.node):
        rules = p.rule.strategies(p.info)
    else:  # no rule, or a random op (see draws_random): whole tensors on every rank
        rules = [Strategy1D((R,) * len(p.info.out_shapes), (R,) * len(p.inputs))]
    return expand(rules, degrees, p.info) or expand(rules[:1], degrees, p.info)


def draws_random(node: fx.Node) -> bool:
    """Ops that draw from the random generator (dropout, rand_like, bernoulli, ...: aten's `nondeterministic_seeded`
    tag). A rank that draws only its shard draws different numbers from one process drawing the whole tensor, and
    partial sums would get a mask per addend; run whole on every rank from the same generator state, they draw
    exactly what one process draws, and consumers take their shard locally (issue 18)."""
    if node.op != "call_function" or torch.Tag.nondeterministic_seeded not in getattr(node.target, "tags", ()):
        return False
    probability = _DROPOUT_ARG.get(packet_of(node.target))  # tagged for a dropout they may not do
    if probability is None:
        return True
    (index, name), default = probability
    p = node.args[index] if len(node.args) > index else node.kwargs.get(name, default)
    train = node.args[2] if probability[0][0] == 1 and len(node.args) > 2 else node.kwargs.get("train", True)
    return bool(p) and train is not False


_aten = torch.ops.aten
# (argument index, name), default of the dropout probability of ops that draw only when it is > 0 (and training)
_DROPOUT_ARG = {_aten.dropout: ((1, "p"), 0.5), _aten.native_dropout: ((1, "p"), 0.5),
                _aten.feature_dropout: ((1, "p"), 0.5), _aten.alpha_dropout: ((1, "p"), 0.5),
                _aten.scaled_dot_product_attention: ((4, "dropout_p"), 0.0)}


def _pnode(node: fx.Node, captured: Captured, graph_nodes, done: dict[str, PNode]) -> PNode:
    if node.op == "placeholder":
        kind = captured.placeholder_kind(node.name)
        fqn = captured.params.get(node.name) or captured.buffers.get(node.name) or captured.constants.get(node.name)
        block = _block_of(fqn or "")
        return PNode(node, kind, _info(node, graph_nodes, []), None, [], [], kind == "param", block or "", block,
                     fqn=fqn)
    inputs = [(n.name, k) for n, k in tensor_inputs(node)] if tensor_values(node) or node.op == "output" else []
    info = _info(node, graph_nodes, inputs)
    requires_grad = any(done[n].requires_grad for n, _ in inputs) and any(
        differentiable(t.dtype) for t in tensor_values(node))
    if node.op == "output":
        return PNode(node, "output", info, None, [], inputs, requires_grad, "")
    rule = rule_for(node.target) if node.op == "call_function" else None
    path = _module_path(node)
    saved = tuple(j for j, (n, k) in enumerate(inputs) if done[n].kind in ("op", "input")
                  and differentiable(info.in_dtypes[j]))
    if rule is not None and rule.saves == "others":  # x * c with c a constant or a buffer keeps nothing
        saved = tuple(j for j in saved if any(done[n].requires_grad for i, (n, _) in enumerate(inputs) if i != j))
    return PNode(node, "op", info, rule, [], inputs, requires_grad, path, _block_of(path),
                 fallback=rule is None and bool(info.out_shapes), saved_inputs=saved)


def _assign_owners(nodes: dict[str, PNode]) -> list[list[str]]:
    blocks: dict[str, list[str]] = {}
    for name, p in nodes.items():
        p.owner = name
        if p.block is not None:
            blocks.setdefault(p.block, []).append(name)
    templates: dict[tuple, str] = {}
    classes: dict[str, list[str]] = {}
    for block, members in blocks.items():
        template = templates.setdefault(_signature(nodes, members), block)
        classes.setdefault(template, []).append(block)
        if template != block:
            for mine, theirs in zip(members, blocks[template]):
                nodes[mine].owner = theirs
    return [v for v in classes.values() if len(v) > 1]


def _signature(nodes: dict[str, PNode], members: list[str]) -> tuple:
    """Exact ordered structure of a block: ops, shapes, constant args, and internal wiring by position."""
    index = {name: i for i, name in enumerate(members)}
    sig = []
    for name in members:
        p = nodes[name]
        wiring = tuple((index[n], k) if n in index else ("ext", nodes[n].kind, nodes[n].info.out_shapes)
                       for n, k in p.inputs)
        consts = fx.node.map_arg((p.node.args, p.node.kwargs), lambda n: "<tensor>")
        sig.append((p.kind, str(p.node.target) if p.kind == "op" else "", p.info.out_shapes, p.info.out_dtypes, wiring, repr(consts)))
    return tuple(sig)
