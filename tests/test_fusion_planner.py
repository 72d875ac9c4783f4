"""The planner knows fusion: chains found by op pattern (autopar's models and transformers' alike), priced so a
fused plan predicts less memory and no more time than `--fix fuse=off`, recorded in the plan, listed by
`autopar plan`; on by default only where the hardware runs the kernels as Triton; and planning needs neither triton
nor the kernels."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest

from autopar.capture import capture
from autopar.cli.main import main
from autopar.models.registry import build_model, parse_model_args, sample_inputs
from autopar.plan import Plan
from autopar.planner.fusion import find_chains
from autopar.planning import make_plan
from tests.dist_utils import ROOT

HF_LLAMA = "hidden_size=64,intermediate_size=128,num_hidden_layers=2,num_attention_heads=4,num_key_value_heads=2," \
           "vocab_size=128"


@pytest.mark.parametrize("model, args, want", [
    ("gpt-tiny", "", {"add_norm": 2, "bias_gelu": 2, "cross_entropy": 1}),
    # per block: the attention norm alone (its add is the previous block's), add + the MLP norm, SwiGLU, rotary
    # on q and k; the final norm; the head + loss
    ("llama-tiny", "", {"norm": 3, "add_norm": 2, "swiglu": 2, "rotary": 4, "cross_entropy": 1}),
    ("hf:llama", HF_LLAMA, {"norm": 3, "add_norm": 2, "swiglu": 2, "rotary": 4, "cross_entropy": 1}),
])
def test_chains_are_found_by_op_pattern(model, args, want):
    module, info = build_model(model, parse_model_args(args), device="meta")
    chains = find_chains(capture(module, sample_inputs(info, 2, 16, device="meta")).graph)
    assert Counter(c.kind for c in chains) == want
    members = [m for c in chains for m in c.members]
    assert len(members) == len(set(members))  # no node in two chains


def test_add_norm_never_spans_two_blocks():
    """The residual add ending block i feeds block i+1's first norm: fusing them would cut across the block
    boundary (the unit of FSDP, checkpointing and pipeline stages), so that norm fuses alone."""
    module, info = build_model("llama-tiny", {}, device="meta")
    captured = capture(module, sample_inputs(info, 2, 16, device="meta"))
    stack = {n.name: list((n.meta.get("nn_module_stack") or {}).values()) for n in captured.graph.nodes}
    for chain in find_chains(captured.graph):
        blocks = {next((p for p, _ in stack[m] if p.count(".") == 1 and p.startswith("layers.")), None)
                  for m in chain.members}
        assert len(blocks) == 1, chain


@pytest.fixture(scope="module")
def plans() -> dict[bool, Plan]:
    kw = dict(devices=2, hardware="h100-80gb-sxm", batch=4, seq=32, fix={"dp": 1, "tp": 2}, dtype="bfloat16")
    return {fuse: make_plan("llama-tiny", **{**kw, "fix": {**kw["fix"], "fuse": fuse}}) for fuse in (True, False)}


def test_fusion_saves_memory_and_time(plans):
    on, off = plans[True].predicted, plans[False].predicted
    assert on.memory_bytes_per_device < off.memory_bytes_per_device
    assert on.step_time_s <= off.step_time_s


def test_the_plan_records_fusion(plans, tmp_path):
    on, off = plans[True], plans[False]
    assert on.fuse and not off.fuse and not off.fusions
    kinds = {f["kind"]: f for f in on.fusions}
    assert set(kinds) == {"norm", "add_norm", "swiglu", "rotary", "cross_entropy"}
    assert kinds["rotary"]["count"] == 4 and kinds["swiglu"]["memory_saved_bytes"] > 0
    on.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json").fusions == on.fusions


def test_autopar_plan_lists_fusions_without_triton():
    """With triton unimportable (as where it is not installed), planning works and never loads the kernels."""
    code = ("import sys\nsys.modules['triton'] = None\nfrom autopar.cli.main import main\n"
            "assert main(['plan', 'llama-tiny', '--devices', '2', '--hardware', 'cpu', '--batch', '4', '--seq', '32', "
            "'--fix', 'dp=2,fuse=on']) == 0\nprint('KERNELS_IMPORTED', 'autopar.kernels.ops' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "fused kernels" in out.stdout and "rotary embedding" in out.stdout
    assert "KERNELS_IMPORTED False" in out.stdout


def test_the_residual_sum_stays_whole_where_its_chain_fuses():
    """A residual sum left partial over tp is all-reduced before its norm reads it: the collective splits the
    add + norm chain (codegen leaves it unfused), so the add is priced on its own and the search keeps the sum
    whole (reduce, then add), where the chain fuses (tests/test_fusion_parity.py runs gpt-tiny at tp=2 fused)."""
    plan = make_plan("gpt-tiny", devices=2, hardware="cpu", batch=4, seq=32, fix={"dp": 1, "tp": 2, "fuse": True})
    module, info = build_model("gpt-tiny", {}, device="meta")
    chains = find_chains(capture(module, sample_inputs(info, 4, 32, device="meta")).graph)
    adds = [c.members[0] for c in chains if c.kind == "add_norm"]
    assert adds and all("P" not in plan.strategies[a].outs[0].split("/") for a in adds), \
        {a: plan.strategies[a].outs for a in adds}


@pytest.mark.parametrize("hardware, fix, fused", [
    ("cpu", {}, False),  # the kernels would run their torch reference paths, slower than the unfused program
    ("cpu", {"fuse": True}, True),
    ("h100-80gb-sxm", {}, True),
    ("h100-80gb-sxm", {"fuse": False}, False),
])
def test_fusion_is_on_by_default_only_where_the_kernels_run_as_triton(hardware, fix, fused):
    plan = make_plan("llama-tiny", devices=2, hardware=hardware, batch=4, seq=32, fix={"dp": 2, **fix})
    assert plan.fuse == fused and bool(plan.fusions) == fused


def test_autopar_plan_says_why_fusion_is_off_on_a_cpu(capsys):
    assert main(["plan", "llama-tiny", "--devices", "2", "--hardware", "cpu", "--batch", "4", "--seq", "32",
                 "--fix", "dp=2"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines at the terminal's width
    assert "fused kernels: off (on cpu they would run their torch reference paths, not Triton; --fix fuse=on" in out
