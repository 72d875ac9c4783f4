"""ZeRO stages and mixed precision at run time, from torch's own pieces (DESIGN decision 8).

Stages (Rajbhandari et al. 2020, arXiv 1910.02054) along the data-parallel axis:
  0  replicated parameters, gradients all-reduced in buckets (runtime.py)
  1  + optimizer state partitioned: torch.distributed.optim.ZeroRedundancyOptimizer over the dp group
  2  + gradients partitioned: FSDP2 `fully_shard` per block, reshard_after_forward=False (parameters stay
     gathered from forward to backward), gradients reduce-scattered
  3  + parameters partitioned: the same with reshard_after_forward=True (gathered per block, with prefetch)
FSDP2 runs on the dp sub-mesh over this rank's tensor-parallel shards, so it composes with the generated TP/SP
graph: tensor-parallel gradient reductions stay in the graph, FSDP owns only the dp axis.
Mixed precision: bf16 parameters for compute, fp32 sharded master weights, fp32 gradient reduction
(FSDP2 MixedPrecisionPolicy); stages 0/1 keep fp32 parameters and run the forward under bf16 autocast.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

ZERO_STAGES = (0, 1, 2, 3)
PRECISIONS = ("fp32", "bf16")


def shard_with_fsdp(program: nn.Module, blocks: list[nn.Module], dp_mesh: DeviceMesh, stage: int, precision: str,
                    replicated: set[nn.Parameter]) -> None:
    """FSDP2 on every block submodule, then on `program` (embeddings, head: everything the blocks do not own).
    `program` is the whole rank's program, or one pipeline stage: the root torch.distributed.pipelining's
    PipelineStage drives (no reduction per micro-batch, one after the last backward).
    `replicated` parameters stay outside FSDP: the generated graph reduces their gradient itself (e.g. a position
    embedding whose gradient becomes a dp sum where it meets the batch, not at the parameter)."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard  # here: planning needs no FSDP

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" \
        else MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=stage == 3, mp_policy=mp, ignored_params=replicated)
    fully_shard(program, mesh=dp_mesh, reshard_after_forward=stage == 3, mp_policy=mp, ignored_params=replicated)
    for module in program.modules():
        if isinstance(module, FSDPModule):
            # The generated loss is already the global mean (the dp shards' partial sums are all-reduced in the
            # graph), so each rank's gradient is a partial sum: FSDP must add them, not average them.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no pre-multiplied sum


def make_optimizer(params, cls: type[torch.optim.Optimizer], stage: int, dp_group, **kwargs) -> torch.optim.Optimizer:
    """`cls(params, **kwargs)`, its state partitioned over the dp group under ZeRO-1."""
    params = list(params)
    if stage == 1 and dp_group is not None:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        # One flat bucket per rank: after the step each rank broadcasts its bucket, n messages instead of one per
        # parameter (68 for gpt-tiny: ~23 ms of gloo latency a step on a CPU host against ~2 ms)
        return ZeroRedundancyOptimizer(params, optimizer_class=cls, process_group=dp_group,
                                       parameters_as_bucket_view=True, **kwargs)
    return cls(params, **kwargs)
