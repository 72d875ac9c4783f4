"""HF transformers causal language models: MODEL spec `hf:<model_type>`, `hf:PATH` or `hf:ORG/NAME` (hf_source.py).

    autopar plan hf:gpt2 --model-args n_layer=2,n_embd=64,n_head=4,vocab_size=128,n_positions=64 --devices 4 ...
    autopar plan hf:./my-model --devices 8 ...     # a save_pretrained folder; its weights are loaded to train

`AutoConfig.for_model(model_type, **model_args)` (or `AutoConfig.from_pretrained(folder, **model_args)`) +
`AutoModelForCausalLM.from_config` (or `.from_pretrained(folder)` where there are weights, off the meta device):
nothing is downloaded. --model-args are checked against the config's keys, then transformers validates the values
(its strict config dataclasses); a refusal is one line naming the key. Training settings are forced where the user
did not set them: no KV cache (it is inference state and does not trace), dropout 0 (random masks would differ
between ranks and the single-process reference), SDPA attention (one `scaled_dot_product_attention` node per layer,
which the planner shards by batch or heads; `is_causal=True` without a mask tensor where every layer is plain
causal, models/hf_attention.py, so that context parallelism can run it as a ring), or the eager implementation for
architectures transformers does not run through SDPA (soft-capped or alibi attention: gemma2, bloom), which the
model's notes say.

The traced forward is `CausalLMLoss`: (input_ids, labels) -> mean cross-entropy over every position, labels
unshifted (the data pipeline gives next-token targets, as examples/train.py draws them). HF's own `labels=` loss
shifts and pads with ignore_index inside the model; keeping the loss outside makes the reference and the compiled
program compute exactly the same thing for any model type.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autopar.errors import ModelError
from autopar.models.hf_attention import use_causal_sdpa
from autopar.models.hf_source import PREFIX, Source, resolve
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


def build_hf(spec: str, args: dict[str, Any], dtype: torch.dtype,
             device: str | torch.device = "cpu") -> tuple[nn.Module, Any, tuple[str, ...]]:
    """(CausalLMLoss around the model, its HF config, notes for the plan). Call under the registry's device/dtype
    context; weights are read only off the meta device (planning needs shapes alone)."""
    transformers = _import_transformers(spec)
    source = resolve(spec)
    config = _config(transformers, source, args)
    load = source.weights and torch.device(device).type != "meta"
    notes = [f"{spec}: starts from the weights in {source.folder}" if source.weights else ""]
    with _quiet(transformers):
        try:
            try:
                lm = _construct(transformers, source, config, dtype, ATTENTION, load)
                use_causal_sdpa(transformers, lm)  # SDPA is_causal=True without a mask tensor, also when traced
            except ValueError as err:
                if "scaled_dot_product_attention" not in str(err):
                    raise
                lm = _construct(transformers, source, config, dtype, "eager", load)
                notes.append(f"{spec}: transformers runs {type(lm).__name__} without SDPA; using its eager "
                             "attention (scores, softmax and the value matmul as separate ops)")
        except Exception as err:  # noqa: BLE001 - third-party construction code: nn.Embedding's padding_idx
            raise ModelError(_build_failure(spec, args, err)) from None  # assertion, a config a class misreads
    return CausalLMLoss(lm), config, tuple(n for n in notes if n)


def _construct(transformers, source: Source, config, dtype: torch.dtype, attention: str, load: bool) -> nn.Module:
    auto = transformers.AutoModelForCausalLM
    if load:
        return auto.from_pretrained(source.folder, config=config, attn_implementation=attention, dtype=dtype,
                                    local_files_only=True)
    return auto.from_config(config, attn_implementation=attention, dtype=dtype)


def _import_transformers(spec: str):
    try:
        import transformers
    except ImportError:
        raise ModelError(f"model {spec!r} needs the transformers package, which is not installed; {_INSTALL}") \
            from None
    return transformers


def _config(transformers, source: Source, args: dict[str, Any]):
    """The config with the user's keys checked (HF silently keeps unknown keys as attributes), validated by
    transformers, and a pad token inside the vocabulary."""
    from huggingface_hub.errors import StrictDataclassError  # transformers' dependency

    spec = source.spec
    default = _load_config(transformers, source, {})
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
    try:
        config = _load_config(transformers, source, {**forced, **args, "use_cache": False})
    except (ValueError, StrictDataclassError) as err:  # transformers' own validation of the values
        raise ModelError(f"model {spec!r} with --model-args {_fmt(args)}: {_last_line(err)}; change those "
                         "values") from None
    pad, vocab = getattr(config, "pad_token_id", None), getattr(config, "vocab_size", None)
    if isinstance(pad, int) and isinstance(vocab, int) and not 0 <= pad < vocab:
        raise ModelError(f"model {spec!r}: pad_token_id={pad} is outside the vocabulary (vocab_size={vocab}); add "
                         f"pad_token_id=0 (or another id below {vocab}) to --model-args")
    return config


def _load_config(transformers, source: Source, kwargs: dict[str, Any]):
    with _quiet(transformers):
        if source.folder is not None:
            try:
                return transformers.AutoConfig.from_pretrained(source.folder, local_files_only=True, **kwargs)
            except (OSError, KeyError) as err:  # unreadable JSON, or a model_type this transformers lacks
                raise ModelError(f"model folder {source.folder} ({source.spec}): config.json cannot be read by "
                                 f"transformers {transformers.__version__} ({_last_line(err)}); fix the file or "
                                 "upgrade transformers") from None
        try:
            return transformers.AutoConfig.for_model(source.model_type, **kwargs)
        except ValueError:
            if kwargs:
                raise
            raise ModelError(f"unknown HF model_type {source.model_type!r} in {source.spec!r}; use a transformers "
                             "model_type such as hf:gpt2, hf:llama, hf:mistral, hf:qwen2, a folder (hf:PATH) or "
                             "a cached repository (hf:ORG/NAME)") from None


def _last_line(err: BaseException) -> str:
    """transformers' validators put the reason on the last line ('ValueError: The hidden size (30) is not ...')."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    return re.sub(r"^\w+Error: ", "", lines[-1]).rstrip(".")


def _fmt(args: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in args.items())


def _is_dropout(key: str, value: Any) -> bool:
    return isinstance(value, float) and ("dropout" in key or key.endswith("pdrop"))


def _check_type(spec: str, key: str, value: Any, default: Any) -> None:
    """Match the default's type: ints stay ints (>= 0: token ids may be 0), floats accept ints, bools only
    true/false; the values' meaning is transformers' to validate."""
    if default is None:
        return
    if isinstance(default, bool) or isinstance(value, bool):
        ok, kind = isinstance(value, bool) and isinstance(default, bool), "true/false"
    elif isinstance(default, float):
        ok, kind = isinstance(value, (int, float)), "number"
    elif isinstance(default, int):  # token ids may be 0; transformers validates the rest
        ok, kind = isinstance(value, int) and value >= 0, "non-negative integer"
    else:
        ok, kind = False, f"{type(default).__name__} (not settable from --model-args)"
    if not ok:
        raise ModelError(f"model {spec!r}: {key}={value!r} has the wrong type; give a {kind}")


def _build_failure(spec: str, args: dict[str, Any], err: Exception) -> str:
    first = str(err).splitlines()[0].rstrip(".") if str(err) else type(err).__name__
    if "AutoModelForCausalLM" in str(err):
        return f"HF model {spec} has no causal-LM head; use a decoder-only model such as hf:gpt2"
    if not isinstance(err, (ValueError, AssertionError)):  # not a value transformers refused: its code failed
        return (f"transformers cannot build {spec} with --model-args {_fmt(args) or '(none)'} ({type(err).__name__}: "
                f"{first}); this model type does not work with this transformers version here, try another")
    return f"model {spec!r} with --model-args {_fmt(args) or '(none)'}: {first}; change those values"


def model_shape(config: Any) -> dict[str, int | None]:
    """The registry's shape fields read through HF's standard attribute names (attribute_map aliases them)."""
    names = {"seq": "max_position_embeddings", "vocab": "vocab_size", "layers": "num_hidden_layers",
             "hidden": "hidden_size", "heads": "num_attention_heads"}
    return {field: getattr(config, name, None) for field, name in names.items()}


@contextlib.contextmanager
def _quiet(transformers) -> Iterator[None]:
    """transformers logs config remarks (e.g. GPT-2's bos_token_id outside a small vocab) that are not errors, and
    draws progress bars while loading weights."""
    logger = logging.getLogger("transformers")
    level, bars = logger.level, transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars would break the one-line output
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            transformers.utils.logging.enable_progress_bar()
