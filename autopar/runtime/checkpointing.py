"""Activation checkpointing of generated blocks with torch.utils.checkpoint (DESIGN decision 8).

Modes, per block (Korthikanti et al. 2022, arXiv 2205.05198, Sec. 5):
  none       autograd keeps every tensor the block's backward needs.
  selective  keep the outputs of the weight matmuls (the expensive recompute); recompute the attention core and the
             cheap elementwise ops (norms, activations, rotary, residual adds) in backward.
  full       keep only the block's inputs; rerun the whole block's forward in backward.
Collectives inside a recomputed region run again in backward, on every rank in the same order.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

AC_MODES = ("none", "selective", "full")

_aten = torch.ops.aten
# Outputs worth keeping under selective recompute: the weight matmuls (linear layers lower to mm/addmm below
# autograd, where the policy sees them). Attention's batched matmuls (bmm / SDPA) are the core that is recomputed.
KEEP_UNDER_SELECTIVE = frozenset({_aten.mm.default, _aten.addmm.default, _aten.linear.default})


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in KEEP_UNDER_SELECTIVE else CheckpointPolicy.PREFER_RECOMPUTE


class Checkpointed(nn.Module):
    """Runs `inner` under activation checkpointing; `inner` keeps its parameters (FSDP may shard this wrapper)."""

    def __init__(self, inner: nn.Module, mode: str):
        super().__init__()
        if mode not in ("selective", "full"):
            raise ValueError(f"checkpointing mode {mode!r} is not one of selective, full")
        self.inner, self.mode = inner, mode

    def forward(self, *args):
        if self.mode == "selective":
            context = functools.partial(create_selective_checkpoint_contexts, _selective_policy)
            return checkpoint(self.inner, *args, use_reentrant=False, context_fn=context)
        return checkpoint(self.inner, *args, use_reentrant=False)


def apply_checkpointing(program: nn.Module, modes: dict[str, str]) -> None:
    """Wrap each named block submodule of `program` whose mode is not "none" (in place)."""
    for name, mode in modes.items():
        if mode != "none":
            setattr(program, name, Checkpointed(getattr(program, name), mode))
