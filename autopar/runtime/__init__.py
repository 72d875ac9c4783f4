"""The run-time side of autopar: the compiled training object and what it runs on.

`compiled.py` (CompiledModel: the generated per-rank program, bucketed gradient sync, micro-batching),
`pipeline.py` (stages and torch.distributed.pipelining schedules), `zero.py` (ZeRO-1 and FSDP2 for ZeRO-2/3),
`checkpointing.py` (activation checkpointing per block), `measure.py` (step time and peak memory), `state.py` and
`checkpoint_io.py` (training state saved and loaded with torch.distributed.checkpoint under any plan) and
`export.py` (one single-device state dict, or a transformers folder).
Nothing here imports the planner: the plan is data the runtime reads.
"""

from autopar.runtime.compiled import BUCKET_BYTES, CompiledModel

__all__ = ["BUCKET_BYTES", "CompiledModel"]
