"""Where transformers models come from and how their configs are checked: `hf:PATH` (a save_pretrained folder, with
or without weights), `hf:ORG/NAME` from the local HF cache only, values validated as transformers validates them,
and the eager attention fallback for architectures transformers does not run through SDPA. Refusals are in the
bad-input corpus (tests/test_bad_input_corpus.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from autopar.cli.main import main
from autopar.models import build_model
from tests.dist_utils import ROOT, TRAIN

pytest.importorskip("transformers")

LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=64, max_position_embeddings=64)
PLAN = ["--devices", "2", "--hardware", "cpu", "--batch", "4", "--seq", "8", "--json", "-"]


def _plan(capsys, model: str, *extra: str) -> tuple[dict, str]:
    code = main(["plan", model, *extra, *PLAN])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out), err


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny llama saved twice: with its weights (from seed 7), and its config.json alone."""
    tmp = tmp_path_factory.mktemp("hf")
    torch.manual_seed(7)
    model, _ = build_model("hf:llama", LLAMA)
    model.lm.save_pretrained(tmp / "weights")
    model.lm.config.save_pretrained(tmp / "config-only")
    return tmp


def test_a_folder_with_weights_plans_and_trains_from_them(folders, capsys):
    saved = build_model("hf:llama", LLAMA)[0].state_dict()  # seed-dependent: not the folder's weights
    loaded, info = build_model(f"hf:{folders / 'weights'}")
    torch.manual_seed(7)
    original = build_model("hf:llama", LLAMA)[0].state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, original[name]), name
    assert any(not torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())
    assert info.notes == (f"hf:{folders / 'weights'}: starts from the weights in {folders / 'weights'}",)
    plan, err = _plan(capsys, f"hf:{folders / 'weights'}")
    assert plan["degrees"]["dp"] * plan["degrees"]["tp"] == 2 and "starts from the weights in" in err


def test_a_folder_without_weights_plans_from_its_config(folders, capsys):
    _, info = build_model(f"hf:{folders / 'config-only'}", {"num_hidden_layers": 1}, device="meta")
    assert (info.layers, info.hidden, info.notes) == (1, 32, ())  # --model-args still override the folder
    plan, _ = _plan(capsys, f"hf:{folders / 'config-only'}")
    assert plan["notes"] == []


def test_a_cached_repository_is_read_from_the_local_cache_only(folders, tmp_path):
    """hf:ORG/NAME resolves in $HF_HUB_CACHE's layout (models--ORG--NAME/snapshots/<rev>, refs/main) offline."""
    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots").mkdir()
    os.symlink(folders / "weights", repo / "snapshots" / ("0" * 40))
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "autopar.cli.main", "plan"]
    ok = subprocess.run([*cmd, "hf:acme/tiny-llama", *PLAN], capture_output=True, text=True, env=env, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["notes"] == [f"hf:acme/tiny-llama: starts from the weights in {repo / 'snapshots' / ('0' * 40)}"]
    missing = subprocess.run([*cmd, "hf:acme/other", *PLAN], capture_output=True, text=True, env=env, cwd=ROOT)
    assert missing.returncode == 2
    assert "acme/other is not in the local HF cache" in missing.stderr and "does not download" in missing.stderr


def test_token_ids_may_be_zero_and_transformers_validates_the_values():
    _, info = build_model("hf:phi3", {**LLAMA, "pad_token_id": 0}, device="meta")
    assert info.config.pad_token_id == 0


def test_attention_without_sdpa_falls_back_to_eager_and_the_plan_says_so(capsys):
    plan, err = _plan(capsys, "hf:bloom", "--model-args", "hidden_size=32,n_layer=2,n_head=4,vocab_size=64")
    assert "using its eager attention" in plan["notes"][0] and "using its eager attention" in err
    ops = {d["op"] for d in plan["strategies"].values()}
    assert "aten.scaled_dot_product_attention.default" not in ops and "aten.softmax.int" in ops


def test_train_py_defaults_to_a_demo_sized_sequence():
    spec = importlib.util.spec_from_file_location("autopar_example_train", TRAIN)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    _, qwen2 = build_model("hf:qwen2", {k: v for k, v in LLAMA.items() if k != "max_position_embeddings"},
                           device="meta")
    assert qwen2.seq == 32768 and train.sequence_length(None, qwen2) == 128  # not the config's 32768
    assert train.sequence_length(None, build_model("gpt-tiny", device="meta")[1]) == 32  # capped by the model
    assert train.sequence_length(64, qwen2) == 64


@pytest.mark.parametrize("model_type", ["dbrx", "recurrent_gemma"])
def test_a_model_type_that_cannot_work_says_why_in_one_line(model_type, capsys):
    """With transformers 5.2x, dbrx's class misreads its own config and recurrent_gemma's recurrent block does not
    trace at these shapes: either it plans, or it is refused in one line (never a traceback)."""
    code = main(["plan", f"hf:{model_type}", "--model-args", "hidden_size=32,num_hidden_layers=2,vocab_size=64",
                 *PLAN])
    out, err = capsys.readouterr()
    if code != 0:
        assert code == 2 and err.startswith("autopar: error: ") and err.count("\n") == 1, err
        assert f"hf:{model_type}" in err or "cannot trace" in err
