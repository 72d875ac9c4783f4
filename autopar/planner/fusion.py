"""Fusion: which op chains of a traced graph run as one fused kernel (autopar/kernels), and what that saves.

Chains are matched by op pattern on the ATen graph, never by module names, so autopar's models and transformers
models match alike; codegen/fuse.py rewrites the same chains in each rank's program. Kinds:
- add_norm: residual add + LayerNorm or written-out RMSNorm (pow, mean, add eps, rsqrt, mul, mul weight) inside
  one block; `norm`: such an RMSNorm with no add before it;
- swiglu: silu(a) * b;  bias_gelu: a Linear's bias add + GELU;  rotary: x * cos + cat(-x2, x1) * sin;
- cross_entropy: the head Linear (no bias) + view + cross_entropy_loss, chunked over tokens.

What a fused chain costs and saves is priced where every op is (cost.py, `fused`); the plan's per-kind summary
is predict.py's. This module imports nothing of the planner (tests/test_planner_imports.py).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

aten = torch.ops.aten
FUSION_KINDS = ("add_norm", "norm", "swiglu", "bias_gelu", "rotary", "cross_entropy")
_END = 2 ** 63 - 1  # slice(x, d, h, END): how export writes x[..., h:]


@dataclass(frozen=True)
class Chain:
    kind: str
    members: tuple[str, ...]  # node names the fused op replaces, in graph order; anchor (its main output) last
    inputs: tuple[tuple[str, int] | None, ...]  # per op input: (member, position in its flattened args)
    params: tuple[Any, ...] = ()  # scalars: eps, rms / approximate / ignore_index
    residual_out: str | None = None  # add_norm: the add, whose value the op also returns
    hidden: int = 0  # cross_entropy: the head's input width

    @property
    def anchor(self) -> str:
        return self.members[-1]


def flat_args(n: fx.Node) -> list:
    out: list = []
    for a in list(n.args) + list(n.kwargs.values()):
        out.extend(a if isinstance(a, (list, tuple)) else [a])
    return out


def _is(n, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def _only_user(n: fx.Node, user: fx.Node) -> bool:
    return list(n.users) == [user]


def _shape(n) -> tuple[int, ...] | None:
    val = n.meta.get("val") if isinstance(n, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _other(n: fx.Node, known: fx.Node):
    """The other operand of a binary op, and its flattened position."""
    a, b = n.args[0], n.args[1]
    return (b, 1) if a is known else (a, 0)


def _module(n: fx.Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _noop_to(n) -> bool:
    """`.to(dtype)` of a tensor already of that dtype (transformers' norms write them): a no-op to fuse over."""
    if not _is(n, aten.to.dtype, aten._to_copy.default) or not isinstance(n.args[0], fx.Node):
        return False
    a, b = n.args[0].meta.get("val"), n.meta.get("val")
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype


def _rms(mul_w: fx.Node):
    """mul(mul(h, rsqrt(add(mean(pow(h, 2), [-1], True), eps))), weight), either operand order, with no-op
    `.to(dtype)` around h and the normalised value allowed: (h, nodes, eps, weight ref)."""
    for inner, pos in ((mul_w.args[0], 0), (mul_w.args[1], 1)):
        cast = None
        if _noop_to(inner) and _only_user(inner, mul_w):
            cast, inner = inner, inner.args[0]
        if not _is(inner, aten.mul.Tensor) or not _only_user(inner, cast or mul_w):
            continue
        for r, hpos in ((inner.args[1], 0), (inner.args[0], 1)):
            h = inner.args[hpos]
            if not (_is(r, aten.rsqrt.default) and _only_user(r, inner) and _is(r.args[0], aten.add.Tensor)):
                continue
            add = r.args[0]
            mean = add.args[0]
            if not (_only_user(add, r) and isinstance(add.args[1], float) and _is(mean, aten.mean.dim)
                    and _only_user(mean, add) and _is(mean.args[0], aten.pow.Tensor_Scalar)):
                continue
            pw = mean.args[0]
            rank = len(_shape(h) or ())
            dims = [d % rank for d in mean.args[1]] if rank else []
            if not (pw.args[0] is h and pw.args[1] == 2 and _only_user(pw, mean) and dims == [rank - 1] and
                    (mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim"))):
                continue
            nodes = (pw, mean, add, r, inner) + ((cast,) if cast else ()) + (mul_w,)
            if _noop_to(h) and set(h.users) == {pw, inner}:
                h, nodes = h.args[0], (h,) + nodes
            return h, nodes, add.args[1], (mul_w.name, 1 - pos)
    return None


def _norm_chain(n: fx.Node) -> Chain | None:
    if _is(n, aten.layer_norm.default) and len(n.args[1]) == 1:
        h, nodes, eps, rms = n.args[0], (n,), (n.args[4] if len(n.args) > 4 else 1e-5), False
        weight = (n.name, 2) if len(n.args) > 2 and n.args[2] is not None else None
        bias = (n.name, 3) if len(n.args) > 3 and n.args[3] is not None else None
    elif _is(n, aten.mul.Tensor) and (found := _rms(n)):
        h, nodes, eps, weight = found
        rms, bias = True, None
    else:
        return None
    residual, cast = h, None
    if _noop_to(h) and _is(h.args[0], aten.add.Tensor) and list(h.args[0].users) == [h]:
        residual, cast, h = h, h, h.args[0]  # transformers: the residual is the cast sum, shared with the norm
    add = h if _is(h, aten.add.Tensor) and len(h.args) == 2 and not h.kwargs else None
    if add is not None and _shape(add.args[0]) == _shape(add.args[1]) == _shape(add) and \
            _module(n).startswith(_module(add)):  # the add belongs to a module around the norm: the same block
        head = (add.name,) + ((cast.name,) if cast is not None else ())
        return Chain("add_norm", head + tuple(m.name for m in nodes),
                     ((add.name, 0), (add.name, 1), weight, bias), (eps, rms), residual_out=residual.name)
    if not rms:
        return None  # LayerNorm alone is one kernel already
    return Chain("norm", tuple(m.name for m in nodes), ((nodes[0].name, 0), None, weight, None), (eps, True))


VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints)


def _swiglu(n: fx.Node) -> Chain | None:
    if not _is(n, aten.mul.Tensor):
        return None
    for silu, pos in ((n.args[0], 0), (n.args[1], 1)):
        b = n.args[1 - pos]
        if _is(silu, aten.silu.default) and _only_user(silu, n) and isinstance(b, fx.Node) and \
                _shape(b) == _shape(silu):
            return Chain("swiglu", (silu.name, n.name), ((silu.name, 0), (n.name, 1 - pos)))
    return None


def _bias_gelu(n: fx.Node) -> Chain | None:
    lin = n.args[0] if _is(n, aten.gelu.default) else None
    if lin is None or not _is(lin, aten.linear.default) or len(lin.args) < 3 or lin.args[2] is None \
            or not _only_user(lin, n):
        return None
    approximate = n.kwargs.get("approximate", n.args[1] if len(n.args) > 1 else "none")
    return Chain("bias_gelu", (lin.name, n.name), ((lin.name, 0), (lin.name, 1), (lin.name, 2)), (approximate,))


def _rotary(n: fx.Node) -> Chain | None:
    """add(mul(x, cos), mul(cat([neg(slice(x, d, h, END)), slice(x, d, 0, h)], -1), sin)), operands in any order."""
    if not _is(n, aten.add.Tensor) or len(n.args) != 2 or not all(_is(a, aten.mul.Tensor) for a in n.args):
        return None
    for m_cos, m_sin in ((n.args[0], n.args[1]), (n.args[1], n.args[0])):
        for cat, spos in ((m_sin.args[0], 0), (m_sin.args[1], 1)):
            if not (_is(cat, aten.cat.default) and len(cat.args[0]) == 2 and _only_user(cat, m_sin)):
                continue
            neg, lo = cat.args[0]
            if not (_is(neg, aten.neg.default) and _is(neg.args[0], aten.slice.Tensor) and
                    _is(lo, aten.slice.Tensor) and _only_user(neg, cat)):
                continue
            hi = neg.args[0]
            x = hi.args[0]
            shape = _shape(x)
            if shape is None or lo.args[0] is not x or x not in m_cos.args or not shape[-1] % 2 == 0:
                continue
            rank, half = len(shape), shape[-1] // 2
            dims_ok = all(a.args[1] % rank == rank - 1 for a in (hi, lo)) and cat.args[1] % rank == rank - 1
            if dims_ok and tuple(hi.args[2:4]) in ((half, _END), (half, shape[-1])) and \
                    tuple(lo.args[2:4]) == (0, half) and _only_user(hi, neg) and _only_user(lo, cat) and \
                    _only_user(m_cos, n) and _only_user(m_sin, n) and _shape(n) == shape:
                xpos = list(m_cos.args).index(x)
                return Chain("rotary", (hi.name, neg.name, lo.name, cat.name, m_cos.name, m_sin.name, n.name),
                             ((m_cos.name, xpos), (m_cos.name, 1 - xpos), (m_sin.name, 1 - spos)))
    return None


def _cross_entropy(n: fx.Node) -> Chain | None:
    """linear(x, W) -> view(-1, V) -> cross_entropy_loss(logits, target), mean or sum, no weight or smoothing."""
    if not _is(n, aten.cross_entropy_loss.default):
        return None
    args = list(n.args) + [None] * (6 - len(n.args))
    weight, reduction = args[2] if len(n.args) > 2 else None, args[3] if len(n.args) > 3 else 1
    ignore, smoothing = (args[4] if len(n.args) > 4 else -100), (args[5] if len(n.args) > 5 else 0.0)
    if weight is not None or reduction not in (1, 2) or smoothing or n.kwargs or len(_shape(n.args[0]) or ()) != 2:
        return None
    mids, lin = [], n.args[0]  # views (and no-op casts) between the head and the loss
    while (_is(lin, *VIEWS) or _noop_to(lin)) and _only_user(lin, mids[-1] if mids else n):
        mids.append(lin)
        lin = lin.args[0]
    if not mids or not _is(lin, aten.linear.default) or (len(lin.args) > 2 and lin.args[2] is not None) or \
            not _only_user(lin, mids[-1]):
        return None
    hidden = (_shape(lin.args[1]) or (0, 0))[1]
    names = (lin.name,) + tuple(m.name for m in reversed(mids)) + (n.name,)
    return Chain("cross_entropy", names, ((lin.name, 0), (lin.name, 1), (n.name, 1)), (ignore, reduction),
                 hidden=hidden)


MATCHERS = (_cross_entropy, _norm_chain, _swiglu, _bias_gelu, _rotary)
_CACHE: "weakref.WeakKeyDictionary[fx.Graph, dict[str, Chain]]" = weakref.WeakKeyDictionary()


def find_chains(graph: fx.Graph) -> list[Chain]:
    """Every fusable chain, each node in at most one (the first matcher to claim it wins)."""
    claimed: set[str] = set()
    chains: list[Chain] = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        for match in MATCHERS:
            chain = match(node)
            if chain is not None and not claimed & set(chain.members):
                chains.append(chain)
                claimed |= set(chain.members)
                break
    return chains


def chain_of(node: fx.Node) -> Chain | None:
    """The chain this node belongs to (chains found once per graph)."""
    if node.graph not in _CACHE:
        _CACHE[node.graph] = {m: c for c in find_chains(node.graph) for m in c.members}
    return _CACHE[node.graph].get(node.name)
