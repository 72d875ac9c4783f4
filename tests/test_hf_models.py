"""Breadth: decoder-only causal LMs of transformers, each built tiny from its config, train under dp=2 and tp=2 with
the losses of one eager process (5 steps, within 1e-5 relative), mixture-of-experts ones included.

One torchrun launch of 2 gloo ranks runs every model type and both plans in the same process group, with the
single-process reference computed in the same launch (on rank 0); the tests read its per-model report. One launch,
not one per (model, plan): process start-up, imports and rendezvous would cost more than the training.

    torchrun --nproc_per_node 2 tests/test_hf_models.py REPORT.json [FOLDER]   # the launch the fixture runs
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BATCH, SEQ, STEPS, LR = 4, 8, 5, 1e-3
# Tiny shapes, given to each type under the names its config knows (attribute_map aliases gpt2's n_embd etc.).
SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=64, max_position_embeddings=64, head_dim=8, n_inner=64, ffn_dim=64)
MOE = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
           shared_expert_intermediate_size=32)
PAD0 = dict(pad_token_id=0)  # their default pad id (e.g. phi3's 32000) lies outside a 64-token vocabulary
MODEL_TYPES = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {}, "gemma2": {}, "phi": {}, "phi3": PAD0, "gpt2": {},
    "gpt_neox": {}, "opt": {}, "bloom": {}, "falcon": {}, "starcoder2": {}, "olmo2": {},
    "mixtral": MOE, "qwen2_moe": MOE, "olmoe": MOE,
}
FOLDER = "hf:PATH"  # a save_pretrained folder with weights: training starts from them
PLANS = {"dp=2": {"dp": 2, "tp": 1}, "tp=2": {"dp": 1, "tp": 2}}


def model_args(model_type: str) -> dict:
    """SHAPE and the type's extras, restricted to the keys its config has."""
    import transformers

    default = transformers.AutoConfig.for_model(model_type)
    keys = set(default.to_dict()) | set(getattr(default, "attribute_map", {}))
    return {k: v for k, v in {**SHAPE, **MODEL_TYPES[model_type]}.items() if k in keys}


# ---------------------------------------------------------------- the launch (run by torchrun, not by pytest)


def _losses(spec: str, args: dict, fix: dict | None) -> list[float]:
    """STEPS steps of AdamW from seed 0, as examples/train.py trains: eagerly (fix None) or compiled with `fix`."""
    import torch

    import autopar
    from autopar.models import build_model

    torch.manual_seed(0)
    model, info = build_model(spec, args)
    gen = torch.Generator().manual_seed(1)
    data = [tuple(torch.randint(0, info.vocab, (BATCH, SEQ), generator=gen) for _ in range(2)) for _ in range(STEPS)]
    if fix is not None:
        model = autopar.compile(model, sample_inputs=data[0], fix=fix, hardware="cpu")
    opt = model.optimizer(torch.optim.AdamW, lr=LR) if fix is not None else \
        torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for tokens, targets in data:
        if fix is None:
            loss = model(tokens, targets)
            loss.backward()
        else:
            loss = model.train_step(tokens, targets)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _launch(out: str, folder: str | None) -> None:
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    rank0 = dist.get_rank() == 0
    specs = {f"hf:{t}": model_args(t) for t in MODEL_TYPES} | ({FOLDER: (f"hf:{folder}", {})} if folder else {})
    report = {}
    for name, args in specs.items():
        spec, args = args if name == FOLDER else (name, args)
        try:
            reference = _losses(spec, args, None) if rank0 else []
            report[name] = {"reference": reference}
            for plan, fix in PLANS.items():
                losses = _losses(spec, args, fix)
                report[name][plan] = max(abs(a - b) / abs(a) for a, b in zip(reference, losses)) if rank0 else 0
        except Exception as err:  # noqa: BLE001 - reported per model; autopar's errors come on every rank
            report[name] = {"error": f"{type(err).__name__}: {err}"}
        if rank0:
            print(json.dumps({name: report[name]}), file=sys.stderr, flush=True)
    if rank0:
        Path(out).write_text(json.dumps(report))
    dist.destroy_process_group()


# ---------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("transformers")
    import torch

    from autopar.models import build_model

    tmp = tmp_path_factory.mktemp("hf_models")
    torch.manual_seed(123)  # other weights than the launch's seed 0 draws: the folder's must be the ones trained
    build_model("hf:llama", model_args("llama"))[0].lm.save_pretrained(tmp / "tiny-llama")
    out = tmp / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(out),
           str(tmp / "tiny-llama")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1500)
    assert proc.returncode == 0 and out.exists(), proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("model", [f"hf:{t}" for t in MODEL_TYPES] + [FOLDER])
def test_decoder_trains_under_dp2_and_tp2_like_one_process(report, model):
    got = report[model]
    assert "error" not in got, got.get("error")
    assert len(got["reference"]) == STEPS
    for plan in PLANS:
        assert got[plan] <= 1e-5, (plan, got)


@pytest.mark.dist
@pytest.mark.slow
def test_the_folder_s_weights_are_the_ones_trained(report):
    """The folder was saved from seed 123; a model initialized from seed 0 starts at another loss."""
    assert report[FOLDER]["reference"][0] != report["hf:llama"]["reference"][0]


if __name__ == "__main__":
    _launch(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
