"""Fused Triton kernels as torch custom ops (`torch.ops.autopar.*`), one file per fused chain:
bias_gelu, swiglu, add_norm (residual add + LayerNorm/RMSNorm), rotary, linear_cross_entropy (head matmul +
vocab-parallel cross-entropy, chunked over tokens).

Importing this package imports nothing heavy; `autopar.kernels.ops` registers every op (and imports triton where
it is installed); `autopar plan` never imports it, so never triton.
"""

from __future__ import annotations


def ce_chunk_rows(tokens: int, vocab_local: int, hidden: int) -> int:
    """Tokens per chunk of the fused head + cross-entropy: a chunk's logits hold about as many numbers as the head's
    input [tokens x hidden] (the chunking Liger-Kernel's fused linear cross-entropy uses), so the loss never holds
    more than one input-sized block of logits; at least 2^20 numbers, so small models do not pay a launch and
    two all-reduces per handful of tokens."""
    numbers = max(tokens * hidden, 1 << 20)
    return max(1, min(tokens, numbers // max(vocab_local, 1)))
