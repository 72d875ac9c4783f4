"""Advanced indexing `x[i0, i1, ...]` (aten.index.Tensor) with integer index tensors on x's leading dims: a gather.

The output is [broadcast shape of the indices] + x's remaining dims. Each lookup is independent, so a dim of the
broadcast index shape shards with every index tensor that has it at full size (x whole, like an embedding's ids);
a remaining dim of x shards with the output dim it is copied to (indices whole). Gathering is linear in x: P -> P.
Index lists with gaps (None) move the broadcast dims, and boolean masks give data-dependent shapes: replicated.
"""

from __future__ import annotations

import torch

from autopar.placement import R, S
from autopar.strategies.base import OpInfo, Strategy1D, linear_partial, register, replicated

aten = torch.ops.aten


@register(aten.index)
def index(info: OpInfo) -> list[Strategy1D]:
    n = len(info.in_shapes)
    indices = info.arg(1, "indices") or []
    strategies = [replicated(n), linear_partial(n, [0])]
    if any(i is None for i in indices) or torch.bool in info.in_dtypes[1:]:
        return strategies
    x, out = info.in_shapes[0], info.out_shapes[0]
    k = len(indices)
    b = len(out) - (len(x) - k)  # rank of the broadcast index shape
    for d in range(b):
        ins = [R]
        for shape in info.in_shapes[1:]:
            j = d - (b - len(shape))  # index tensors broadcast against each other from the right
            ins.append(S(j) if j >= 0 and shape[j] == out[d] else R)
        strategies.append(Strategy1D(outs=(S(d),), ins=tuple(ins)))
    for j in range(k, len(x)):
        strategies.append(Strategy1D(outs=(S(b + j - k),), ins=(S(j),) + (R,) * (n - 1)))
    return strategies
