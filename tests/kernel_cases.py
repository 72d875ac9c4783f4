"""Each fused kernel's forward and backward, Triton path vs torch reference, on awkward shapes; run as a script
under TRITON_INTERPRET=1 (`TRITON_INTERPRET=1 python -m tests.kernel_cases`), it prints one JSON line per case with
the largest error over outputs and input gradients and the bound it must meet (fp32: 1e-5 absolute; bf16: 2e-2
of the largest reference value). The interpreter must be set before triton is imported, hence a process of its
own (tests/test_kernels.py and tests/benchmarks/bench_kernels.py launch it)."""

from __future__ import annotations

import json
import os
import sys
from typing import Callable

import torch

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _randn(*shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def run(fn: Callable, inputs: tuple, grad_seed: int = 1) -> list[torch.Tensor]:
    """Outputs and input gradients of fn(*inputs) under a fixed random output gradient."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t
              for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(grad_seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs] + [t.grad for t in leaves if isinstance(t, torch.Tensor) and t.grad is not None]


def error(got: list[torch.Tensor], want: list[torch.Tensor], dtype: torch.dtype) -> tuple[float, float]:
    """(largest error, its bound) over matched tensors."""
    assert len(got) == len(want), (len(got), len(want))
    err, bound = 0.0, float("inf")
    for g, w in zip(got, want):
        scale = 1.0 if dtype == torch.float32 else max(w.float().abs().max().item(), 1e-6)
        e = (g.float() - w.float()).abs().max().item()
        if e / (TOL[dtype] * scale) > err / bound if bound != float("inf") else True:
            err, bound = e, TOL[dtype] * scale
    return err, bound


def bias_gelu_case(dtype, approximate):
    from autopar.kernels.bias_gelu import bias_gelu
    x, b = _randn(3, 7, 37, dtype=dtype), _randn(37, dtype=dtype, seed=1)  # 777 elements: a masked tail
    return (lambda x, b: bias_gelu(x, b, approximate)), (x, b)


def swiglu_case(dtype):
    from autopar.kernels.swiglu import swiglu
    return swiglu, (_randn(5, 3, 41, dtype=dtype), _randn(5, 3, 41, dtype=dtype, seed=1))


def add_norm_case(dtype, rms, residual):
    from autopar.kernels.add_norm import add_norm
    x, r = _randn(2, 5, 37, dtype=dtype), _randn(2, 5, 37, dtype=dtype, seed=1)  # 37 columns in a 64-wide block
    w, b = _randn(37, dtype=dtype, seed=2), _randn(37, dtype=dtype, seed=3)

    def fused(x, r, w, b):
        out, h, _ = add_norm(x, r, w, b, 1e-5, rms)
        return (out, h) if residual else out
    return fused, (x, r if residual else None, w, None if rms else b)


def rotary_case(dtype, tables):
    from autopar.kernels.rotary import rotary
    from autopar.models.llama import rope_tables
    cos, sin = rope_tables(7, 10, 1e4, dtype)  # head dim 10: half 5 in an 8-wide block
    if tables == "transformers":  # [b, 1, s, d], as transformers' apply_rotary_pos_emb unsqueezes them
        cos, sin = cos.expand(3, 7, 10)[:, None].contiguous(), sin.expand(3, 7, 10)[:, None].contiguous()
    x = _randn(3, 7, 5, 10, dtype=dtype).transpose(1, 2)  # a transposed view, as attention makes it
    return (lambda x: rotary(x, cos, sin)), (x,)


def cross_entropy_case(dtype):
    from autopar.kernels import linear_cross_entropy as lce
    lce.VOCAB_BLOCK = 64  # 300 classes: 4 full blocks and a masked tail of 44
    x, w = _randn(13, 24, dtype=dtype), _randn(300, 24, dtype=dtype, seed=1)
    target = torch.randint(0, 300, (13,), generator=torch.Generator().manual_seed(2))
    target[3] = -100  # an ignored row counts zero
    return (lambda x, w: lce.fused_linear_cross_entropy(x, w, target, chunk=5)), (x, w)  # chunks 5, 5, 3


def cross_entropy_shard_case(dtype):
    """A vocab shard of 37 classes starting at class 100: targets elsewhere pick 0, max and sum-exp stay local."""
    from autopar.kernels import linear_cross_entropy as lce
    lce.VOCAB_BLOCK = 16
    x, w = _randn(6, 8, dtype=dtype), _randn(37, 8, dtype=dtype, seed=1)
    target = torch.tensor([100, 136, 5, 120, 137, 101])
    return (lambda x, w: lce.fused_linear_cross_entropy(x, w, target, vocab_start=100)), (x, w)


DT = {"fp32": torch.float32, "bf16": torch.bfloat16}
CASES: dict[str, Callable] = {}
for _d in DT:
    for _a in ("none", "tanh"):
        CASES[f"bias_gelu-{_a}-{_d}"] = lambda d=_d, a=_a: bias_gelu_case(DT[d], a)
    CASES[f"swiglu-{_d}"] = lambda d=_d: swiglu_case(DT[d])
    for _rms in (False, True):
        for _res in (True, False):
            CASES[f"add_norm-{'rms' if _rms else 'ln'}-{'res' if _res else 'nores'}-{_d}"] = \
                lambda d=_d, r=_rms, s=_res: add_norm_case(DT[d], r, s)
    for _t in ("autopar", "transformers"):
        CASES[f"rotary-{_t}-{_d}"] = lambda d=_d, t=_t: rotary_case(DT[d], t)
    CASES[f"cross_entropy-{_d}"] = lambda d=_d: cross_entropy_case(DT[d])
CASES["cross_entropy_shard-fp32"] = lambda: cross_entropy_shard_case(torch.float32)


def check(name: str) -> dict:
    fn, inputs = CASES[name]()
    dtype = DT[name.rsplit("-", 1)[1]]
    os.environ["TRITON_INTERPRET"] = "1"
    got = run(fn, inputs)
    os.environ["TRITON_INTERPRET"] = "0"  # the same op, reference path
    want = run(fn, inputs)
    os.environ["TRITON_INTERPRET"] = "1"
    err, bound = error(got, want, dtype)
    return {"case": name, "err": err, "bound": bound}


def main(names: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("run with TRITON_INTERPRET=1 set in the environment", file=sys.stderr)
        return 2
    for name in names or list(CASES):
        print(json.dumps(check(name)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
