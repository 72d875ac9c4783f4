"""Pipeline parallelism at run time (autopar/runtime/pipeline.py): stages cut from the split program, torch's schedules.

Tier 3 acceptance, like test_parity.py: gpt-tiny and llama-tiny with 4 layers, pp=2 alone and with dp, tp, both,
ZeRO and activation checkpointing, every schedule that runs on gloo: 10 steps of losses within 1e-5 relative of
one eager process and every gradient after the first step within 1e-5 relative (gathered from both pp ranks).
Plans are built by hand until the planner chooses pipelines: today's planner plans the per-stage (dp, tp) mesh at
the micro-batch size, then the pipeline fields are set (`_pipeline_plan`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from autopar.errors import MeshError, NotSupportedYet, PlanError
from autopar.runtime.pipeline import check_stages
from autopar.planning import make_plan
from tests.dist_utils import ROOT, grad_mismatches, max_rel_diff, run_train

pytestmark = pytest.mark.slow
LAYERS = 4
COMMON = ["--model-args", f"layers={LAYERS}", "--steps", "10", "--seed", "0", "--batch", "8"]


def _pipeline_plan(model: str, pp: int = 2, schedule: str = "1f1b", v: int = 1, m: int = 4, **fix):
    """A plan for pp x dp x tp devices: the (dp, tp) stage mesh planned at m micro-batches, stages of equal
    layer counts placed in a loop (stage c on pp rank c % pp)."""
    fix = {"dp": 1, "tp": 1, **fix}
    plan = make_plan(model, devices=fix["dp"] * fix["tp"], hardware="cpu", batch=8, model_args={"layers": LAYERS},
                     fix={**fix, "mbs": 8 // m // fix["dp"]})  # mbs per data-parallel replica
    prefix = "layers" if model.startswith("llama") else "blocks"
    per = LAYERS // (pp * v)
    stages = [[f"{prefix}.{i}" for i in range(c * per, (c + 1) * per)] for c in range(pp * v)]
    return replace(plan, degrees={**plan.degrees, "pp": pp}, devices=pp * plan.devices, schedule=schedule,
                   virtual_stages=v, stages=stages, num_micro_batches=m)


# --- without processes ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt_plan():
    return _pipeline_plan("gpt-tiny")


BLOCKS = [f"blocks.{i}" for i in range(LAYERS)]


def test_a_pipeline_the_model_cannot_fill_is_refused(gpt_plan):
    too_deep = replace(gpt_plan, schedule="interleaved", virtual_stages=3, stages=[[b] for b in BLOCKS] + [[], []])
    with pytest.raises(MeshError, match="4 layers but pp=2 x v=3"):
        check_stages(too_deep, BLOCKS)
    with pytest.raises(PlanError, match="runs one stage per rank"):
        check_stages(replace(gpt_plan, virtual_stages=2, stages=[[b] for b in BLOCKS]), BLOCKS)
    with pytest.raises(PlanError, match="once each, in order"):
        check_stages(replace(gpt_plan, stages=[["blocks.2", "blocks.3"], ["blocks.0", "blocks.1"]]), BLOCKS)
    check_stages(gpt_plan, BLOCKS)  # the plan as made is accepted


def test_zero_bubble_refuses_what_its_split_backward_cannot_run(gpt_plan):
    zb = replace(gpt_plan, schedule="zero-bubble")
    check_stages(zb, BLOCKS)
    with pytest.raises(NotSupportedYet, match="selective"):
        check_stages(replace(zb, ac_layers={"blocks.1": "selective"}), BLOCKS)
    with pytest.raises(NotSupportedYet, match="ZeRO-3"):
        check_stages(replace(zb, zero=3, degrees={**zb.degrees, "dp": 2}), BLOCKS)


STAGES_SCRIPT = r"""
import sys, json, torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
import autopar
from autopar.models import build_model, sample_inputs
for model_name, rank, plan in zip(sys.argv[1::3], sys.argv[2::3], sys.argv[3::3]):
    dist.init_process_group("fake", store=FakeStore(), rank=int(rank), world_size=2)
    model, info = build_model(model_name, {"layers": 4})
    compiled = autopar.compile(model, sample_inputs=sample_inputs(info, 8, 32), plan=plan)
    stages = []
    for s in compiled.program:
        out = next(n for n in s.body.graph.nodes if n.op == "output").args[0]
        stages.append({"index": s.index, "inputs": len([n for n in s.body.graph.nodes if n.op == "placeholder"]),
                       "outputs": len(out) if isinstance(out, tuple) else "loss",
                       "segments": [n.target for n in s.body.graph.nodes if n.op == "call_module"]})
    print(json.dumps({"stages": stages, "params": sorted(compiled.param_paths),
                      "shared": len(compiled.pipeline.shared)}))
    dist.destroy_process_group()
"""


def _stages_on(*runs: tuple[str, int, object]) -> list[dict]:
    """(model, pp rank, plan file) -> that rank's stages, under torch's fake process group of 2 ranks."""
    argv = [str(x) for run in runs for x in run]
    out = subprocess.run([sys.executable, "-c", STAGES_SCRIPT, *argv], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.strip().splitlines()[-len(runs):]]


def test_stages_pass_later_inputs_through_and_hold_only_their_parameters(tmp_path):
    """Loop placement of 4 stages on 2 ranks (interleaved, v=2): rank 0 runs stages 0 and 2, rank 1 stages 1 and 3.
    GPT: the integer targets ride along to the loss; wte (tied to lm_head) lives on both ends of the pipeline.
    Llama: the rotary tables made before the first layer are passed to every later stage."""
    _pipeline_plan("gpt-tiny", schedule="interleaved", v=2).save(tmp_path / "gpt.json")
    _pipeline_plan("llama-tiny", schedule="interleaved", v=2).save(tmp_path / "llama.json")
    gpt, llama = _stages_on(("gpt-tiny", 0, tmp_path / "gpt.json"), ("llama-tiny", 1, tmp_path / "llama.json"))
    assert [s["index"] for s in gpt["stages"]] == [0, 2]
    assert gpt["stages"][0] == {"index": 0, "inputs": 2, "outputs": 2, "segments": ["top_0", "blocks_0"]}
    assert gpt["stages"][1]["segments"] == ["blocks_2"]  # tokens, targets -> targets, hidden -> ...
    assert {p.split(".")[1] for p in gpt["params"] if p.startswith("blocks.")} == {"0", "2"}
    assert "lm_head.weight" in gpt["params"] and gpt["shared"] == 1  # summed with rank 1's copy
    assert [s["index"] for s in llama["stages"]] == [1, 3]
    assert llama["stages"][0]["inputs"] == 4 == llama["stages"][0]["outputs"]  # targets, cos, sin, hidden
    assert llama["stages"][1] == {"index": 3, "inputs": 4, "outputs": "loss", "segments": ["layers_3", "top_5"]}
    assert "embed.weight" not in llama["params"] and llama["shared"] == 0


OVERLAP_SCRIPT = r"""
import json, torch, torch.distributed as dist
from types import SimpleNamespace
from torch.distributed.device_mesh import init_device_mesh
from torch.testing._internal.distributed.fake_pg import FakeStore
import autopar.runtime.compiled as compiled
dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
compiled.BUCKET_BYTES = 256  # several buckets from a small net
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
params = dict(net.named_parameters())
model = SimpleNamespace(mesh=init_device_mesh("cpu", (2,), mesh_dim_names=("dp",)),
                        plan=SimpleNamespace(axis_names=["dp"]), local_parameter=params.__getitem__)
sync = compiled._GradSync(model, {name: (0,) for name in params})
launched = []
with sync.pipelined(3):  # a schedule's three micro-batches, each backward its own autograd run
    for _ in range(3):
        net(torch.randn(4, 8)).sum().backward()
        launched.append(len(sync.launched))
sync.reduce_all()
print(json.dumps({"launched": launched, "buckets": len(sync.buckets), "left": len(sync.launched)}))
"""


def test_data_parallel_reduction_starts_during_the_last_micro_batch_backward():
    """Under a pipeline schedule each gradient bucket is reduced as soon as its last micro-batch's gradients land,
    inside that backward (not after the schedule); the step then waits for all of them (fake process group)."""
    out = subprocess.run([sys.executable, "-c", OVERLAP_SCRIPT], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["buckets"] > 1
    assert got["launched"] == [0, 0, got["buckets"]]  # none before the last micro-batch, every one during it
    assert got["left"] == 0  # reduce_all waited for them


# --- real gloo ranks -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cache = {}

    def get(model: str):
        if model not in cache:
            dump = tmp_path_factory.mktemp("ref") / f"{model}.pt"
            rc, losses, err = run_train(["--model", model, *COMMON, "--reference"], None, dump)
            assert rc == 0, err
            cache[model] = (losses, dump)
        return cache[model]

    return get


# (model, pipeline and stage mesh) -> world size pp x dp x tp
CASES = [
    ("gpt-tiny", dict(schedule="gpipe")),
    ("gpt-tiny", dict(schedule="zero-bubble", v=2, ac="full", dp=2)),  # weight gradients land without hooks
    ("gpt-tiny", dict(schedule="1f1b", dp=2)),  # dp gradient buckets reduced during the last backward passes
    ("gpt-tiny", dict(schedule="gpipe", dp=2, m=1)),  # one micro-batch: each bucket reduced once, not twice
    ("gpt-tiny", dict(schedule="1f1b", tp=2)),  # TP + SP collectives inside stages
    ("gpt-tiny", dict(schedule="interleaved", v=2, dp=2, zero=3, ac="full")),  # FSDP per stage root
    ("llama-tiny", dict(schedule="interleaved", v=2, tp=2, ac="selective")),  # rotary tables passed through
    ("gpt-tiny", dict(schedule="1f1b", dp=2, tp=2, zero=2)),  # 8 ranks
]


def _id(case) -> str:
    model, kw = case
    return model.split("-")[0] + "-" + "-".join(f"{k}{v}" for k, v in kw.items())


@pytest.mark.dist
@pytest.mark.parametrize("model, pipeline", CASES, ids=[_id(c) for c in CASES])
def test_pipeline_parity(model, pipeline, reference, tmp_path):
    plan = _pipeline_plan(model, **pipeline)
    plan.save(tmp_path / "plan.json")
    ref_losses, ref_dump = reference(model)
    dump = tmp_path / "par.pt"
    rc, losses, err = run_train(["--model", model, *COMMON, "--plan", str(tmp_path / "plan.json")], plan.devices, dump)
    assert rc == 0, err[-3000:]
    assert len(losses) == 10
    assert max_rel_diff(ref_losses, losses) <= 1e-5, (ref_losses, losses)
    assert grad_mismatches(ref_dump, dump) == []


@pytest.mark.dist
def test_gradient_accumulation_without_a_pipeline(reference, tmp_path):
    """pp=1 with 4 micro-batches: train_step accumulates, FSDP reduce-scatters once, after the last."""
    plan = make_plan("gpt-tiny", devices=2, hardware="cpu", batch=8, model_args={"layers": LAYERS},
                     fix={"dp": 2, "mbs": 1, "zero": 2})  # 8 = mbs 1 x dp 2 x 4 micro-batches
    assert plan.num_micro_batches == 4
    plan.save(tmp_path / "plan.json")
    ref_losses, ref_dump = reference("gpt-tiny")
    dump = tmp_path / "par.pt"
    rc, losses, err = run_train(["--model", "gpt-tiny", *COMMON, "--plan", str(tmp_path / "plan.json")], 2, dump)
    assert rc == 0, err[-3000:]
    assert max_rel_diff(ref_losses, losses) <= 1e-5, (ref_losses, losses)
    assert grad_mismatches(ref_dump, dump) == []
