"""Reference models (GPT, Llama) and the MODEL-spec registry that builds them or a user's `file.py:factory`."""

from autopar.models.gpt import GPT, GPTConfig
from autopar.models.llama import Llama, LlamaConfig
from autopar.models.registry import PRESETS, ModelInfo, build_model, n_params, parse_model_args, sample_inputs

__all__ = [
    "GPT",
    "GPTConfig",
    "Llama",
    "LlamaConfig",
    "ModelInfo",
    "PRESETS",
    "build_model",
    "n_params",
    "parse_model_args",
    "sample_inputs",
]
