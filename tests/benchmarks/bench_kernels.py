"""Fused kernels: speed on a GPU, correctness everywhere.

    python tests/benchmarks/bench_kernels.py [--json OUT]

On a CUDA GPU: for each fused op (autopar/kernels), forward + backward of the Triton kernel against the same
chain in eager PyTorch and under torch.compile, at a Llama-3-8B-like layer shape in bf16 (median of CUDA-event
timed repeats after warm-up); then one training step of a ~350M GPT (24 layers, hidden 1024, vocab 50304, seq 1024)
compiled by autopar on one rank with fusion on and off. Goal on H100-class GPUs: every kernel >= 1.5x eager and
>= 1.0x torch.compile.
Without a GPU: runs the Triton kernels under TRITON_INTERPRET=1 against their reference paths (the cases of
tests/kernel_cases.py) and says that it measured no speed. Measures, never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from _machine import describe  # noqa: E402

TOKENS, HIDDEN, FFN, HEADS, HEAD_DIM, VOCAB = 8192, 4096, 14336, 32, 128, 128256


def chains(dev: str, dt: torch.dtype) -> dict:
    """name -> (fused fn, eager fn, inputs): the same computation, fused and as a model writes it."""
    from autopar.kernels.ops import add_norm, bias_gelu, linear_cross_entropy, rotary, swiglu
    from autopar.models.llama import apply_rope, rope_tables

    def r(*shape, grad=True):
        return torch.randn(*shape, device=dev, dtype=dt, requires_grad=grad)
    cos, sin = (t.to(dev) for t in rope_tables(2048, HEAD_DIM, 5e5, dt))
    rms = lambda h, w: h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * w  # noqa: E731
    target = torch.randint(0, VOCAB, (TOKENS // 4,), device=dev)
    return {
        "bias_gelu (tanh)": (lambda x, b: bias_gelu.bias_gelu(x, b, "tanh"),
                             lambda x, b: F.gelu(x + b, approximate="tanh"), (r(TOKENS, FFN), r(FFN))),
        "swiglu": (swiglu.swiglu, lambda a, b: F.silu(a) * b, (r(TOKENS, FFN), r(TOKENS, FFN))),
        "add + rmsnorm": (lambda x, res, w: add_norm.add_norm(x, res, w, None, 1e-5, True)[:2],
                          lambda x, res, w: (rms(x + res, w), x + res), (r(TOKENS, HIDDEN), r(TOKENS, HIDDEN),
                                                                         r(HIDDEN))),
        "add + layernorm": (lambda x, res, w, b: add_norm.add_norm(x, res, w, b, 1e-5, False)[:2],
                            lambda x, res, w, b: (F.layer_norm(x + res, (HIDDEN,), w, b), x + res),
                            (r(TOKENS, HIDDEN), r(TOKENS, HIDDEN), r(HIDDEN), r(HIDDEN))),
        "rotary": (lambda q: rotary.rotary(q, cos, sin), lambda q: apply_rope(q, cos, sin),
                   (r(4, HEADS, 2048, HEAD_DIM),)),
        "linear + cross-entropy": (
            lambda x, w: linear_cross_entropy.fused_linear_cross_entropy(x, w, target),
            lambda x, w: F.cross_entropy((x @ w.t()).float(), target, reduction="sum"),
            (r(TOKENS // 4, HIDDEN), r(VOCAB, HIDDEN))),
    }


def _time(fn, inputs, repeats: int = 20) -> float:
    def step():
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        sum(o.float().sum() for o in outs).backward()
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def gpu_kernels() -> list[dict]:
    rows = []
    for name, (fused, eager, inputs) in chains("cuda", torch.bfloat16).items():
        t_fused, t_eager = _time(fused, inputs), _time(eager, inputs)
        t_compiled = _time(torch.compile(eager), inputs)
        rows.append({"kernel": name, "fused_s": t_fused, "eager_s": t_eager, "compiled_s": t_compiled,
                     "vs_eager": t_eager / t_fused, "vs_compile": t_compiled / t_fused})
        print(f"{name:24s} fused {t_fused * 1e3:8.3f} ms  eager {t_eager * 1e3:8.3f} ms ({t_eager / t_fused:.2f}x)"
              f"  torch.compile {t_compiled * 1e3:8.3f} ms ({t_compiled / t_fused:.2f}x)", flush=True)
    return rows


def gpu_training_step() -> dict:
    """One ~350M GPT training step on one rank, autopar-compiled with fusion on and off (median of 5)."""
    import torch.distributed as dist

    import autopar
    from autopar.models.gpt import GPT, GPTConfig
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl", rank=0, world_size=1)
    cfg = GPTConfig(layers=24, hidden=1024, heads=16, vocab=50304, seq=1024)
    x = torch.randint(0, cfg.vocab, (8, cfg.seq), device="cuda")
    result = {}
    for fuse in (False, True):
        torch.manual_seed(0)
        model = GPT(cfg).cuda()
        compiled = autopar.compile(model, sample_inputs=(x, x), fix={"dp": 1, "tp": 1}, fuse=fuse)
        opt = compiled.optimizer(torch.optim.AdamW, lr=1e-4)
        times = []
        for i in range(8):
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start[0].record()
            compiled.train_step(x, x)
            opt.step()
            opt.zero_grad()
            start[1].record()
            torch.cuda.synchronize()
            if i >= 3:
                times.append(start[0].elapsed_time(start[1]) / 1e3)
        result["fused_s" if fuse else "unfused_s"] = statistics.median(times)
        result["peak_bytes_" + ("fused" if fuse else "unfused")] = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    dist.destroy_process_group()
    print(f"GPT ~350M training step: fused {result['fused_s'] * 1e3:.1f} ms, unfused {result['unfused_s'] * 1e3:.1f} ms "
          f"({result['unfused_s'] / result['fused_s']:.2f}x)", flush=True)
    return result


def interpreter_pass() -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-m", "tests.kernel_cases"], capture_output=True, text=True, env=env,
                         cwd=ROOT)
    if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
        return []
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    for r in rows:
        verdict = "ok" if r["err"] <= r["bound"] else "FAILS"
        print(f"{r['case']:32s} max error {r['err']:.3g} (bound {r['bound']:.3g}) {verdict}")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    print(describe())
    if torch.cuda.is_available():
        result = {"device": torch.cuda.get_device_name(), "kernels": gpu_kernels(), "gpt_350m": gpu_training_step()}
    else:
        print("no CUDA device: running the Triton kernels under TRITON_INTERPRET=1 against their reference paths; "
              "no speed was measured")
        result = {"device": "cpu (interpreter)", "correctness": interpreter_pass(), "speed": None}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
