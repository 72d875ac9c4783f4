"""Bytes per device: model state by ZeRO stage and precision, activations by checkpointing mode.

Two accountings of model state live here, on purpose:
- `zero_model_state_bytes` is the published formula (Rajbhandari et al. 2020, arXiv 1910.02054, Sec. 5.1: mixed
  precision Adam keeps 2 + 2 + 12 bytes per parameter; ZeRO-1 partitions the 12, ZeRO-2 also the 2 of gradients,
  ZeRO-3 everything), used to check the planner against the paper and to explain plans;
- `state_bytes_per_element` is what autopar's runtime (runtime/zero.py) holds at the step's peak, which the planner must
  predict: FSDP2 keeps sharded fp32 parameters (the master copy) and fp32 sharded gradients, and under ZeRO-2 every
  block's gathered copy from forward to backward; stages 0/1 keep fp32 parameters (autocast makes bf16 copies).
Activations (Korthikanti et al. 2022, arXiv 2205.05198): each tensor autograd saves is counted once; checkpointing a
block keeps its inputs (full) or also its weight-matmul outputs (selective), and the block being recomputed holds
all of its activations once (one block at a time).
"""

from __future__ import annotations

from dataclasses import dataclass

from autopar.runtime.checkpointing import AC_MODES
from autopar.runtime.zero import PRECISIONS, ZERO_STAGES

ADAM_MOMENTS = 8.0  # fp32 exp_avg + exp_avg_sq
FP32 = 4.0
BF16 = 2.0


def zero_model_state_bytes(n_params: float, zero: int, dp: int, param_bytes: float = 2.0, grad_bytes: float = 2.0,
                           optimizer_bytes: float = 12.0) -> float:
    """Rajbhandari et al. 2020, Fig. 1: (2 + 2 + K)Ψ for DP; ZeRO-1 (2 + 2)Ψ + KΨ/N; ZeRO-2 2Ψ + (2 + K)Ψ/N;
    ZeRO-3 (2 + 2 + K)Ψ/N, with K = 12 for mixed-precision Adam."""
    p, g, k = param_bytes, grad_bytes, optimizer_bytes
    per = {0: p + g + k, 1: p + g + k / dp, 2: p + (g + k) / dp, 3: (p + g + k) / dp}[zero]
    return n_params * per


@dataclass(frozen=True)
class MemoryConfig:
    """The memory decisions outside the sharding ILP: one per candidate the outer search evaluates."""
    zero: int = 0
    ac: str = "none"
    precision: str = "fp32"
    # fused kernels (planner/fusion.py) change what backward keeps and the step time; the search fuses where the
    # hardware runs them as Triton, or as `--fix fuse=` says (space.memory_configs); a bare config prices the
    # unfused program
    fuse: bool = False

    def __post_init__(self):
        if self.zero not in ZERO_STAGES or self.ac not in AC_MODES or self.precision not in PRECISIONS:
            raise ValueError(f"bad memory config {self}")


def state_bytes_per_element(cfg: MemoryConfig, dp: int) -> dict[str, float]:
    """Bytes per (tensor-parallel local) parameter element held at the step's peak by the runtime, per part."""
    z, n = (cfg.zero, dp) if dp > 1 else (0, 1)
    if z <= 1:  # fp32 parameters and gradients (autocast's bf16 weight copies counted as transient, below)
        return {"params": FP32, "grads": FP32, "optimizer_state": ADAM_MOMENTS / (n if z == 1 else 1)}
    gathered = (BF16 if cfg.precision == "bf16" else FP32) if z == 2 else 0.0  # ZeRO-2: every block stays gathered
    return {"params": FP32 / n + gathered, "grads": FP32 / n, "optimizer_state": ADAM_MOMENTS / n}


def transient_bytes_per_element(cfg: MemoryConfig, dp: int) -> dict[str, float]:
    """Per element of the parameters a transient concerns, from FSDP2's schedule (torch/distributed/fsdp/
    _fully_shard/_fsdp_param_group.py). Gradients are reduced in fp32.
    gathered_block: the block at work's gathered parameters (ZeRO-3; ZeRO-2 holds every block gathered, in
      `params`).
    forward_end: ZeRO-2's all-gather output of the last block at the end of forward: forward keeps a group's
      output until the next copy-out (`wait_for_unshard`), the last one's until the root's post-forward.
    prefetch: ZeRO-3's all-gather output of the next block: backward prefetches one group ahead
      (`_backward_prefetch`) and frees the output at that group's copy-out.
    reduce_input: under checkpointing, whose peak is inside a block's backward beside its recomputed activations,
      the previous block's reduce-scatter input, held until this block's reduce-scatter
      (`reduce_scatter_max_input_buffers` = 1); under ZeRO-2 that block's gathered copy is freed meanwhile.
    gathered_top: the top-level parameters (FSDP's root) stay gathered from its pre-backward to its post-backward
      at the end of backward (ZeRO-3; ZeRO-2 counts them in `params`), and their unsharded gradients, made by the
      head's backward, wait there too.
    block_grad: at a block's post-backward (no activations of it left), its unsharded gradient and the reduce-
      scatter input it is copied into; under checkpointing this moment stays below the one in reduce_input.
    autocast_copy: autocast's bf16 copy of every weight, kept by autograd until its matmul's backward."""
    z = cfg.zero if dp > 1 else 0
    compute = BF16 if cfg.precision == "bf16" else FP32
    checkpointed = cfg.ac != "none"
    reduce_input = (FP32 - (compute if z == 2 else 0.0)) if z >= 2 and checkpointed else 0.0
    return {"gathered_block": compute if z == 3 else 0.0, "forward_end": compute if z == 2 else 0.0,
            "prefetch": compute if z == 3 else 0.0, "reduce_input": reduce_input,
            "gathered_top": (compute if z == 3 else 0.0) + (compute if z >= 2 else 0.0),
            "block_grad": 2 * FP32 if z >= 2 and not checkpointed else 0.0,
            "autocast_copy": BF16 if cfg.precision == "bf16" and z <= 1 else 0.0}


def activation_scale(cfg: MemoryConfig, traced_itemsize: int) -> float:
    """Activations are traced in the model's dtype; bf16 compute of an fp32 model halves them."""
    return BF16 / traced_itemsize if cfg.precision == "bf16" and traced_itemsize > BF16 else 1.0
