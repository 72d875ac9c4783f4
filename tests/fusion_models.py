"""Models of the fusion parity tests (tests/test_fusion_parity.py, run by tests/parity_worker.py with a `fuse` case
option): registry presets with the `vocab`/`seq` attributes the worker reads, and a tiny transformers Llama."""

from __future__ import annotations

import torch


def _preset(name: str, **overrides) -> torch.nn.Module:
    import dataclasses

    from autopar.models.registry import _MODEL_CLASS, PRESETS
    cfg = dataclasses.replace(PRESETS[name], **overrides)
    model = _MODEL_CLASS[type(cfg)](cfg)
    model.vocab, model.seq = cfg.vocab, cfg.seq
    return model


def gpt_tiny(**overrides) -> torch.nn.Module:
    return _preset("gpt-tiny", **overrides)


def llama_tiny(**overrides) -> torch.nn.Module:
    return _preset("llama-tiny", **overrides)


def hf_llama() -> torch.nn.Module:
    """A transformers Llama (autopar/models/hf.py), tiny."""
    from autopar.models.registry import build_model, parse_model_args
    args = "hidden_size=64,intermediate_size=128,num_hidden_layers=2,num_attention_heads=4,num_key_value_heads=2," \
           "vocab_size=128,max_position_embeddings=32"
    model, info = build_model("hf:llama", parse_model_args(args))
    model.vocab, model.seq = info.vocab, 16
    return model
