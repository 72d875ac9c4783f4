"""Tiny models at sequence 64 for the context-parallel parity tests (tests/parity_worker.py factories)."""

from __future__ import annotations

import torch

from autopar.models import build_model


def tiny(name: str, seq: int = 64) -> torch.nn.Module:
    model, info = build_model(name, {"seq": seq}, seq=seq, device="cpu", dtype=torch.float32)
    model.vocab, model.seq = info.config.vocab, seq
    return model


def eager_gpt() -> torch.nn.Module:
    """gpt-tiny with attention as softmax(QK^T) under a torch.ones(s, s).triu() mask: context parallelism must
    refuse it."""
    from autopar.models.gpt import GPT, GPTConfig

    return GPT(GPTConfig(layers=2, hidden=64, heads=4, vocab=128, seq=64, attention="eager"))
