"""Several trainings of examples/train.py in one torchrun launch, one after another, for the checkpoint tests:
a launch costs seconds of process and process-group start-up, a job only its compile and steps.

    python -m torch.distributed.run --standalone --nproc_per_node N tests/checkpoint_jobs.py JOBS.json

JOBS.json is a list; each item is {"name": ..., "argv": [train.py arguments]} (rank 0 prints one line
{"job": name, "losses": [...]} with the losses of the steps it ran) or {"copy": [src, dst]} (rank 0 copies a
checkpoint folder, e.g. step 5 of a run, into the folder a later job resumes from). A job with
"kill_in_save": [rank, step] has that rank SIGKILL itself in its first attempt (torchrun restarts), once its
files of that step's checkpoint are written and before the checkpoint is complete: a process dying mid-save.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import train  # noqa: E402


def main() -> int:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    train.init_distributed("gloo")
    try:
        for job in jobs:
            if "copy" in job:
                if dist.get_rank() == 0:
                    src, dst = job["copy"]
                    shutil.copytree(src, dst)
                dist.barrier()
                continue
            if "kill_in_save" in job and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
                _die_in_save(*job["kill_in_save"])
            losses = train.train(train.parse_args(job["argv"]))
            if dist.get_rank() == 0:
                print(json.dumps({"job": job["name"], "losses": losses}), flush=True)
    finally:
        train.teardown()
    return 0


def _die_in_save(rank: int, step: int) -> None:
    from torch.distributed.checkpoint import FileSystemWriter

    write = FileSystemWriter.write_data

    def write_then_die(self, plan, planner):
        done = write(self, plan, planner)
        if dist.get_rank() == rank and f"step_{step:08d}" in str(self.path):
            done.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        return done

    FileSystemWriter.write_data = write_then_die


if __name__ == "__main__":
    train.exit_now(main())
