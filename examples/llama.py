"""A small Llama (RMSNorm, RoPE, grouped-query attention, SwiGLU) trained one step on random tokens.

    python examples/llama.py
"""

import math

import torch
from torch import nn

from autopar.models.llama import Llama, LlamaConfig


def tiny(layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, vocab: int = 128) -> nn.Module:
    """Factory for the `examples/llama.py:tiny` MODEL spec; keyword arguments come from --model-args."""
    cfg = LlamaConfig(
        layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, vocab=vocab, seq=32, intermediate=2 * hidden
    )
    return Llama(cfg)


def main() -> None:
    torch.manual_seed(0)
    model = tiny()
    cfg = model.config
    tokens = torch.randint(0, cfg.vocab, (4, cfg.seq))
    targets = torch.randint(0, cfg.vocab, (4, cfg.seq))
    loss = model(tokens, targets)
    loss.backward()
    print(f"llama: loss {loss.item():.4f} (ln vocab = {math.log(cfg.vocab):.4f} at init)")


if __name__ == "__main__":
    main()
