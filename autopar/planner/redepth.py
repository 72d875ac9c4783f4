"""The full model's trace from its two-block copy's, without tracing the full model.

The search plans on a copy of the model with two blocks (proxy.py) and maps the chosen plan onto the full model's
trace, whose node names the plan records and whose fingerprint `autopar.compile` checks. torch.export takes about
50 ms per block for that trace (1.6 s for Llama-3-8B's 32 blocks, 4 s for 80). Yet the full graph is the two-block
graph with its second block repeated, node for node:
- block 1's placeholders and ops are copied for blocks 2..L-1. Each copy reads the copy before it where block 1
  reads block 0, and reads the same node where block 1 reads code outside the blocks. The code after the blocks
  reads the last copy.
- Names follow torch.export's. A parameter's is its path (`p_layers_1_attn_q_weight` becomes
  `p_layers_5_attn_q_weight`). An op's is a base name numbered in graph order (`linear_8`). So block k's copy of
  an op numbers k - 1 steps of that base's per-block stride past block 1's, and the code after the blocks
  L - 2 strides past its own.

`Deepening` checks this rule once per model: it derives the three-block graph from the two-block one and compares
it with a real three-block trace, name for name, argument for argument and shape for shape. A model whose blocks
are not alike, or a torch.export that names otherwise, fails the check, and the full model is then traced for real.
Like derived batches (rebatch.py), only the planner sees these graphs. `Captured.program` stays the two-block
one, and `autopar.compile` traces the real model and checks its fingerprint against the plan's.
"""

from __future__ import annotations

import multiprocessing as mp
import re
from typing import Callable

import torch
import torch.fx as fx

from autopar.capture import Captured


class NotDeepenable(Exception):
    """The two-block graph does not repeat into the full one by the rule above."""


class Deepening:
    """`trace(depth, batch)`: the capture of the model at `depth` blocks, derived from `two(batch)` (the two-block
    copy's trace) where the rule holds for this model, else `real(batch)`. `three()` is a real trace of the
    three-block copy at the batch `two` was checked at (CHECK_BATCH)."""

    CHECK_BATCH = 1

    def __init__(self, two: Callable[[int], Captured], three: Callable[[], Captured],
                 real: Callable[[int], Captured]) -> None:
        self.two, self.three, self.real = two, three, real
        self._holds: bool | None = None
        self.why_not: str | None = None  # the first difference found by the check
        self._beside = None  # (process, connection) of a check running in a forked process

    def check_beside(self) -> None:
        """Start the check in a forked process, whose answer `holds` reads: the search runs here meanwhile, and the
        three-block trace (~0.2 s) leaves the end of planning, where nothing else runs beside it. Call it once
        `two(CHECK_BATCH)` is traced, so that the process does not trace it again."""
        ctx = mp.get_context("fork")
        receive, send = ctx.Pipe(duplex=False)
        process = ctx.Process(target=_check_into, args=(self, send), daemon=True)
        process.start()
        send.close()
        self._beside = (process, receive)

    def holds(self) -> bool:
        if self._holds is None and self._beside is not None:
            (process, receive), self._beside = self._beside, None
            try:
                self._holds, self.why_not = receive.recv()
            except (EOFError, OSError):  # the process died before answering: check here
                pass
            finally:
                receive.close()
                process.join()
        if self._holds is None:
            try:
                self.why_not = difference(deepened(self.two(self.CHECK_BATCH), 3), self.three())
            except NotDeepenable as e:
                self.why_not = str(e)
            self._holds = self.why_not is None
        return self._holds

    def __call__(self, depth: int, batch: int) -> Captured:
        if self.holds():
            try:
                return deepened(self.two(batch), depth)
            except NotDeepenable:
                pass
        return self.real(batch)


def _check_into(deepening: Deepening, send) -> None:
    """In the forked process: the check's answer, (holds, why_not), to the parent."""
    send.send((deepening.holds(), deepening.why_not))
    send.close()


def deepened(two: Captured, depth: int) -> Captured:
    """`two` (a trace with two identical blocks) as the trace of the same model with `depth` blocks."""
    nodes = list(two.graph.nodes)
    label = {n.name: _block(n, two) for n in nodes}
    blocks = sorted({b for b in label.values() if b is not None})
    if len(blocks) != 2 or blocks[0].rsplit(".", 1)[0] != blocks[1].rsplit(".", 1)[0] or depth < 2:
        raise NotDeepenable(f"blocks {blocks}: two of one ModuleList are needed")
    first, second = sorted(blocks, key=lambda b: int(b.rsplit(".", 1)[1]))
    prefix = first.rsplit(".", 1)[0]
    b0 = [n for n in nodes if label[n.name] == first]
    b1 = [n for n in nodes if label[n.name] == second]
    if [_op(n) for n in b0] != [_op(n) for n in b1]:
        raise NotDeepenable("the two blocks trace to different ops")
    twin = {a.name: b for a, b in zip(b0, b1)}  # block-0 node -> its block-1 twin
    stride = _strides(b0, b1)
    members = {n.name for n in b1}
    last = {kind: max((i for i, n in enumerate(nodes) if n.name in members and (n.op == "placeholder") == kind),
                      default=None) for kind in (True, False)}

    graph, env = fx.Graph(), {}  # env: (two's node name, copy) -> new node; copy 1 is block 1 itself
    params, buffers, constants = dict(two.params), dict(two.buffers), dict(two.constants)

    def copy(n: fx.Node, k: int) -> None:  # block-1 node n as block k's
        def read(a: fx.Node) -> fx.Node:
            if a.name in members:
                return env[(a.name, k)]
            if a.name in twin:  # block 1 reads block 0 where it reads the block before it
                return env[(twin[a.name].name, k - 1)]
            return env[(a.name, 1)]
        name = _placeholder_name(n.name, second, f"{prefix}.{k}") if n.op == "placeholder" else \
            _shifted(n.name, (k - 1) * stride.get(_base(n.name), 0))
        env[(n.name, k)] = _add(graph, n, name, read, second, f"{prefix}.{k}")
        for table in (params, buffers, constants):
            if n.name in table:
                table[name] = _relabel(table[n.name], second, f"{prefix}.{k}")

    for i, n in enumerate(nodes):
        after = n.op != "placeholder" and last[False] is not None and i > last[False]
        if after:  # code after the blocks: reads the last block, numbered past the copies
            new = _add(graph, n, _shifted(n.name, (depth - 2) * stride.get(_base(n.name), 0)),
                       lambda a: env[(a.name, depth - 1 if a.name in members else 1)])
        else:
            new = _add(graph, n, n.name, lambda a: env[(a.name, 1)])
        env[(n.name, 1)] = env[(n.name, 0)] = new
        if i in (last[True], last[False]):
            for k in range(2, depth):
                for m in (b for b in b1 if (b.op == "placeholder") == (i == last[True])):
                    copy(m, k)
    return Captured(graph, params, buffers, constants, list(two.user_inputs), two.program, two.method)


def _op(n: fx.Node):
    return n.op, None if n.op == "placeholder" else n.target  # a placeholder's target is its name


def _add(graph: fx.Graph, n: fx.Node, name: str, read: Callable[[fx.Node], fx.Node], old: str | None = None,
         new: str | None = None) -> fx.Node:
    args = fx.node.map_arg(n.args, read)
    kwargs = fx.node.map_arg(n.kwargs, read)
    target = name if n.op == "placeholder" else n.target
    out = graph.create_node(n.op, target, args, kwargs, name=name, type_expr=n.type)
    if out.name != name:
        raise NotDeepenable(f"name {name} is taken")
    out.meta = dict(n.meta)
    if old is not None and "nn_module_stack" in n.meta:
        out.meta["nn_module_stack"] = {_relabel(key, old, new): (_relabel(path, old, new), cls)
                                       for key, (path, cls) in n.meta["nn_module_stack"].items()}
    return out


def _block(n: fx.Node, two: Captured) -> str | None:
    """The ModuleList item a node belongs to: its module path's, or its parameter's or buffer's."""
    if n.op == "placeholder":
        path = two.params.get(n.name) or two.buffers.get(n.name) or ""
    elif n.op == "output":
        return None
    else:
        stack = n.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit() and i > 0:
            return ".".join(parts[: i + 1])
    return None


_NUMBERED = re.compile(r"(.*)_(\d+)")


def _base(name: str) -> str:
    m = _NUMBERED.fullmatch(name)
    return m.group(1) if m else name


def _number(name: str) -> int:
    m = _NUMBERED.fullmatch(name)
    return int(m.group(2)) if m else 0


def _shifted(name: str, by: int) -> str:
    n = _number(name) + by
    return _base(name) if n == 0 else f"{_base(name)}_{n}"


def _strides(b0: list[fx.Node], b1: list[fx.Node]) -> dict[str, int]:
    """Per op base name, how far block 1's numbers are past block 0's (the same for every op of that base)."""
    out: dict[str, int] = {}
    for a, b in zip(b0, b1):
        if a.op == "placeholder":
            continue
        if _base(a.name) != _base(b.name):
            raise NotDeepenable(f"{a.name} and {b.name} differ in base name")
        d = _number(b.name) - _number(a.name)
        if out.setdefault(_base(a.name), d) != d:
            raise NotDeepenable(f"{_base(a.name)} ops are not numbered alike block to block")
    return out


def _placeholder_name(name: str, old: str, new: str) -> str:
    """p_layers_1_attn_q_weight -> p_layers_5_attn_q_weight (torch.export names a lifted parameter by its path)."""
    was, to = old.replace(".", "_"), new.replace(".", "_")
    if f"_{was}_" not in name:
        raise NotDeepenable(f"placeholder {name} does not name its block {old}")
    return name.replace(f"_{was}_", f"_{to}_", 1)


def _relabel(text: str, old: str, new: str) -> str:
    """'layers.1.attn.q' -> 'layers.5.attn.q' (the block's path, in a path or a module-stack key)."""
    i = text.find(old)
    if i < 0 or (i + len(old) < len(text) and text[i + len(old)] not in "._"):
        return text
    return text[:i] + new + text[i + len(old):]


def _values(v):
    if isinstance(v, torch.Tensor):
        return (tuple(v.shape), tuple(v.stride()), v.dtype)
    if isinstance(v, (list, tuple)):
        return tuple(_values(x) for x in v)
    return v


def difference(a: Captured, b: Captured) -> str | None:
    """The first way two captures differ for planning (None: none): node names, ops, targets, arguments, module
    paths, values' shapes, strides and dtypes, what their placeholders are."""
    na, nb = list(a.graph.nodes), list(b.graph.nodes)
    if len(na) != len(nb):
        return f"{len(na)} nodes against {len(nb)}"
    for x, y in zip(na, nb):
        if (x.op, x.name, x.target) != (y.op, y.name, y.target):
            return f"node {x.name} ({x.op} {x.target}) against {y.name} ({y.op} {y.target})"
        if str(x.args) != str(y.args) or str(x.kwargs) != str(y.kwargs):
            return f"arguments of {x.name}: {x.args} against {y.args}"
        if _values(x.meta.get("val")) != _values(y.meta.get("val")):
            return f"value of {x.name}"
        paths = [[p for p, _ in (n.meta.get("nn_module_stack") or {}).values()] for n in (x, y)]
        if paths[0] != paths[1]:
            return f"module path of {x.name}: {paths[0]} against {paths[1]}"
    if (a.params, a.buffers, a.constants, a.user_inputs) != (b.params, b.buffers, b.constants, b.user_inputs):
        return "placeholders"
    return None
