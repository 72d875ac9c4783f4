"""HF transformers causal language models built from a config alone: MODEL spec `hf:<model_type>`.

    autopar plan hf:gpt2 --model-args n_layer=2,n_embd=64,n_head=4,vocab_size=128,n_positions=64 --devices 4 ...

`transformers.AutoConfig.for_model(model_type, **model_args)` + `AutoModelForCausalLM.from_config(config)`: nothing
is downloaded. Training settings are forced where the user did not set them: no KV cache (it is inference state and
does not trace), dropout 0 (random masks would differ between ranks and the single-process reference), SDPA
attention (one `scaled_dot_product_attention` node per layer, which the planner shards by batch or heads).

The traced forward is `CausalLMLoss`: (input_ids, labels) -> mean cross-entropy over every position, labels
unshifted (the data pipeline gives next-token targets, as examples/train.py draws them). HF's own `labels=` loss
shifts and pads with ignore_index inside the model; keeping the loss outside makes the reference and the compiled
program compute exactly the same thing for any model type.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autopar.errors import ModelError

PREFIX = "hf:"
ATTENTION = "sdpa"
_INSTALL = "pip install 'autopar[hf]' (or pip install transformers)"


class CausalLMLoss(nn.Module):
    """A causal LM with its loss: forward(input_ids, labels) -> scalar mean token cross-entropy."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.lm(input_ids=input_ids).logits
        # float(): the loss in fp32 even for bf16 models, as HF's ForCausalLMLoss does
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def build_hf(spec: str, args: dict[str, Any], dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """(CausalLMLoss around the model, its HF config). Call under the registry's device/dtype context."""
    transformers = _import_transformers(spec)
    model_type = spec[len(PREFIX):]
    config = _config(transformers, spec, model_type, args)
    with _quiet(transformers):
        try:
            lm = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION, dtype=dtype)
        except ValueError as err:
            raise ModelError(_build_failure(spec, model_type, args, err)) from None
    return CausalLMLoss(lm), config


def _import_transformers(spec: str):
    try:
        import transformers
    except ImportError:
        raise ModelError(f"model {spec!r} needs the transformers package, which is not installed; {_INSTALL}") \
            from None
    return transformers


def _config(transformers, spec: str, model_type: str, args: dict[str, Any]):
    """AutoConfig.for_model with the user's keys checked (HF silently keeps unknown keys as attributes)."""
    if not model_type:
        raise ModelError(f"model {spec!r} names no model_type; write hf:<model_type>, e.g. hf:gpt2 or hf:llama")
    with _quiet(transformers):
        try:
            default = transformers.AutoConfig.for_model(model_type)
        except ValueError:
            raise ModelError(f"unknown HF model_type {model_type!r} in {spec!r}; use a transformers model_type "
                             "such as hf:gpt2, hf:llama, hf:mistral, hf:qwen2") from None
    fields = default.to_dict()
    settable = {k for k, v in fields.items() if not k.startswith("_") and (v is None or isinstance(v, (int, float)))}
    known = settable | set(getattr(default, "attribute_map", {}))
    unknown = sorted(set(args) - known)
    if unknown:
        raise ModelError(f"model {spec!r} has no config key {', '.join(unknown)}; valid --model-args keys: "
                         f"{', '.join(sorted(known))}")
    for key, value in args.items():
        _check_type(spec, key, value, getattr(default, key, None))
    forced = {key: 0.0 for key, value in fields.items() if _is_dropout(key, value) and key not in args}
    with _quiet(transformers):
        return transformers.AutoConfig.for_model(model_type, **{**forced, **args, "use_cache": False})


def _is_dropout(key: str, value: Any) -> bool:
    return isinstance(value, float) and ("dropout" in key or key.endswith("pdrop"))


def _check_type(spec: str, key: str, value: Any, default: Any) -> None:
    """Match the default's type: ints stay ints (positive), floats accept ints, bools only true/false."""
    if default is None:
        return
    if isinstance(default, bool) or isinstance(value, bool):
        ok, kind = isinstance(value, bool) and isinstance(default, bool), "true/false"
    elif isinstance(default, float):
        ok, kind = isinstance(value, (int, float)), "number"
    elif isinstance(default, int):
        ok, kind = isinstance(value, int) and value > 0, "positive integer"
    else:
        ok, kind = False, f"{type(default).__name__} (not settable from --model-args)"
    if not ok:
        raise ModelError(f"model {spec!r}: {key}={value!r} has the wrong type; give a {kind}")


def _build_failure(spec: str, model_type: str, args: dict[str, Any], err: ValueError) -> str:
    first = str(err).splitlines()[0].rstrip(".") if str(err) else type(err).__name__
    if "AutoModelForCausalLM" in str(err):
        return f"HF model_type {model_type!r} ({spec}) has no causal-LM head; use a decoder model such as hf:gpt2"
    return f"model {spec!r} with --model-args {args}: {first}; change those values"


def model_shape(config: Any) -> dict[str, int | None]:
    """The registry's shape fields read through HF's standard attribute names (attribute_map aliases them)."""
    names = {"seq": "max_position_embeddings", "vocab": "vocab_size", "layers": "num_hidden_layers",
             "hidden": "hidden_size", "heads": "num_attention_heads"}
    return {field: getattr(config, name, None) for field, name in names.items()}


@contextlib.contextmanager
def _quiet(transformers) -> Iterator[None]:
    """transformers logs config remarks (e.g. GPT-2's bos_token_id outside a small vocab) that are not errors."""
    logger = logging.getLogger("transformers")
    level = logger.level
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        logger.setLevel(level)
