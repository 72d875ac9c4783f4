"""Plan files: `autopar plan --json` -> `autopar.compile(plan=...)` / `train.py --plan` round-trips to the same program,
mismatched plans are refused with a clear line, and per-module pins fix what they name while the rest is searched.

Code generation runs under torch's fake process group (tier 1: programs, never numbers); one torchrun test trains
a pinned plan file on real gloo ranks against the eager reference.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from autopar.cli.main import main
from autopar.errors import AutoparError
from autopar.fixspec import parse_pins
from autopar.planning import make_plan
from tests.dist_utils import ROOT, max_rel_diff, run_train

PLAN = ["plan", "gpt-tiny", "--hardware", "cpu", "--batch", "8", "--seq", "32"]

# World 4, rank 0. Prints one JSON object: generated code per way of getting the plan, and each refusal's message.
SCRIPT = r"""
import json, sys, torch, torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
import autopar
from autopar.errors import AutoparError
from autopar.models import build_model, sample_inputs
from autopar.plan import Plan
cli_plan, small_plan, old_plan, saved, v1_plan = sys.argv[1:6]
dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)

def built(name="gpt-tiny"):
    torch.manual_seed(0)
    model, info = build_model(name)
    return model, sample_inputs(info, 8, 32)

def compiled(name="gpt-tiny", **kw):
    model, x = built(name)
    return autopar.compile(model, sample_inputs=x, hardware="cpu", **kw)

def refusal(**kw):
    try:
        compiled(**kw)
    except AutoparError as e:
        return str(e)
    return None

searched = compiled(fix={"dp": 2, "tp": 2})
searched.plan.save(saved)
out = {"searched": searched.code, "reloaded": compiled(plan=saved).code,
       "cli_file": compiled(plan=cli_plan).code, "cli_object": compiled(plan=Plan.load(cli_plan)).code,
       "other_model": refusal(name="llama-tiny", plan=cli_plan), "other_world": refusal(plan=small_plan),
       "old_schema": refusal(plan=old_plan), "contradicting_fix": refusal(plan=cli_plan, fix={"tp": 4}),
       "migrated": compiled(plan=v1_plan).code}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plans")
    cli, small, old = tmp / "cli.json", tmp / "small.json", tmp / "old.json"
    assert main([*PLAN, "--mesh", "dp=2,tp=2", "--json", str(cli)]) == 0
    assert main([*PLAN, "--mesh", "dp=2", "--json", str(small)]) == 0
    old.write_text(json.dumps({**json.loads(cli.read_text()), "schema_version": 0}))
    v1 = tmp / "v1.json"  # schema 1 counted micro_batch_size globally: mbs per replica x dp
    saved = json.loads(cli.read_text())
    v1.write_text(json.dumps({**saved, "schema_version": 1, "micro_batch_size": saved["micro_batch_size"] * 2}))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(cli), str(small), str(old), str(tmp / "saved.json"),
                           str(v1)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_saved_plan_generates_the_same_program_as_the_search(programs):
    assert "comm.tp" in programs["searched"] and "comm.dp" in programs["searched"]  # a real dp x tp program
    assert programs["reloaded"] == programs["searched"]


def test_a_cli_plan_file_generates_the_same_program_as_compile_s_own_search(programs):
    assert programs["cli_file"] == programs["cli_object"]
    assert programs["cli_file"] == programs["searched"]  # meta-device planning = real-tensor planning


def test_a_schema_1_plan_is_migrated_to_micro_batches_per_replica(programs):
    assert programs["migrated"] == programs["cli_file"]


def test_a_schema_1_plan_that_cannot_be_migrated_says_why(tmp_path):
    from autopar.errors import PlanError
    from autopar.plan import Plan

    path = tmp_path / "v1.json"
    path.write_text(json.dumps({"schema_version": 1, "degrees": {"dp": 2}, "micro_batch_size": 3}))
    with pytest.raises(PlanError, match=r"micro_batch_size 3 .* that dp=2 does not divide, so it cannot be "
                                        r"migrated to schema 3 \(samples per data-parallel replica\)"):
        Plan.load(path)


def test_mismatched_plans_are_refused_with_what_they_were_made_for(programs):
    assert "made for another model or input shape (gpt-tiny, batch 8 x seq 32" in programs["other_model"]
    assert "the plan's mesh dp=2 x tp=1 has 2 devices but the world size is 4" in programs["other_world"]
    assert "schema_version 0 is not 3" in programs["old_schema"]
    assert "the plan's mesh dp=2 x tp=2 contradicts tp=4" in programs["contradicting_fix"]
    assert all("\n" not in programs[k] for k in ("other_model", "other_world", "old_schema", "contradicting_fix"))


# ---------------------------------------------------------------- per-module pins


def _tp(decision) -> list[str]:
    """Placements along tp (the second axis) of a node's outputs and inputs."""
    return [p.split("/")[1] for p in decision.outs + decision.ins]


def _linears(plan, module_glob: str) -> dict[str, object]:
    from fnmatch import fnmatchcase

    return {d.module: d for d in plan.strategies.values() if d.op == "aten.linear.default"
            and fnmatchcase(d.module, module_glob)}


@pytest.fixture(scope="module")
def pinned_and_free():
    common = dict(devices=2, hardware="cpu", batch=8, seq=32)
    free = make_plan("gpt-tiny", fix={"tp": 2}, **common)
    pinned = make_plan("gpt-tiny", fix={"tp": 2, "pins": {"blocks.*.mlp.*": "row"}}, **common)
    return pinned, free


def test_pinned_modules_get_the_pinned_strategy(pinned_and_free):
    pinned, free = pinned_and_free
    assert _tp(_linears(free, "blocks.*.mlp.fc")["blocks.0.mlp.fc"])[0] == "S2"  # searched: column-parallel fc
    mlp = _linears(pinned, "blocks.*.mlp.*")
    assert set(mlp) == {"blocks.0.mlp.fc", "blocks.0.mlp.proj", "blocks.1.mlp.fc", "blocks.1.mlp.proj"}
    for module, decision in mlp.items():
        out, _, weight = _tp(decision)[:3]
        assert out == "P" and weight == "S1", (module, decision)  # row-parallel: split input features, partial sum
    assert pinned.solver["pins"] == {"blocks.*.mlp.*": "row"}


def test_modules_outside_the_pin_are_still_searched(pinned_and_free):
    pinned, free = pinned_and_free
    attention = _linears(pinned, "blocks.*.attn.*")
    assert attention and attention == _linears(free, "blocks.*.attn.*")
    assert pinned.predicted.step_time_s >= free.predicted.step_time_s  # a pin can only constrain the optimum


def test_pin_syntax():
    assert parse_pins(["blocks.*.mlp.*=row", "head=Column"]) == {"blocks.*.mlp.*": "row", "head": "column"}
    assert parse_pins("a.*=tp,b.*=row") == {"a.*": "tp", "b.*": "row"}
    for bad, says in (["blocks.*", "malformed"], ["x=diagonal", "unknown intent"], ["x=row,x=column", "twice"]):
        with pytest.raises(AutoparError, match=says):
            parse_pins(bad)


@pytest.mark.dist
@pytest.mark.slow
def test_a_pinned_plan_file_trains_like_the_reference(tmp_path):
    plan = tmp_path / "pinned.json"
    assert main([*PLAN, "--mesh", "tp=2", "--pin", "blocks.*.mlp.*=row", "--json", str(plan)]) == 0
    args = ["--model", "gpt-tiny", "--steps", "10", "--seed", "0", "--batch", "8", "--seq", "32"]
    rc, ref, err = run_train([*args, "--reference"], None)
    assert rc == 0, err[-3000:]
    rc, got, err = run_train([*args, "--plan", str(plan)], 2)
    assert rc == 0, err[-3000:]
    assert max_rel_diff(ref, got) <= 1e-5, (ref, got)
