"""The small languages of `autopar plan`: `--fix "tp=8,mbs=4"`, `--mesh dp=2,tp=4` and `--memory 80GiB`.

Every value is checked here, before any tracing, so a typo costs the user a second, not a planning run. Keys
that name a capability the planner does not have yet are accepted at their neutral value (pp=1, zero=0, ...),
which is what the planner does today, and refused with `NotSupportedYet` otherwise.
"""

from __future__ import annotations

import math
import re
from typing import Callable

from autopar.runtime.checkpointing import AC_MODES
from autopar.errors import AutoparError, MeshError, NotSupportedYet
from autopar.runtime.zero import PRECISIONS, ZERO_STAGES

MESH_AXES = ("dp", "tp", "pp", "cp")
PLANNER_KEYS = ("pp", "dp", "tp", "cp", "mbs", "zero", "ac", "precision", "schedule", "v", "fuse")  # what make_plan(fix=...) understands today
SCHEDULES = ("gpipe", "1f1b", "interleaved", "zero-bubble")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50}
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)(?:e(\d+))?\s*([a-z]*)\s*$", re.IGNORECASE)


class _Bad(ValueError):
    """A value outside its key's domain; the message lists what is allowed."""


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise _Bad("a positive integer")
    return int(text)


def _one_of(choices: tuple) -> Callable[[str], object]:
    def parse(text: str) -> object:
        for choice in choices:
            if text.lower() == str(choice):
                return choice
        raise _Bad("one of " + ", ".join(map(str, choices)))
    return parse


def _on_off(text: str) -> bool:
    choice = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}.get(text.lower())
    if choice is None:
        raise _Bad("on or off")
    return choice


# key -> (parser, what the key means); the order is the order the help and errors list them in
FIX_KEYS: dict[str, tuple[Callable[[str], object], str]] = {
    "dp": (_positive_int, "data-parallel degree"),
    "tp": (_positive_int, "tensor-parallel degree"),
    "pp": (_positive_int, "pipeline-parallel degree"),
    "cp": (_positive_int, "context-parallel degree"),
    "zero": (_one_of(ZERO_STAGES), "ZeRO stage"),
    "ac": (_one_of(AC_MODES), "activation checkpointing"),
    "precision": (_one_of(PRECISIONS), "training precision (bf16: bf16 compute, fp32 master weights)"),
    "mbs": (_positive_int, "micro-batch size: samples per micro-batch per data-parallel replica (Megatron's "
                             "--micro-batch-size, DeepSpeed's train_micro_batch_size_per_gpu)"),
    "schedule": (_one_of(SCHEDULES), "pipeline schedule"),
    "v": (_positive_int, "virtual pipeline stages per device"),
    "fuse": (_on_off, "fused Triton kernels (on/off)"),
}

# key -> (is the value supported today?, the capability, what to write instead); checked once the value is legal
_NOT_YET: dict[str, tuple[Callable[[object], bool], str, str]] = {}


def _items(flag: str, text: str, allowed: tuple[str, ...]) -> dict[str, str]:
    """'a=1, b=2' -> {'a': '1', 'b': '2'}, refusing empty items, unknown keys and repeats."""
    out: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not key or not value:
            raise AutoparError(f"{flag} item {item!r} is malformed; write key=value[,key=value...], e.g. "
                            f"{flag} {allowed[0]}=2,{allowed[1]}=4")
        key = key.lower()
        if key not in allowed:
            raise AutoparError(f"{flag} has no key {key!r}; valid keys: {', '.join(allowed)}")
        if key in out:
            raise AutoparError(f"{flag} gives {key} twice ({key}={out[key]} and {key}={value}); give it once")
        out[key] = value
    return out


def _typed(flag: str, raw: dict[str, str]) -> dict[str, object]:
    fix: dict[str, object] = {}
    for key, value in raw.items():
        parse, meaning = FIX_KEYS[key]
        try:
            fix[key] = parse(value)
        except _Bad as bad:
            raise AutoparError(f"{flag} {key}={value}: {key} ({meaning}) must be {bad}") from None
        supported, capability, instead = _NOT_YET.get(key, (lambda v: True, "", ""))
        if not supported(fix[key]):
            raise NotSupportedYet(f"{flag} {key}={value}: {capability} is not supported yet; {instead}")
    return fix


def parse_fix(text: str) -> dict[str, object]:
    """'dp=2,tp=4,mbs=8,zero=0' -> {'dp': 2, 'tp': 4, 'mbs': 8, 'zero': 0}; '' -> {}. Raises AutoparError."""
    if not text.strip():
        return {}
    return _typed("--fix", _items("--fix", text, tuple(FIX_KEYS)))


def parse_mesh(text: str) -> dict[str, int]:
    """'dp=2,tp=4' -> {'dp': 2, 'tp': 4}. A mesh is a whole shape, so axes left out have degree 1."""
    if not text.strip():
        raise MeshError("--mesh is empty; give the axis degrees, e.g. --mesh dp=2,tp=4")
    degrees = _typed("--mesh", _items("--mesh", text, MESH_AXES))
    return {axis: int(degrees.get(axis, 1)) for axis in MESH_AXES}


def merge_mesh(mesh: dict[str, int], fix: dict[str, object], devices: int | None) -> tuple[dict[str, object], int]:
    """Fold `--mesh` into the pins and settle the device count: (fix with the mesh's degrees, devices)."""
    size = math.prod(mesh.values())
    if devices is not None and size != devices:
        shape = ",".join(f"{a}={d}" for a, d in mesh.items() if d > 1) or "dp=1"
        raise MeshError(f"--mesh {shape} multiplies to {size} devices but --devices is {devices}; make the "
                        "degrees multiply to --devices, or leave --devices out")
    for axis, degree in mesh.items():
        if axis in fix and fix[axis] != degree:
            raise MeshError(f"--mesh {axis}={degree} and --fix {axis}={fix[axis]} disagree; give the degree once")
    return {**fix, **mesh}, size


def planner_fix(fix: dict[str, object]) -> dict[str, object]:
    """The pins make_plan acts on; the other keys were checked to be at today's behaviour by `_typed`."""
    return {key: fix[key] for key in PLANNER_KEYS if key in fix}


def parse_memory(text: str) -> int:
    """'80GiB', '80GB', '1.5TiB', '512MiB', '1e9', '4096' -> bytes (decimal units are powers of 10, *iB of 2)."""
    match = _MEMORY.match(text)
    unit = match.group(3).lower() if match else ""
    if not match or unit not in _UNITS:
        raise AutoparError(f"--memory {text!r} is not a size; write a number with a unit, e.g. 80GiB, 80GB, "
                        "1.5TiB, 512MiB, or plain bytes")
    size = float(match.group(1)) * 10 ** int(match.group(2) or 0) * _UNITS[unit]
    if size < 1:
        raise AutoparError(f"--memory {text!r} is not a positive size; give the memory per device, e.g. 80GiB")
    return int(size)


# Per-module pins: `--pin "blocks.*.mlp.*=row"`. A pin restricts the strategies of the matmul-like nodes whose module
# path matches the glob (fnmatch); every other node, and the mesh, are still searched (planner/pins.py applies them).
PIN_INTENTS = {
    "tp": "weights split along tp (the solver picks column or row)",
    "column": "column-parallel: weights split along tp on the output features, output sharded",
    "row": "row-parallel: weights split along tp on the input features, output a partial sum",
}


def parse_pins(texts: list[str] | str | None) -> dict[str, str]:
    """['blocks.*.mlp.*=row', 'head=column'] (or one comma-separated string) -> {glob: intent}."""
    items = [texts] if isinstance(texts, str) else list(texts or [])
    pins: dict[str, str] = {}
    for item in (part.strip() for text in items for part in text.split(",")):
        glob, sep, intent = (s.strip() for s in item.rpartition("="))
        if not sep or not glob or not intent:
            raise AutoparError(f"--pin item {item!r} is malformed; write MODULE_GLOB=INTENT, e.g. "
                               f"--pin 'blocks.*.mlp.*=row' (intents: {', '.join(PIN_INTENTS)})")
        if intent.lower() not in PIN_INTENTS:
            raise AutoparError(f"--pin {item}: unknown intent {intent!r}; use one of: "
                               + "; ".join(f"{k} ({v})" for k, v in PIN_INTENTS.items()))
        if pins.get(glob, intent.lower()) != intent.lower():
            raise AutoparError(f"--pin gives {glob} twice ({pins[glob]} and {intent}); give it once")
        pins[glob] = intent.lower()
    return pins
