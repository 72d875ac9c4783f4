"""Turn a MODEL spec (preset name, family name, or `file.py:factory`) into an nn.Module plus what the planner needs.

Built-ins are constructed under `torch.device(device)`, so `device="meta"` allocates nothing: a 175B GPT-3 is
shapes only and builds in well under a second.
"""

import contextlib
import dataclasses
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autopar.errors import ModelError
from autopar.models import hf
from autopar.models.gpt import GPT, GPTConfig
from autopar.models.llama import Llama, LlamaConfig

PRESETS: dict[str, GPTConfig | LlamaConfig] = {
    # Families: tiny defaults, meant to be reshaped with --model-args.
    "gpt": GPTConfig(layers=2, hidden=64, heads=4, vocab=128, seq=32),
    "llama": LlamaConfig(layers=2, hidden=64, heads=4, kv_heads=2, vocab=128, seq=32, intermediate=128),
    # Test-sized models: build, trace and run on CPU in milliseconds.
    "gpt-tiny": GPTConfig(layers=2, hidden=64, heads=4, vocab=128, seq=32),
    "llama-tiny": LlamaConfig(layers=2, hidden=64, heads=4, kv_heads=2, vocab=128, seq=32, intermediate=128),
    # GPT-3 XL and GPT-3 175B: Brown et al. 2020, "Language Models are Few-Shot Learners", Table 2.1 (n_layers,
    # d_model, n_ctx=2048). The table lists 24 heads of d_head 128 for XL, which does not multiply to d_model=2048;
    # we keep d_head=128, i.e. 16 heads (as Megatron-LM's GPT-3 1.3B configs do). GPT-3 uses the GPT-2 BPE (50257
    # tokens); 1.3B pads it to 50304 (multiple of 64, nanoGPT), 175B to 51200 (Megatron-LM's padding for TP=8).
    "gpt3-1.3b": GPTConfig(layers=24, hidden=2048, heads=16, vocab=50304, seq=2048),
    "gpt3-175b": GPTConfig(layers=96, hidden=12288, heads=96, vocab=51200, seq=2048),
    # Llama 3: Dubey et al. 2024, "The Llama 3 Herd of Models", Table 3 (layers, model dim, FFN dim, heads, 8 KV
    # heads, vocab 128000+256 = 128256, RoPE theta 500000), and the meta-llama/Meta-Llama-3-8B/70B config.json
    # (intermediate_size 14336 / 28672, max_position_embeddings 8192, rms_norm_eps 1e-5, untied embeddings).
    "llama3-8b": LlamaConfig(
        layers=32, hidden=4096, heads=32, kv_heads=8, vocab=128256, seq=8192, intermediate=14336
    ),
    "llama3-70b": LlamaConfig(
        layers=80, hidden=8192, heads=64, kv_heads=8, vocab=128256, seq=8192, intermediate=28672
    ),
}

FAMILIES = ("gpt", "llama")  # shaped by --model-args; their positions follow --seq

_MODEL_CLASS: dict[type, type[nn.Module]] = {GPTConfig: GPT, LlamaConfig: Llama}

_ARGS_GRAMMAR = "key=value[,key=value...] with int, float or true/false values, e.g. layers=24,hidden=2304"


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    name: str  # the spec the model was built from (preset name or file.py:factory)
    seq: int | None  # max sequence length; None when a user factory does not say
    vocab: int | None  # vocabulary size; None when a user factory does not say
    layers: int | None  # transformer blocks; None when unknown
    hidden: int | None  # model width; None when unknown
    heads: int | None  # attention heads; None when unknown
    config: Any | None  # the config dataclass (GPTConfig / LlamaConfig / a factory model's .config) or None
    notes: tuple[str, ...] = ()  # what a user should know about how it was built (weights loaded, eager attention)


def parse_model_args(text: str) -> dict[str, int | float | bool]:
    """'layers=24,hidden=2304,use_x=true' -> {'layers': 24, 'hidden': 2304, 'use_x': True}; '' -> {}."""
    args: dict[str, int | float | bool] = {}
    if not text.strip():
        return args
    for item in (part.strip() for part in text.split(",")):
        key, sep, raw = (s.strip() for s in item.partition("="))
        value = _parse_value(raw)
        if not sep or not key.isidentifier() or value is None:
            raise ModelError(f"--model-args item {item!r} is malformed; expected {_ARGS_GRAMMAR}")
        args[key] = value
    return args


def _parse_value(raw: str) -> int | float | bool | None:
    for convert in (int, float):
        try:
            return convert(raw)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(raw.lower())


def build_model(
    spec: str,
    model_args: dict[str, Any] | None = None,
    *,
    seq: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, ModelInfo]:
    """Build a preset/family model, an HF causal LM (`hf:<model_type>`, see hf.py) or call
    `path/to/file.py:factory(**model_args)` on `device` in `dtype`. A family (gpt, llama) gets `seq` positions
    (the run's sequence length) unless `seq` is in model_args."""
    if not dtype.is_floating_point:
        raise ModelError(f"model dtype {dtype} is not a floating-point type; use float32, bfloat16 or float16")
    args = dict(model_args or {})
    if spec in PRESETS:
        base = dataclasses.replace(PRESETS[spec], seq=seq) if seq and spec in FAMILIES else PRESETS[spec]
        config = _override(spec, base, args)
        with _building(device, dtype):
            model = _MODEL_CLASS[type(config)](config)
    elif spec.startswith(hf.PREFIX):
        with _building(device, dtype):
            model, config, notes = hf.build_hf(spec, args, dtype, device)
        return model, ModelInfo(name=spec, config=config, notes=notes, **hf.model_shape(config))
    elif ".py:" in spec:
        with _building(device, dtype):
            model = _call_factory(spec, args)
    else:
        names = ", ".join(PRESETS)
        raise ModelError(f"unknown model {spec!r}; use one of {names}, hf:<model_type>, hf:PATH, hf:ORG/NAME or "
                         "path/to/file.py:factory")
    return model, _info(spec, model)


@contextlib.contextmanager
def _building(device: str | torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Allocate new tensors on `device` in `dtype` (default dtype is process-global, so restore it after)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _override(name: str, base: GPTConfig | LlamaConfig, args: dict[str, Any]) -> GPTConfig | LlamaConfig:
    fields = {f.name: f for f in dataclasses.fields(base)}
    unknown = sorted(set(args) - set(fields))
    if unknown:
        raise ModelError(
            f"model {name!r} has no field {', '.join(unknown)}; valid --model-args keys: {', '.join(fields)}"
        )
    coerced = {key: _coerce(name, key, value, getattr(base, key)) for key, value in args.items()}
    try:
        return dataclasses.replace(base, **coerced)
    except ValueError as err:
        raise ModelError(f"model {name!r} with --model-args {args}: {err}; change those values") from err


def _coerce(name: str, key: str, value: Any, default: Any) -> Any:
    """Match the preset field's type: ints stay ints, floats accept ints, bools only true/false."""
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, float):
        ok, value = isinstance(value, (int, float)), float(value)
    else:  # int fields (including kv_heads, whose default may be None)
        ok = isinstance(value, int) and value > 0
    if not ok:
        raise ModelError(f"model {name!r}: {key}={value!r} has the wrong type; give a {_kind(default)}")
    return value


def _kind(default: Any) -> str:
    if isinstance(default, bool):
        return "true/false"
    return "number" if isinstance(default, float) else "positive integer"


def _call_factory(spec: str, args: dict[str, Any]) -> nn.Module:
    path_text, _, factory_name = spec.rpartition(":")
    path = Path(path_text)
    if not path.is_file():
        raise ModelError(f"model file {path} (from {spec!r}) does not exist; check the path")
    module_spec = importlib.util.spec_from_file_location(f"autopar_user_model_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        raise ModelError(f"importing {path} failed: {type(err).__name__}: {err}; fix the file") from err
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ModelError(f"{path} has no function {factory_name!r}; define it or name another after the ':'")
    try:
        model = factory(**args)
    except Exception as err:
        cause = f"{type(err).__name__}: {err}"
        raise ModelError(f"{spec}(**{args}) raised {cause}; fix the factory or --model-args") from err
    if not isinstance(model, nn.Module):
        raise ModelError(f"{spec} returned {type(model).__name__}, not an nn.Module; return the model instance")
    return model


def _info(spec: str, model: nn.Module) -> ModelInfo:
    """Read shapes from the model's `config` attribute if it has one (the built-ins and most HF-style models do)."""
    config = getattr(model, "config", None)
    shape = {field: getattr(config, field, None) for field in ("seq", "vocab", "layers", "hidden", "heads")}
    return ModelInfo(name=spec, config=config, **shape)


def sample_inputs(
    info: ModelInfo, batch: int, seq: int, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random int64 (tokens, targets), each [batch, seq] in [0, vocab); uninitialized on meta."""
    if info.vocab is None:
        raise ModelError(f"model {info.name} does not say its vocab size; give it a .config with vocab and seq fields")
    if info.seq is not None and seq > info.seq:
        raise ModelError(
            f"seq={seq} exceeds model {info.name}'s max positions {info.seq}; lower --seq or build it with seq={seq}"
        )
    if torch.device(device).type == "meta":
        return tuple(torch.empty(batch, seq, dtype=torch.int64, device="meta") for _ in range(2))
    tokens = torch.randint(0, info.vocab, (batch, seq), dtype=torch.int64, device=device)
    targets = torch.randint(0, info.vocab, (batch, seq), dtype=torch.int64, device=device)
    return tokens, targets


def n_params(model: nn.Module) -> int:
    """Distinct parameter elements (tied weights counted once); works on meta models."""
    return sum(p.numel() for p in model.parameters())
