"""Fused Triton kernels as torch custom ops (`torch.ops.autopar.*`), one file per fused chain:
bias_gelu, swiglu, add_norm (residual add + LayerNorm/RMSNorm), rotary, linear_cross_entropy (head matmul +
vocab-parallel cross-entropy, chunked over tokens).

Importing this package imports nothing heavy; `autopar.kernels.ops` registers every op (and imports triton where
it is installed). The planner reads only `ce_chunk_rows` from here, so `autopar plan` never imports triton.
"""

from __future__ import annotations

import math


def ce_chunk_rows(tokens: int, vocab_local: int, hidden: int) -> int:
    """Tokens per chunk of the fused head + cross-entropy: a chunk's fp32 logits hold about as many numbers as the
    head's input [tokens x hidden] (the chunking Liger-Kernel's fused linear cross-entropy uses), so the loss never
    holds more than one input-sized block of logits."""
    return max(1, min(tokens, math.ceil(tokens / max(1, math.ceil(vocab_local / max(hidden, 1))))))
