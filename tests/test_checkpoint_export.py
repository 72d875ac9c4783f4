"""Export round trip: a transformers llama trained 3 steps under tp=2 (examples/train.py --export) is a folder
`AutoModelForCausalLM.from_pretrained` loads: its tensors are the compiled model's gathered parameters, bit for
bit, and its logits match those of the same training run eagerly in one process within 1e-5."""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_train

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.dist, pytest.mark.slow]

LLAMA = "hidden_size=64,intermediate_size=128,num_hidden_layers=2,num_attention_heads=4,num_key_value_heads=2," \
        "vocab_size=128"
ARGS = ["--model", "hf:llama", "--model-args", LLAMA, "--steps", "3", "--seed", "0", "--batch", "4", "--seq", "16"]


def test_tp2_llama_exports_a_from_pretrained_folder(tmp_path):
    rc, losses, err = run_train([*ARGS, "--fix", "tp=2", "--export", str(tmp_path / "hf")], 2, tmp_path / "tp2.pt")
    assert rc == 0, err[-3000:]
    rc, _, err = run_train([*ARGS, "--reference"], None, tmp_path / "ref.pt")
    assert rc == 0, err[-3000:]
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    compiled = torch.load(tmp_path / "tp2.pt")["params"]  # the compiled model's parameters, gathered
    state = exported.state_dict()
    assert {k.removeprefix("lm.") for k in compiled} == set(state)
    assert [k for k, v in compiled.items() if not torch.equal(state[k.removeprefix("lm.")], v)] == []

    reference = transformers.AutoModelForCausalLM.from_config(exported.config).eval()
    reference.load_state_dict({k.removeprefix("lm."): v for k, v in torch.load(tmp_path / "ref.pt")["params"].items()})
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, want = exported(input_ids=tokens).logits, reference(input_ids=tokens).logits
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
