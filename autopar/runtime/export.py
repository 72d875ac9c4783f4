"""Export: the trained parameters as one single-device state dict, leaving autopar behind.

`compiled.export(dir)` gathers every parameter (from every shard and pipeline stage) and rank 0 writes
`dir/model.safetensors` under the model's own names. Given the module that was compiled, a transformers model
(or autopar's hf: wrapper around one) is written with its own `save_pretrained`, so
`AutoModelForCausalLM.from_pretrained(dir)` loads it: config.json and safetensors, tied weights as HF ties them.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


def export(compiled, directory: str | Path, model: nn.Module | None = None) -> Path:
    """Every rank calls it (the gather is collective); rank 0 writes. Returns the folder."""
    directory = Path(directory)
    full = compiled.full_state(grads=False)
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in full.items()}
        hf = _transformers_model(model)
        if hf is not None:
            model.load_state_dict(state, strict=True)
            hf.save_pretrained(directory, safe_serialization=True)
        else:
            from safetensors.torch import save_file

            save_file(_untie(state), str(directory / "model.safetensors"), metadata={"format": "pt"})
    dist.barrier()
    return directory


def _transformers_model(model: nn.Module | None) -> nn.Module | None:
    """The transformers PreTrainedModel that is `model` or its direct child (autopar's hf: wrapper holds it as
    `.lm`), or None."""
    if model is None or hasattr(model, "save_pretrained"):
        return model
    return next((c for c in model.children() if hasattr(c, "save_pretrained")), None)


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses two names on one storage: give each name its own copy."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out
