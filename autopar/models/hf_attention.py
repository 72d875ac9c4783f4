"""HF models' causal attention as one `scaled_dot_product_attention(..., is_causal=True)` without a mask tensor.

Eagerly, transformers already runs a purely causal model that way: `masking_utils.sdpa_mask` returns no mask and
SDPA gets `is_causal=True` when nothing but causality is masked. Under `torch.export` (autopar's capture) it never
does: it materialises a [batch, 1, seq, seq] boolean mask from `arange` comparisons, and adds a packed-sequence
mask computed from the position ids, because an exported graph may be replayed at other shapes (decoding). The
traced training program then holds a sequence x sequence mask, which context parallelism cannot shard (it refuses
attention with a mask) and every other plan stores for nothing.

An attention implementation registered with transformers' `AttentionInterface` but absent from its mask registry
gets no mask at all (`masking_utils._preprocess_mask_arguments` exits early for it), and transformers' own
`sdpa_attention_forward` then passes `is_causal=True` (and `enable_gqa` for grouped K/V heads). That is exactly the
eager computation, but only for models whose every layer is plain causal attention: sliding-window, chunked,
hybrid (`layer_types`) or bidirectional models keep transformers' "sdpa" and its masks (context parallelism then
refuses them, naming the mask). autopar's CausalLMLoss passes neither padding nor a cache, so no mask is lost.
"""

from __future__ import annotations

from typing import Any

from torch import nn

CAUSAL_SDPA = "autopar_causal_sdpa"


def plain_causal(config: Any) -> bool:
    """Whether every attention layer of the (text) config is full causal attention: nothing masks but causality."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "is_encoder_decoder", False) or getattr(text, "use_bidirectional_attention", False):
        return False
    if any(getattr(text, key, None) is not None for key in ("sliding_window", "attention_chunk_size")):
        return False
    layer_types = getattr(text, "layer_types", None)
    return not layer_types or all(kind == "full_attention" for kind in layer_types)


def use_causal_sdpa(transformers, lm: nn.Module) -> bool:
    """Switch an SDPA model whose attention is plain causal to the maskless implementation (module docstring);
    True if it was switched."""
    if getattr(lm.config, "_attn_implementation", None) != "sdpa" or not plain_causal(lm.config):
        return False
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    transformers.AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)  # not in the mask registry
    lm.set_attn_implementation(CAUSAL_SDPA)
    return True
