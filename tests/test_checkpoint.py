"""Training state survives a change of plan: save at step 5 under plan A, load under plan B, train steps 6-10.

Acceptance (issue 15): for every pair, B's losses of steps 6-10 are within 1e-5 relative of A's own uninterrupted
steps 6-10: a world-size change (dp=2 x tp=2 on 4 ranks -> tp=2 on 2 ranks), ZeRO-3 -> ZeRO-1 (with tp's shards
cut again by FSDP), pp=2 -> dp=2, tp=2 in bf16 -> the same with full activation checkpointing (bf16 rounds
differently under another split of the work, so only a plan computing the same numbers can be held to 1e-5),
dp=2 x tp=2 -> ZeRO-3 on 2 ranks, context parallelism cp=2 -> dp=2 and dp=2 x tp=2 -> cp=2 with ZeRO-3 (optimizer
state sharded over the dp x cp ranks); resuming under the same cp=2 plan gives the uninterrupted losses exactly; and
resuming under the same plan with dropout p=0.1 ends on parameters bitwise equal to the uninterrupted run's (every
rank's RNG restored).

Two launches (4 ranks, then 2), each running several trainings of examples/train.py one after another
(tests/checkpoint_jobs.py); every save in them is train.py's asynchronous one.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from tests.dist_utils import ROOT, TRAIN, max_rel_diff, run_jobs, torchrun

pytestmark = [pytest.mark.dist, pytest.mark.slow]
GPT = ["--model", "gpt-tiny", "--steps", "10", "--seed", "0", "--batch", "8", "--seq", "16"]
SAVE_AT = 5


def _uninterrupted(name: str, fix: str, root, *extra: str) -> dict:
    """Plan A: ten steps, saving every 5 (step 5 is what plan B resumes from)."""
    return {"name": name, "argv": [*GPT, *extra, "--fix", fix, "--checkpoint-dir", str(root / name),
                                   "--checkpoint-every", str(SAVE_AT)]}


def _resumed(name: str, fix: str, source: str, root, *extra: str) -> list[dict]:
    """Plan B: a folder holding only A's step-5 checkpoint, resumed from by train.py, to step 10."""
    step = f"step_{SAVE_AT:08d}"
    return [{"copy": [str(root / source / step), str(root / name / step)]},
            {"name": name, "argv": [*GPT, *extra, "--fix", fix, "--checkpoint-dir", str(root / name)]}]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    four = [_uninterrupted("dp2tp2", "dp=2,tp=2", root),
            _uninterrupted("zero3", "dp=2,tp=2,zero=3", root),
            *_resumed("zero3-to-zero1", "dp=4,zero=1", "zero3", root)]
    rc, losses, err = run_jobs(four, 4, root)
    assert rc == 0, err[-4000:]
    two = [*_resumed("dp2tp2-to-tp2", "tp=2", "dp2tp2", root),
           _uninterrupted("pp2", "pp=2,mbs=2", root),
           *_resumed("pp2-to-dp2", "dp=2", "pp2", root),
           _uninterrupted("tp2-bf16", "tp=2,precision=bf16", root),
           *_resumed("tp2-bf16-to-ac-full", "tp=2,precision=bf16,ac=full", "tp2-bf16", root),
           *_resumed("tp2-to-zero3", "dp=2,zero=3", "dp2tp2", root),
           _uninterrupted("cp2", "cp=2", root), *_resumed("cp2-resumed", "cp=2", "cp2", root),
           *_resumed("cp2-to-dp2", "dp=2", "cp2", root),
           *_resumed("dp2tp2-to-cp2-zero3", "cp=2,zero=3", "dp2tp2", root)]
    dropout = ["--model-args", "dropout=0.1"]
    two += [_uninterrupted("dropout", "tp=2", root, *dropout, "--dump", str(root / "dropout.pt")),
            *_resumed("dropout-resumed", "tp=2", "dropout", root, *dropout, "--dump", str(root / "resumed.pt"))]
    rc, more, err = run_jobs(two, 2, root)
    assert rc == 0, err[-4000:]
    return {**losses, **more}, root


@pytest.mark.parametrize("source,resumed", [
    ("dp2tp2", "dp2tp2-to-tp2"),  # 4 ranks -> 2 ranks
    ("zero3", "zero3-to-zero1"),
    ("pp2", "pp2-to-dp2"),
    ("tp2-bf16", "tp2-bf16-to-ac-full"),
    ("dp2tp2", "tp2-to-zero3"),
    ("cp2", "cp2-to-dp2"),  # context-parallel shards of the sequence -> data parallel
    ("dp2tp2", "dp2tp2-to-cp2-zero3"),  # 4 ranks -> cp=2 with ZeRO-3 over the dp x cp ranks
])
def test_resume_under_another_plan(runs, source, resumed):
    losses, _ = runs
    assert len(losses[source]) == 10 and len(losses[resumed]) == 10 - SAVE_AT, losses
    assert max_rel_diff(losses[source][SAVE_AT:], losses[resumed]) <= 1e-5, (losses[source], losses[resumed])


def test_same_plan_resume_under_cp_gives_the_same_losses(runs):
    losses, _ = runs
    assert len(losses["cp2"]) == 10 and losses["cp2"][SAVE_AT:] == losses["cp2-resumed"], losses


def test_same_plan_resume_is_bitwise_with_dropout(runs):
    losses, root = runs
    assert losses["dropout"][SAVE_AT:] == losses["dropout-resumed"]
    a, b = torch.load(root / "dropout.pt")["params"], torch.load(root / "resumed.pt")["params"]
    assert a.keys() == b.keys() and a
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def _workers(launcher: int) -> dict[int, int]:
    """torchrun's worker processes: rank -> pid (children of the launcher with RANK in their environment)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        rank = [e[5:] for e in env if e.startswith(b"RANK=")]
        if ppid == launcher and rank:
            out[int(rank[0])] = int(pid)
    return out


def test_kill_one_rank_mid_training(runs, tmp_path):
    """kill -9 of rank 1 after step 5 under torchrun --max-restarts=1, saving every 2 steps: torchrun restarts the
    job, train.py resumes from the newest complete checkpoint, and the run ends on the uninterrupted run's
    parameters, bit for bit."""
    _, root = runs
    args = [*GPT, "--model-args", "dropout=0.1", "--fix", "tp=2", "--checkpoint-dir", str(tmp_path / "ckpt"),
            "--checkpoint-every", "2", "--dump", str(tmp_path / "final.pt")]
    cmd = [*torchrun(2, restarts=1), TRAIN, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith('{"step": 4,'):
                os.kill(_workers(proc.pid)[1], signal.SIGKILL)
                break
        out, err = proc.communicate(timeout=900)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, err[-4000:]
    assert re.search(r"resumed from step [24] ", err), err[-4000:]
    a, b = torch.load(root / "dropout.pt")["params"], torch.load(tmp_path / "final.pt")["params"]
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []


def test_killed_mid_save_leaves_previous_checkpoint(runs, tmp_path):
    """Rank 1 dies (SIGKILL) inside the save of step 4, its shard files written, the checkpoint not complete: the
    restarted job resumes from step 2, not from the partial step 4, and ends on the uninterrupted parameters."""
    _, root = runs
    job = {"name": "killed", "kill_in_save": [1, 4],
           "argv": [*GPT, "--model-args", "dropout=0.1", "--fix", "tp=2", "--checkpoint-dir", str(tmp_path / "c"),
                    "--checkpoint-every", "2", "--dump", str(tmp_path / "final.pt")]}
    rc, losses, err = run_jobs([job], 2, tmp_path, restarts=1)
    assert rc == 0, err[-4000:]
    assert "resumed from step 2 " in err and "resumed from step 4" not in err, err[-4000:]
    a, b = torch.load(root / "dropout.pt")["params"], torch.load(tmp_path / "final.pt")["params"]
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
