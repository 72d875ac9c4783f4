"""Several trainings of examples/train.py in one torchrun launch, one after another, for the checkpoint tests:
a launch costs seconds of process and process-group start-up, a job only its compile and steps.

    python -m torch.distributed.run --standalone --nproc_per_node N tests/checkpoint_jobs.py JOBS.json

JOBS.json is a list; each item is {"name": ..., "argv": [train.py arguments]} (rank 0 prints one line
{"job": name, "losses": [...]} with the losses of the steps it ran) or {"copy": [src, dst]} (rank 0 copies a
checkpoint folder, e.g. step 5 of a run, into the folder a later job resumes from).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import train  # noqa: E402


def main() -> int:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    dist.init_process_group("gloo")
    try:
        for job in jobs:
            if "copy" in job:
                if dist.get_rank() == 0:
                    src, dst = job["copy"]
                    shutil.copytree(src, dst)
                dist.barrier()
                continue
            losses = train.train(train.parse_args(job["argv"]))
            if dist.get_rank() == 0:
                print(json.dumps({"job": job["name"], "losses": losses}), flush=True)
    finally:
        train.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
