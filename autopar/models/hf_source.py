"""Where an `hf:` model comes from: a model_type (its config's defaults), a local folder, or the local HF cache.

    hf:llama                 transformers' LlamaConfig defaults, reshaped by --model-args
    hf:./my-model            a folder written by `save_pretrained` (config.json, with or without *.safetensors)
    hf:meta-llama/Llama-3-8B that repository's snapshot in the local HF cache ($HF_HUB_CACHE); never the network

A folder or cached snapshot with safetensors weights trains from them; without, from the seed's initialization.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from autopar.errors import ModelError

PREFIX = "hf:"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # ORG/NAME as the Hub spells repository ids


@dataclass(frozen=True)
class Source:
    spec: str  # as the user wrote it, e.g. "hf:./tiny"
    model_type: str | None  # for hf:<model_type>; None for a folder
    folder: Path | None  # the folder holding config.json (a cached snapshot for ORG/NAME)
    weights: bool  # the folder has safetensors weights: the model starts from them


def resolve(spec: str) -> Source:
    """Decide what `spec` names, touching only the local disk."""
    rest = spec[len(PREFIX):]
    if not rest:
        raise ModelError(f"model {spec!r} names nothing; write hf:<model_type> (hf:llama), hf:PATH (a folder with "
                         "config.json) or hf:ORG/NAME (in the local HF cache)")
    path = Path(rest).expanduser()
    if path.is_dir():
        return _folder(spec, path)
    if _REPO_ID.match(rest) and not path.exists():
        return _folder(spec, _cached(spec, rest))
    if "/" in rest or rest.startswith(("~", ".")):
        raise ModelError(f"model folder {path} (from {spec!r}) does not exist; give a folder with config.json "
                         "(as `save_pretrained` writes it)")
    return Source(spec, rest, None, False)


def _folder(spec: str, path: Path) -> Source:
    if not (path / "config.json").is_file():
        raise ModelError(f"model folder {path} (from {spec!r}) has no config.json; give a folder written by "
                         "`save_pretrained` (config.json, optionally *.safetensors weights)")
    return Source(spec, None, path, any(path.glob("*.safetensors")))


def _cached(spec: str, repo_id: str) -> Path:
    """The snapshot folder of `repo_id` in the local HF cache; autopar never downloads (HF_HUB_OFFLINE's rule)."""
    from huggingface_hub import constants, try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(found, str):
        raise ModelError(f"model {spec!r}: {repo_id} is not in the local HF cache ({constants.HF_HUB_CACHE}) and "
                         f"autopar does not download; run `hf download {repo_id}` first, or give hf:PATH to a "
                         "local folder")
    return Path(found).parent
