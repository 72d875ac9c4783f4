"""Helpers for tier-3 tests: real gloo ranks launched with torchrun, compared with a single-process reference."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "examples" / "train.py")
JOBS = str(ROOT / "tests" / "checkpoint_jobs.py")


def run_train(args: list[str], nproc: int | None, dump: Path | None = None, timeout: int = 600):
    """Run examples/train.py eagerly (nproc None) or under torchrun; return (returncode, losses, stderr)."""
    return _launch(args, nproc, dump, timeout)


def run_jobs(jobs: list[dict], nproc: int, workdir: Path, timeout: int = 900, restarts: int = 0
             ) -> tuple[int, dict, str]:
    """Run tests/checkpoint_jobs.py's jobs (several trainings) in one torchrun launch: (returncode, the losses of
    each named job, stderr)."""
    spec = workdir / "jobs.json"
    spec.write_text(json.dumps(jobs))
    rc, stdout, stderr = run_isolated(torchrun(nproc, restarts) + [JOBS, str(spec)], timeout)
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith('{"job"')]
    return rc, {d["job"]: d["losses"] for d in lines}, stderr


def torchrun(nproc: int, restarts: int = 0) -> list[str]:
    """The torchrun command line. With restarts, the static rendezvous on a free port: with torch 2.13 a restarted
    --standalone (c10d rendezvous) job hangs in init_process_group on this host; the static one restarts cleanly."""
    if not restarts:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--master-port={port}",
            f"--nproc_per_node={nproc}", f"--max-restarts={restarts}"]


def _launch(args: list[str], nproc: int | None, dump: Path | None, timeout: int):
    cmd = [sys.executable, TRAIN, *args] if nproc is None else torchrun(nproc) + [TRAIN, *args]
    if dump is not None:
        cmd += ["--dump", str(dump)]
    rc, stdout, stderr = run_isolated(cmd, timeout)
    losses = [json.loads(line)["loss"] for line in stdout.splitlines() if line.startswith("{")]
    return rc, losses, stderr


def run_isolated(cmd: list[str], timeout: int, env: dict | None = None) -> tuple[int, str, str]:
    """Run cmd (`env` added to the environment); (returncode, stdout, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    # A session of its own: a run that hangs (ranks waiting on each other) is killed with every rank it started,
    # not just the launcher.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, stdout, stderr


def max_rel_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) and a, (a, b)
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))


def grad_mismatches(ref: Path, got: Path, rtol: float = 1e-5) -> list[str]:
    """Names of gradients that differ by more than rtol relative to the reference gradient's scale.

    A gradient that is zero in exact arithmetic (attention's key bias: softmax ignores a shift shared by all keys)
    is rounding noise of ~1e-11 in both runs; its scale is floored at 1e-4 of the model's largest gradient."""
    a, b = torch.load(ref)["grads"], torch.load(got)["grads"]
    floor = 1e-4 * max(g.abs().max().item() for g in a.values())
    bad = [k for k in a if k not in b]
    for k, g in a.items():
        if k in b and (g - b[k]).abs().max().item() > rtol * max(g.abs().max().item(), floor):
            bad.append(k)
    return bad
