"""Tiny models for the parity tests that run on tests/parity_worker.py (its `factory` entries): registry presets
with the `vocab` and `seq` attributes the worker reads, a gpt whose attention context parallelism must refuse, and a
tiny transformers Llama."""

from __future__ import annotations

import torch

from autopar.models import build_model


def preset(name: str, **overrides) -> torch.nn.Module:
    """A registry preset (gpt-tiny, llama-tiny, ...) with config overrides (seq=64, vocab=...)."""
    model, info = build_model(name, overrides, seq=overrides.get("seq"), device="cpu", dtype=torch.float32)
    model.vocab, model.seq = info.config.vocab, info.config.seq
    return model


def gpt_tiny(**overrides) -> torch.nn.Module:
    return preset("gpt-tiny", **overrides)


def llama_tiny(**overrides) -> torch.nn.Module:
    return preset("llama-tiny", **overrides)


def tiny(name: str, seq: int = 64) -> torch.nn.Module:
    """A preset at sequence 64 (context parallelism cuts it into 2 x cp chunks)."""
    return preset(name, seq=seq)


def eager_gpt() -> torch.nn.Module:
    """gpt-tiny with attention as softmax(QK^T) under a torch.ones(s, s).triu() mask: context parallelism must
    refuse it."""
    from autopar.models.gpt import GPT, GPTConfig

    return GPT(GPTConfig(layers=2, hidden=64, heads=4, vocab=128, seq=64, attention="eager"))


def hf_llama() -> torch.nn.Module:
    """A transformers Llama (autopar/models/hf.py), tiny."""
    from autopar.models.registry import parse_model_args

    args = "hidden_size=64,intermediate_size=128,num_hidden_layers=2,num_attention_heads=4,num_key_value_heads=2," \
           "vocab_size=128,max_position_embeddings=32"
    model, info = build_model("hf:llama", parse_model_args(args))
    model.vocab, model.seq = info.vocab, 16
    return model


def hf_llama_local_positions() -> torch.nn.Module:
    """hf_llama, with context parallelism made wrong on purpose in this process: every cp rank takes its local
    offsets 0..seq/cp-1 for its tokens' positions (rotary angles) instead of its chunks' true positions, as a cp
    implementation that forgot the load-balanced layout would. It trains silently wrong; verify=True must refuse it.
    The patch stays for the rest of the process: run it last in a launch."""
    from autopar.codegen import context

    def local_positions(local: torch.Tensor, seq: int, cp: int, rank: int) -> torch.Tensor:
        return local

    context.true_positions = local_positions
    return hf_llama()


def hf_tiny(model_type: str) -> torch.nn.Module:
    """A transformers model type built tiny as tests/test_hf_models.py builds it (sequence 8)."""
    from tests.test_hf_models import model_args

    model, info = build_model(f"hf:{model_type}", model_args(model_type))
    model.vocab, model.seq = info.vocab, 8
    return model


def gpt_without_layers_argument() -> torch.nn.Module:
    """A four-block GPT from a factory that takes no arguments, although its config states its layers."""
    from autopar.models.gpt import GPT, GPTConfig

    return GPT(GPTConfig(layers=4, hidden=64, heads=4, vocab=128, seq=64))
