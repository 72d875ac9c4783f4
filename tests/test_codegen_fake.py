"""Tier 1: code generation for world sizes this machine cannot run, under torch's fake process group.
Collective counts only; the numbers are checked on real ranks in test_parity.py."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

from tests.dist_utils import ROOT

SCRIPT = r"""
import re, sys, json, torch, torch.distributed as dist
from collections import Counter
from torch.testing._internal.distributed.fake_pg import FakeStore
import autopar
from autopar.models import build_model, sample_inputs
dist.init_process_group("fake", store=FakeStore(), rank=int(sys.argv[1]), world_size=8)
torch.manual_seed(0)
model, info = build_model("gpt-tiny", {"layers": 3})
plan = sys.argv[2] if int(sys.argv[1]) else None  # the fake group broadcasts nothing: other ranks load rank 0's plan
compiled = autopar.compile(model, sample_inputs=sample_inputs(info, 8, 32), fix={"dp": 2, "tp": 4},
                           hardware="a100-80gb-sxm", plan=plan)
if plan is None:
    compiled.plan.save(sys.argv[2])
loss = compiled(*sample_inputs(info, 8, 32))
loss.backward()
counts = Counter(".".join(m) for m in re.findall(r"self\.comm\.(\w+)\.(\w+)", compiled.code))
print(json.dumps({"counts": counts, "shapes": {n: list(compiled.local_parameter(n).shape) for n in compiled.param_paths}}))
"""


def _generate(rank: int, plan) -> dict:
    import json

    out = subprocess.run([sys.executable, "-c", SCRIPT, str(rank), str(plan)], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_megatron_sequence_parallel_collectives_per_block_on_8_ranks(tmp_path):
    got = _generate(0, tmp_path / "plan.json")
    counts = Counter(got["counts"])
    # Megatron-SP per block (Korthikanti et al. 2022): one all-gather before attention and one before the MLP
    # (shared by q, k and v), one reduce-scatter after each row-parallel projection: 3 blocks -> 6 and 6.
    assert counts["tp.reduce_scatter"] == 6
    assert 6 <= counts["tp.all_gather"] <= 8  # + the head's gather of the final norm's output
    assert counts["dp.all_reduce"] >= 1  # the loss: a partial sum over the batch shards
    # vocab-parallel loss, the logits never gathered: comm.tp.cross_entropy, or fused with the head (the chunked
    # kernel all-reduces over the tp group it reads, codegen/fuse.py)
    assert counts["tp.cross_entropy"] + counts["tp.group"] == 1
    shapes = got["shapes"]
    assert shapes["blocks.0.mlp.fc.weight"] == [256 // 4, 64]  # column-parallel: output features split by tp
    assert shapes["blocks.0.mlp.proj.weight"] == [64, 256 // 4]  # row-parallel: input features split by tp


def test_every_rank_generates_the_same_program_shape(tmp_path):
    plan = tmp_path / "plan.json"
    a = _generate(0, plan)
    assert _generate(7, plan) == a
