"""`autopar validate`: how far to trust the planner on this machine — several plans of a small model trained on the
live ranks, their measured step time and peak memory beside the predictions, and the error statistics.

Each plan runs `examples/train.py --measure` under torchrun (a few steps: the first warms up, the median of
the following ones is the step time, and the last is traced for its peak tensor bytes; the largest over ranks,
autopar/runtime/measure.py). Statistics: mean absolute percentage error of step time and of memory, and Spearman's rank
correlation of predicted vs measured step time (does the planner order the plans as the machine does?).

With several rounds the plans run round-robin (every plan once per round, so a slow spell of the machine falls on
all of them alike) and each plan's numbers are the medians over its rounds (`combine`): one launch of a plan can
land 15-20% off its usual time on a 2-core host (where its ranks' threads are placed), which is the spread of the
seven default plans' times.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autopar.errors import AutoparError

TRAIN = Path(__file__).resolve().parents[1] / "examples" / "train.py"
DEFAULT_PLANS = ("dp=2", "tp=2", "dp=2,zero=3", "dp=2,ac=full", "tp=2,ac=selective", "dp=2,zero=1", "pp=2")


@dataclass(frozen=True)
class Row:
    fix: str
    predicted_s: float
    measured_s: float
    predicted_bytes: float
    measured_bytes: float


def run_plan(model: str, model_args: str, fix: str, nproc: int, batch: int, hardware: str, steps: int) -> Row:
    if not TRAIN.exists():
        raise AutoparError(f"validate runs {TRAIN}, which is missing; run it from a source checkout of autopar")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(TRAIN),
           "--model", model, "--model-args", model_args, "--steps", str(steps), "--batch", str(batch), "--fix", fix,
           "--hardware", hardware, "--measure"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    for line in proc.stdout.splitlines():
        if "measured_peak_bytes" in line:
            d = json.loads(line)
            return Row(fix, d["predicted_step_s"], d["measured_step_s"], d["predicted_peak_bytes"],
                       d["measured_peak_bytes"])
    last = next((ln for ln in reversed(proc.stderr.splitlines()) if "autopar: error" in ln), None)
    reason = last.split("autopar: error: ", 1)[-1] if last else f"torchrun exited {proc.returncode}"
    raise AutoparError(f"plan --fix {fix} did not run: {reason}")


def combine(runs: list[Row]) -> Row:
    """One plan's rounds as one row: the predictions (the same every round) and the median measurements."""
    if not runs or len({r.fix for r in runs}) != 1:
        raise ValueError("combine takes the rounds of one plan")
    return Row(runs[0].fix, runs[0].predicted_s, float(np.median([r.measured_s for r in runs])),
               runs[0].predicted_bytes, float(np.median([r.measured_bytes for r in runs])))


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (Pearson on ranks; ties get their mean rank)."""
    def ranks(x):
        x = np.asarray(x, dtype=float)
        order = x.argsort()
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # ties share their mean rank
            r[x == v] = r[x == v].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def statistics(rows: list[Row]) -> dict[str, float]:
    t_err = [r.predicted_s / r.measured_s - 1 for r in rows]
    m_err = [r.predicted_bytes / r.measured_bytes - 1 for r in rows]
    return {"step_mape": float(np.mean(np.abs(t_err))), "memory_mape": float(np.mean(np.abs(m_err))),
            "step_within_25": sum(abs(e) <= 0.25 for e in t_err), "memory_within_15": sum(abs(e) <= 0.15 for e in m_err),
            "spearman": spearman([r.predicted_s for r in rows], [r.measured_s for r in rows])}
