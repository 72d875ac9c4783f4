"""The bad-input corpus: every case is one actionable line `autopar: error: ...` naming what, where and what to do,
no Python traceback, and a non-zero exit status, from `autopar plan` and from examples/train.py.

One table, one test. `plan` cases run the CLI in-process; `train` cases run examples/train.py's main in-process
(no process group: they fail before any is needed); `ckpt` cases run it as the one rank of a gloo job in-process
(a checkpoint is read by ranks) and `cli` cases any `autopar` verb; the one `dist` case runs real gloo ranks under
torchrun. A checkpoint that fails to load is left as it was: the error comes before any save.
Hardware-file schema cases live in test_hardware_schema.py; this corpus keeps only the missing file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable

import pytest

from autopar.cli.main import main
from tests.dist_utils import TRAIN, run_train

GPT = ["gpt-tiny", "--hardware", "cpu", "--batch", "8"]
LONG = ["llama3-70b", "--model-args", "seq=524288", "--seq", "524288", "--hardware", "h100-80gb-sxm", "--devices", "64"]
NO_FACTORY = "def other():\n    return torch.nn.Linear(2, 2)\n"
RAISES = "def build():\n    raise RuntimeError('boom')\n"
HF_ARGS = ["--hardware", "cpu", "--devices", "2", "--batch", "4", "--seq", "8"]
PHI3 = "hidden_size=32,intermediate_size=64,num_hidden_layers=1,num_attention_heads=4,vocab_size=64"


def _model_file(tmp: Path, body: str) -> str:
    path = tmp / "user_model.py"
    path.write_text("import torch\n\n" + body)
    return str(path)


def _plan_file(tmp: Path, content: str | None = None, edit: Callable[[dict], None] | None = None) -> str:
    """A plan JSON: `content` verbatim, or a real gpt-tiny plan changed by `edit`."""
    path = tmp / "plan.json"
    if content is not None:
        path.write_text(content)
        return str(path)
    assert main(["plan", *GPT, "--devices", "2", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return str(path)


# (id, runner, argv built in a temporary directory, fragment the error line must contain)
CASES: list[tuple[str, str, Callable[[Path], list[str]], str]] = [
    ("devices-zero", "plan", lambda t: [*GPT, "--devices", "0"], "--devices: '0' is not a positive integer"),
    ("devices-word", "plan", lambda t: [*GPT, "--devices", "x"], "--devices: 'x' is not a positive integer"),
    ("batch-negative", "plan", lambda t: ["gpt-tiny", "--hardware", "cpu", "--devices", "2", "--batch", "-1"],
     "--batch: '-1' is not a positive integer"),
    ("no-hardware", "plan", lambda t: ["gpt-tiny", "--devices", "2", "--batch", "8"],
     "required: --hardware; see `autopar plan --help`"),
    ("fix-bad-value", "plan", lambda t: [*GPT, "--devices", "4", "--fix", "tp=3x"],
     "--fix tp=3x: tp (tensor-parallel degree) must be a positive integer"),
    ("fix-unknown-key", "plan", lambda t: [*GPT, "--devices", "4", "--fix", "foo=2"], "--fix has no key 'foo'"),
    ("mesh-zero", "plan", lambda t: [*GPT, "--mesh", "dp=0"], "--mesh dp=0: dp (data-parallel degree) must be"),
    ("memory-word", "plan", lambda t: [*GPT, "--devices", "2", "--memory", "lots"], "--memory 'lots' is not a size"),
    ("memory-zero", "plan", lambda t: [*GPT, "--devices", "2", "--memory", "0"], "is not a positive size"),
    ("no-factory", "plan",
     lambda t: [_model_file(t, NO_FACTORY) + ":build", "--hardware", "cpu",
                "--devices", "2", "--batch", "4"], "has no function 'build'; define it"),
    ("factory-raises", "plan",
     lambda t: [_model_file(t, RAISES) + ":build", "--hardware", "cpu",
                "--devices", "2", "--batch", "4"], "raised RuntimeError: boom; fix the factory"),
    ("file-missing", "plan", lambda t: [f"{t}/nope.py:build", "--hardware", "cpu", "--devices", "2", "--batch", "4"],
     "nope.py (from"),
    ("unknown-preset", "plan", lambda t: ["gpt-huge", "--hardware", "cpu", "--devices", "2", "--batch", "4"],
     "unknown model 'gpt-huge'; use one of"),
    ("hf-unknown-type", "plan", lambda t: ["hf:nosuchmodel", "--hardware", "cpu", "--devices", "2", "--batch", "4"],
     "unknown HF model_type 'nosuchmodel'"),
    ("hf-not-causal", "plan", lambda t: ["hf:vit", "--hardware", "cpu", "--devices", "2", "--batch", "4"],
     "has no causal-LM head"),
    ("hf-unknown-key", "plan", lambda t: ["hf:gpt2", "--model-args", "n_layers=2", "--hardware", "cpu", "--devices",
                                          "2", "--batch", "4"], "has no config key n_layers; valid --model-args"),
    ("hf-bad-value", "plan", lambda t: ["hf:gpt2", "--model-args", "n_embd=64,n_head=3", "--hardware", "cpu",
                                        "--devices", "2", "--batch", "4"], "divisible"),
    ("hf-wrong-type", "plan", lambda t: ["hf:gpt2", "--model-args", "n_layer=1.5", "--hardware", "cpu", "--devices",
                                         "2", "--batch", "4"], "n_layer=1.5 has the wrong type; give a non-negative integer"),
    ("hf-invalid-value", "plan", lambda t: ["hf:llama", "--model-args", "hidden_size=30,num_attention_heads=4",
                                            *HF_ARGS], "The hidden size (30) is not a multiple of the number of "
                                                       "attention heads (4); change those values"),
    ("hf-pad-outside-vocab", "plan", lambda t: ["hf:phi3", "--model-args", PHI3, *HF_ARGS],
     "pad_token_id=32000 is outside the vocabulary (vocab_size=64); add pad_token_id=0"),
    ("hf-folder-missing", "plan", lambda t: [f"hf:{t}/nope", *HF_ARGS], "nope (from 'hf:"),
    ("hf-folder-no-config", "plan", lambda t: [f"hf:{t}", *HF_ARGS], "has no config.json; give a folder written by"),
    ("hf-not-in-cache", "plan", lambda t: ["hf:no-such-org-17/no-model", *HF_ARGS],
     "no-such-org-17/no-model is not in the local HF cache"),
    ("mbs-per-replica", "plan", lambda t: [*GPT, "--mesh", "dp=2", "--fix", "mbs=3"],
     "mbs=3 (per data-parallel replica) with dp=2 needs a batch divisible by mbs x dp = 6, not 8"),
    ("train-hf-pad-outside-vocab", "train", lambda t: ["--model", "hf:phi3", "--model-args", PHI3, "--reference"],
     "pad_token_id=32000 is outside the vocabulary"),
    ("model-args-malformed", "plan", lambda t: [*GPT, "--devices", "2", "--model-args", "layers=two"],
     "--model-args item 'layers=two' is malformed"),
    ("model-args-unknown", "plan", lambda t: [*GPT, "--devices", "2", "--model-args", "depth=2"],
     "has no field depth; valid --model-args keys"),
    ("batch-not-divisible", "plan", lambda t: ["gpt-tiny", "--hardware", "cpu", "--mesh", "dp=4", "--batch", "6"],
     "batch 6 is not divisible by dp=4; use --batch 4"),
    # issue 20: one long sample on 64 devices; dp=1 divides the batch, but only pipelines fill the rest
    ("long-seq-batch-1", "plan", lambda t: [*LONG, "--batch", "1", "--fix", "cp=1"],  # unpinned, cp plans it
     "batch 1 cannot fill 64 devices: tp stops at one h100-80gb-sxm node (8 devices)"),
    # issue 20: eight long samples; the size stated is finite and the advice is the sequence, not the batch
    ("long-seq-memory", "plan", lambda t: [*LONG, "--batch", "8", "--mesh", "dp=8,tp=8"],
     "at seq 524288 one sample's activations alone need at least"),
    ("seq-over-model", "plan", lambda t: [*GPT, "--devices", "2", "--seq", "64"],
     "seq=64 exceeds model gpt-tiny's max positions 32"),
    ("hardware-file-missing", "plan", lambda t: [*GPT[:1], "--hardware", f"{t}/cluster.toml", "--batch", "8",
                                                 "--devices", "2"], "cluster.toml"),
    ("json-dir-missing", "plan", lambda t: [*GPT, "--devices", "2", "--json", f"{t}/no/plan.json"],
     "does not exist; create it first"),
    ("pin-bad-intent", "plan", lambda t: [*GPT, "--devices", "2", "--pin", "blocks.*=sideways"],
     "unknown intent 'sideways'"),
    ("pin-matches-nothing", "plan", lambda t: [*GPT, "--devices", "2", "--pin", "decoder.*=row"],
     "--pin decoder.*=row matches no module"),
    ("pin-needs-tp", "plan", lambda t: [*GPT, "--mesh", "dp=2", "--pin", "blocks.*.mlp.*=row"],
     "tp pins need tp > 1"),
    ("train-batch-negative", "train", lambda t: ["--batch", "-1"], "--batch: '-1' is not a positive integer"),
    ("train-fix-bad-value", "train", lambda t: ["--fix", "tp=3x", "--steps", "1"], "tp (tensor-parallel degree)"),
    ("train-unknown-preset", "train", lambda t: ["--model", "gpt-huge", "--reference"], "unknown model 'gpt-huge'"),
    ("plan-not-json", "train", lambda t: ["--plan", _plan_file(t, "{not json")],
     "plan.json is malformed (JSONDecodeError"),
    ("plan-json-list", "train", lambda t: ["--plan", _plan_file(t, "[1, 2]")], "a JSON list, not an object"),
    ("plan-schema-version", "train", lambda t: ["--plan", _plan_file(t, edit=lambda d: d.update(schema_version=99))],
     "plan schema_version 99 is not 3; re-create the plan"),
    ("plan-missing-field", "train", lambda t: ["--plan", _plan_file(t, edit=lambda d: d.pop("graph_fingerprint"))],
     "graph_fingerprint"),
    ("plan-file-missing", "train", lambda t: ["--plan", f"{t}/none.json"], "does not exist; create one with"),
    ("plan-is-a-directory", "train", lambda t: ["--plan", str(t)], "cannot be read"),
    ("checkpoint-other-model", "ckpt", lambda t: [*CKPT_RUN, _checkpoint(t, "llama-tiny")],
     "is of another model: missing blocks.0.attn.k.bias"),
    ("checkpoint-truncated", "ckpt", lambda t: [*CKPT_RUN, _checkpoint(t, edit=_truncate)],
     "bytes, 1"),
    ("checkpoint-corrupted", "ckpt", lambda t: [*CKPT_RUN, _checkpoint(t, edit=_flip_byte)],
     "does not match its CRC-32 (corrupted); load an earlier checkpoint"),
    ("checkpoint-newer-format", "ckpt", lambda t: [*CKPT_RUN, _checkpoint(t, edit=_newer)],
     "has format 99, newer than the format 1 this autopar reads; upgrade autopar"),
    ("checkpoint-folder-missing", "cli", lambda t: ["checkpoint", f"{t}/none"], "none does not exist; give a folder"),
    ("checkpoint-folder-empty", "cli", lambda t: ["checkpoint", str(t)], "holds no complete checkpoint"),
]


CKPT_RUN = ["--model", "gpt-tiny", "--steps", "2", "--batch", "2", "--seq", "8", "--checkpoint-dir"]
_SAVED: dict[str, Path] = {}


def _checkpoint(tmp: Path, model: str = "gpt-tiny", edit: Callable[[Path], None] | None = None) -> str:
    """A folder holding a 1-rank checkpoint of `model` after one step (made once per model), with `edit` applied
    to its step folder; the argument of --checkpoint-dir."""
    if model not in _SAVED:
        _SAVED[model] = Path(tempfile.mkdtemp(prefix=f"autopar-ckpt-{model}-"))
        code = _one_rank(["--model", model, "--steps", "1", "--batch", "2", "--seq", "8", "--checkpoint-dir",
                          str(_SAVED[model]), "--checkpoint-every", "1"])
        assert code == 0
    target = tmp / f"ckpt-{model}"
    shutil.copytree(_SAVED[model], target)
    if edit is not None:
        edit(target / "step_00000001")
    return str(target)


def _truncate(step: Path) -> None:
    shard = step / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])


def _flip_byte(step: Path) -> None:
    shard = bytearray((step / "__0_0.distcp").read_bytes())
    shard[len(shard) // 2] ^= 0xFF
    (step / "__0_0.distcp").write_bytes(bytes(shard))


def _newer(step: Path) -> None:
    manifest = json.loads((step / "autopar.json").read_text())
    (step / "autopar.json").write_text(json.dumps({**manifest, "format": 99}))


def _one_rank(argv: list[str]) -> int:
    """examples/train.py's main in this process as rank 0 of a 1-rank gloo job (as torchrun would set it up)."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return _train_main()(argv)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_main():
    spec = importlib.util.spec_from_file_location("autopar_example_train", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _run(runner: str, argv: list[str], capsys) -> tuple[int, str]:
    try:
        if runner in ("plan", "cli"):
            code = main(["plan", *argv] if runner == "plan" else argv)
        else:
            code = _one_rank(argv) if runner == "ckpt" else _train_main()(argv)
    except SystemExit as done:  # train.py's argparse exits; the plan CLI returns its status
        code = done.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case, runner, argv, says", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_actionable_line(case, runner, argv, says, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code, err = _run(runner, argv(tmp_path), capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("autopar: error: ")]
    assert code not in (0, None), err
    assert len(lines) == 1, err
    assert says in lines[0], lines[0]
    assert "Traceback" not in err
    assert not re.search(r"\b(inf|nan)\b", lines[0], re.IGNORECASE), lines[0]  # sizes are finite numbers


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 20


@pytest.mark.dist
def test_world_size_not_matching_the_pinned_mesh_under_torchrun():
    rc, _, err = run_train(["--model", "gpt-tiny", "--steps", "1", "--fix", "dp=2,tp=2"], 2)
    lines = [ln for ln in err.splitlines() if "autopar: error: " in ln]
    assert rc != 0
    assert len(lines) == 1 and "no mesh pp x dp x tp = 2 devices matches dp=2,tp=2" in lines[0], err[-2000:]
    assert "[rank0]: Traceback" not in err and "[rank1]: Traceback" not in err  # torchrun's launcher prints its own


def test_a_checkpoint_that_does_not_load_is_left_as_it_was(tmp_path, capsys):
    folder = Path(_checkpoint(tmp_path, "llama-tiny"))
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert _one_rank([*CKPT_RUN, str(folder)]) == 2
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert "is of another model" in capsys.readouterr().err
