"""Tier 3: context parallelism (cp) against one process. gpt-tiny and llama-tiny at sequence 64 (causal SDPA,
load-balanced chunks, learned positions and rotary tables at each chunk's true positions), 10 SGD steps: losses
and first-step gradients within 1e-5 relative (tests/parity_worker.py's rule) under cp=2, cp=4, cp=2 x tp=2,
cp=2 x dp=2 with ZeRO-3 and cp=2 with pp=2, and cp=2 under full and selective checkpointing (the ring runs again
in the recomputation); one case ignores a sample's leading targets (ignore_index), so the cp ranks count different
numbers of tokens in the loss's mean. A transformers Llama (tests/tiny_models.py `hf_llama`: SDPA with grouped K/V
heads, rotary positions from its position ids) at cp=2 and cp=2 x tp=2, the same, and transformers' gpt2 (learned
positions) and falcon (which views attention's output transposed, so the ring returns SDPA's memory layout) at cp=2
for 3 steps. `autopar.compile(...,
verify=True)` under cp=2 and cp=2 x dp=2 passes, and refuses a cp program whose ranks use their local offsets for
positions, naming a parameter. Two launches (world 4, world 2), every case of a world in one."""

from __future__ import annotations

import pytest

from tests.parity_worker import assert_matches_one_process, launch

pytestmark = [pytest.mark.dist, pytest.mark.slow]
MODELS = ("gpt-tiny", "llama-tiny")
WORLD4 = {"cp4": {"cp": 4, "dp": 1, "tp": 1}, "cp2xtp2": {"cp": 2, "dp": 1, "tp": 2},
          "cp2xdp2-zero3": {"cp": 2, "dp": 2, "tp": 1, "zero": 3}, "cp2-pp2": {"cp": 2, "pp": 2, "dp": 1, "tp": 1}}
WORLD2 = {"cp2": {"cp": 2, "dp": 1, "tp": 1}, "cp2-full-ac": {"cp": 2, "dp": 1, "tp": 1, "ac": "full"},
          "cp2-selective-ac-ignored": {"cp": 2, "dp": 1, "tp": 1, "ac": "selective"}}


HF_LLAMA = "tests.tiny_models:hf_llama"


def _case(id: str, fix: dict, factory: str = HF_LLAMA, steps: int = 10, **extra) -> dict:
    return {"id": id, "factory": factory, "fix": fix, "steps": steps, "batch": 4, **extra}


HF4 = [_case("hf_llama-cp2xtp2", {"cp": 2, "dp": 1, "tp": 2})]
HF2 = [_case("hf_llama-cp2", {"cp": 2, "dp": 1, "tp": 1})] + [  # learned positions; SDPA's output layout, viewed
    _case(f"hf-{t}-cp2", {"cp": 2, "dp": 1, "tp": 1}, "tests.tiny_models:hf_tiny", 3, kwargs={"model_type": t})
    for t in ("gpt2", "falcon")]
VERIFY4 = [_case("verify-llama-tiny-cp2xdp2", {"cp": 2, "dp": 2, "tp": 1}, "tests.tiny_models:tiny", 1,
                 kwargs={"name": "llama-tiny"}, verify=True)]
VERIFY2 = [_case("verify-hf_llama-cp2", {"cp": 2, "dp": 1, "tp": 1}, steps=1, verify=True),
           # last of its launch: it breaks cp's positions for the rest of the process
           _case("verify-catches-local-positions", {"cp": 2, "dp": 1, "tp": 1},
                 "tests.tiny_models:hf_llama_local_positions", 1, verify=True)]


def _cases(configs: dict) -> list[dict]:
    return [{"id": f"{m}-{name}", "factory": "tests.tiny_models:tiny", "kwargs": {"name": m}, "fix": fix, "steps": 10,
             "batch": 4, "ignored": 40 if name.endswith("ignored") else 0} for m in MODELS
            for name, fix in configs.items()]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cp")
    return {**launch(_cases(WORLD4) + HF4 + VERIFY4, 4, tmp), **launch(_cases(WORLD2) + HF2 + VERIFY2, 2, tmp)}


@pytest.mark.parametrize("case", [c["id"] for c in _cases(WORLD4) + _cases(WORLD2) + HF4 + HF2 + VERIFY4 + VERIFY2[:1]])
def test_cp_matches_one_process(results, case):
    r = results[case]
    assert_matches_one_process(r, case)
    assert ",cp=" in r["plan"], r["plan"]  # the plan ran context-parallel
    # the ring attention stays inside its layer: one segment per layer of the 2-layer models, so each layer is one
    # FSDP group and one checkpointed unit (a layer cut around the ring kept q, k, v, out, lse unrecomputed)
    assert len(r["blocks"]) == 2, r["blocks"]


def test_verify_refuses_a_cp_program_that_uses_local_positions(results):
    """The wrong program's first step differs from one process (its rotary angles sit at the wrong positions):
    compile raises VerifyError naming the first differing parameter and the cp plan."""
    error = results["verify-catches-local-positions"].get("error", "")
    assert error.startswith("VerifyError"), error
    assert "the first parameter whose gradient differs is 'lm." in error and "cp=2" in error, error


def test_a_cp_plan_file_from_the_cli_trains_like_one_process(tmp_path):
    """`autopar plan ... --fix cp=2 --json` then examples/train.py --plan on 2 ranks: the plan file carries cp."""
    from autopar.cli.main import main
    from tests.dist_utils import max_rel_diff, run_train

    model = ["--model", "gpt-tiny", "--model-args", "seq=64", "--seq", "64", "--batch", "4", "--steps", "3"]
    path = tmp_path / "cp.json"
    assert main(["plan", "gpt-tiny", "--model-args", "seq=64", "--seq", "64", "--devices", "2", "--hardware", "cpu",
                 "--batch", "4", "--fix", "cp=2", "--json", str(path)]) == 0
    rc, ref, err = run_train([*model, "--reference"], None)
    assert rc == 0, err[-2000:]
    rc, got, err = run_train([*model, "--plan", str(path)], 2)
    assert rc == 0, err[-2000:]
    assert max_rel_diff(ref, got) <= 1e-5, (ref, got)
