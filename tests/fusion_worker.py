"""Fused programs on gloo ranks against the unfused single-process eager model (tests/test_fusion_parity.py).

    python -m torch.distributed.run --standalone --nproc_per_node N tests/fusion_worker.py CASES.json

Each case as tests/parity_worker.py runs it (same batches, SGD, every step's loss, the first step's gradients),
with fusion on, and also reports how many fused calls rank 0's program holds, by kind. Models: `gpt_tiny` and
`llama_tiny` below (registry presets with the `vocab`/`seq` attributes the worker reads).
"""

from __future__ import annotations

import copy
import json
import re
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import autopar  # noqa: E402
from tests.parity_worker import LR, batches, build, grad_mismatch  # noqa: E402


def _preset(name: str, **overrides) -> torch.nn.Module:
    import dataclasses

    from autopar.models.registry import _MODEL_CLASS, PRESETS
    cfg = dataclasses.replace(PRESETS[name], **overrides)
    model = _MODEL_CLASS[type(cfg)](cfg)
    model.vocab, model.seq = cfg.vocab, cfg.seq
    return model


def gpt_tiny(**overrides) -> torch.nn.Module:
    return _preset("gpt-tiny", **overrides)


def llama_tiny(**overrides) -> torch.nn.Module:
    return _preset("llama-tiny", **overrides)


def hf_llama() -> torch.nn.Module:
    """A transformers Llama (autopar/models/hf.py), tiny."""
    from autopar.models.registry import build_model, parse_model_args
    args = "hidden_size=64,intermediate_size=128,num_hidden_layers=2,num_attention_heads=4,num_key_value_heads=2," \
           "vocab_size=128,max_position_embeddings=32"
    model, info = build_model("hf:llama", parse_model_args(args))
    model.vocab, model.seq = info.vocab, 16
    return model


FUSED = re.compile(r"torch\.ops\.autopar\.(\w+)\.default\(|(fused_linear_cross_entropy)\(")


def fused_calls(code: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in FUSED.finditer(code):
        kind = m.group(1) or "linear_cross_entropy"
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def run_case(case: dict) -> dict:
    model = build(case)
    ref = copy.deepcopy(model)
    data = batches(model.vocab, case.get("batch", 4), model.seq, case.get("steps", 10), case.get("seed", 0))
    compiled = autopar.compile(model, sample_inputs=data[0], fix=case["fix"], fuse=case.get("fuse", True))
    opt = compiled.optimizer(torch.optim.SGD, lr=LR)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=LR)
    worst, bad = 0.0, {}
    for step, (x, y) in enumerate(data):
        loss = compiled.train_step(x, y).item()
        ref_loss = ref(x, y)
        ref_loss.backward()
        worst = max(worst, abs(loss - ref_loss.item()) / max(abs(ref_loss.item()), 1e-12))
        if step == 0:
            grads = {k: p.grad.clone() for k, p in ref.named_parameters() if p.grad is not None}
            bad = grad_mismatch(grads, compiled.full_state(grads=True), case.get("rtol", 1e-5))
        opt.step()
        ref_opt.step()
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
    d = compiled.plan.degrees
    codes: list = [None] * dist.get_world_size()
    dist.all_gather_object(codes, compiled.code)
    fused: dict[str, int] = {}  # over one rank of each (pp, tp) position: every stage's program, once
    for rank, code in enumerate(codes):
        if _counted(rank, d):
            for kind, n in fused_calls(code).items():
                fused[kind] = fused.get(kind, 0) + n
    return {"loss_rel": worst, "grad_bad": bad, "fused": fused,
            "plan": f"pp={d.get('pp', 1)},dp={d['dp']},tp={d['tp']},zero={compiled.plan.zero}"}


def _counted(rank: int, degrees: dict) -> bool:
    """Rank on dp coordinate 0 and tp coordinate 0 (mesh (pp, dp, tp), row-major): one program per stage."""
    return (rank // degrees["tp"]) % degrees["dp"] == 0 and rank % degrees["tp"] == 0


def main(path: str) -> int:
    dist.init_process_group("gloo")
    rank0 = dist.get_rank() == 0
    for case in json.loads(Path(path).read_text()):
        t0 = time.perf_counter()
        try:
            result = run_case(case)
        except Exception as e:  # noqa: BLE001 - reported per case; the next case still runs
            result = {"error": f"{type(e).__name__}: {e}"[:2000], "trace": traceback.format_exc()[-3000:]}
        result.update(id=case["id"], seconds=round(time.perf_counter() - t0, 2))
        if rank0:
            print(json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
