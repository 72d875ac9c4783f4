"""A small GPT you can train one step on random tokens, and a MODEL factory for autopar.

    python examples/gpt.py
    autopar plan examples/gpt.py:tiny --model-args layers=4,hidden=128
"""

import math

import torch
from torch import nn

from autopar.models.gpt import GPT, GPTConfig


def tiny(layers: int = 2, hidden: int = 64, heads: int = 4, vocab: int = 128, seq: int = 32) -> nn.Module:
    """Factory for the `examples/gpt.py:tiny` MODEL spec; keyword arguments come from --model-args."""
    return GPT(GPTConfig(layers=layers, hidden=hidden, heads=heads, vocab=vocab, seq=seq))


def main() -> None:
    torch.manual_seed(0)
    model = tiny()
    cfg = model.config
    tokens = torch.randint(0, cfg.vocab, (4, cfg.seq))
    targets = torch.randint(0, cfg.vocab, (4, cfg.seq))
    loss = model(tokens, targets)
    loss.backward()
    print(f"gpt: loss {loss.item():.4f} (ln vocab = {math.log(cfg.vocab):.4f} at init)")


if __name__ == "__main__":
    main()
