"""Fused kernels: each Triton kernel, forward and backward, under TRITON_INTERPRET=1 against its op's torch
reference path (tests/kernel_cases.py, one interpreter process for all cases), and each reference path against
the unfused eager chain a model writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.dist_utils import ROOT
from tests.kernel_cases import CASES, DT, error, run


@pytest.fixture(scope="module")
def interpreted() -> dict[str, dict]:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "tests.kernel_cases"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return {r["case"]: r for r in map(json.loads, out.stdout.splitlines())}


@pytest.mark.parametrize("case", list(CASES))
def test_triton_matches_reference(interpreted, case):
    r = interpreted[case]
    assert r["err"] <= r["bound"], r


def _eager_rmsnorm(h, w, eps=1e-5):
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w


def _eager_chain(case: str):
    """The unfused chain each case's op replaces, as models write it."""
    kind = case.split("-")[0]
    if kind == "bias_gelu":
        return lambda x, b: F.gelu(x + b, approximate=case.split("-")[1])
    if kind == "swiglu":
        return lambda a, b: F.silu(a) * b
    if kind == "add_norm":
        rms, res = "rms" in case, "-res-" in case

        def norm(x, r, w, b):
            h = x + r if res else x
            out = _eager_rmsnorm(h, w) if rms else F.layer_norm(h, h.shape[-1:], w, b, 1e-5)
            return (out, h) if res else out
        return norm
    raise KeyError(case)


@pytest.mark.parametrize("case", [c for c in CASES if c.split("-")[0] in ("bias_gelu", "swiglu", "add_norm")])
def test_reference_matches_eager(case):
    fn, inputs = CASES[case]()
    dtype = DT[case.rsplit("-", 1)[1]]
    err, bound = error(run(fn, inputs), run(_eager_chain(case), inputs), dtype)
    assert err <= bound, (err, bound)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_reference_matches_eager(dtype):
    from autopar.kernels.rotary import rotary
    from autopar.models.llama import apply_rope, rope_tables
    cos, sin = rope_tables(7, 10, 1e4, dtype)
    x = torch.randn(3, 7, 5, 10).to(dtype).transpose(1, 2)
    err, bound = error(run(lambda x: rotary(x, cos, sin), (x,)), run(lambda x: apply_rope(x, cos, sin), (x,)), dtype)
    assert err <= bound, (err, bound)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_reference_matches_eager(dtype):
    """Chunked, with an ignored row, against F.cross_entropy over the whole logits."""
    from autopar.kernels.linear_cross_entropy import fused_linear_cross_entropy
    gen = torch.Generator().manual_seed(0)
    x, w = (0.25 * torch.randn(13, 24, generator=gen)).to(dtype), torch.randn(300, 24, generator=gen).to(dtype)
    target = torch.randint(0, 300, (13,), generator=gen)
    target[3] = -100
    err, bound = error(run(lambda x, w: fused_linear_cross_entropy(x, w, target, chunk=5), (x, w)),
                       run(lambda x, w: F.cross_entropy((x @ w.t()).float(), target, reduction="sum"), (x, w)), dtype)
    assert err <= bound, (err, bound)


def test_interpreter_set_late_is_a_clear_error():
    """TRITON_INTERPRET=1 set after triton was imported cannot work; the op says so instead of failing deep."""
    pytest.importorskip("triton")
    code = ("import os, torch\nfrom autopar.kernels.swiglu import swiglu\nos.environ['TRITON_INTERPRET'] = '1'\n"
            "swiglu(torch.randn(3), torch.randn(3))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=300)
    assert out.returncode != 0 and "before starting Python" in out.stderr
