"""Hardware descriptions: the schema of `cost_models/hardware/*.toml`, loading and validation.

Hardware is data (tinygrad's habit): every number the cost model uses lives in a TOML file, with its unit in the
field name and its source in a comment beside it. This module only reads and checks those files; the formulas
that use the numbers live in `compute.py` (roofline) and `comm.py` (alpha-beta collectives).

Schema (version 1), one table per concern:

    schema_version, name, device, devices_per_node, source          top level
    [compute]          peak_{bfloat16,float16,float32}_flops_per_s, matmul_efficiency, launch_overhead_s
    [memory]           capacity_bytes, reserve_bytes, bandwidth_bytes_per_s, efficiency
    [links.intra_node] latency_s, bandwidth_bytes_per_s
    [links.inter_node] latency_s, bandwidth_bytes_per_s

Every dimensional field ends in its unit (`_s`, `_bytes`, `_per_s`); dimensionless ones are counts or fractions.
Unknown keys are errors, so a typo cannot silently fall back to a default.
"""

from __future__ import annotations

import difflib
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from autopar.errors import HardwareError

SCHEMA_VERSION = 1
HARDWARE_DIR = Path(__file__).resolve().parent / "hardware"
DTYPES = ("bfloat16", "float16", "float32")
LINK_NAMES = ("intra_node", "inter_node")
UNIT_SUFFIXES = ("_s", "_bytes", "_per_s")


@dataclass(frozen=True)
class Link:
    """One interconnect level, in the alpha-beta model (Hockney 1994): a message of B bytes takes α + B/bw."""

    name: str  # "intra_node" | "inter_node"
    latency_s: float  # α, per message step
    bandwidth_bytes_per_s: float  # achieved bus bandwidth per device, each way (NCCL-tests "busbw"); β = 1/bw


@dataclass(frozen=True)
class Hardware:
    """One device type and the node it sits in. Build with `load_hardware`, which validates every field."""

    name: str  # file stem for shipped files, e.g. "a100-80gb-sxm"
    device: str  # human name, e.g. "NVIDIA A100 SXM 80GB"
    devices_per_node: int
    # Dense peak per dtype name ("bfloat16", "float16", "float32"). Excluded from the hash because a dict is
    # unhashable; equal Hardware still hash equal, since the hash then covers a subset of the compared fields.
    peak_flops_per_s: Mapping[str, float] = field(hash=False)
    memory_bandwidth_bytes_per_s: float
    memory_bytes: int  # capacity per device
    memory_reserve_bytes: int  # kept free for the runtime and allocator; the reason is in the TOML
    matmul_efficiency: float  # fraction of peak FLOP/s that large matmuls achieve
    memory_efficiency: float  # fraction of memory bandwidth that elementwise ops achieve
    launch_overhead_s: float  # per-op floor
    intra_node: Link
    inter_node: Link
    source: str  # provenance of the numbers

    def peak_flops(self, dtype: Any) -> float:
        """Dense peak FLOP/s for `dtype`: "float32", "torch.float32" or a torch.dtype (str() gives "torch.x")."""
        key = str(dtype).removeprefix("torch.")
        if key not in self.peak_flops_per_s:
            known = ", ".join(sorted(self.peak_flops_per_s))
            raise HardwareError(
                f"hardware '{self.name}' has no peak FLOP/s for dtype '{key}'; "
                f"run matmuls in one of: {known}"
            )
        return self.peak_flops_per_s[key]


# ---------------------------------------------------------------- schema: one kind per family of checks


@dataclass(frozen=True)
class _Kind:
    need: str  # what a valid value looks like, shown in error messages
    convert: Callable[[Any], Any]  # returns the checked value or raises ValueError
    dimensional: bool  # True: the field name must end in a unit suffix (see UNIT_SUFFIXES)


def _number(value: Any) -> float:
    # bool is an int subclass in Python; `x = true` is never a sensible number.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError
    return float(value)


def _bounded(low: float, *, strict: bool, high: float = math.inf) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        x = _number(value)
        if (x <= low if strict else x < low) or x > high:
            raise ValueError
        return x

    return convert


def _whole(low: int) -> Callable[[Any], int]:
    # Byte counts are written as `80e9` as often as `80_000_000_000`; accept integral floats of either form.
    def convert(value: Any) -> int:
        x = _number(value)
        if x != int(x) or x < low:
            raise ValueError
        return int(x)

    return convert


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError
    return value


TEXT = _Kind("a non-empty string", _text, dimensional=False)
COUNT = _Kind("a whole number >= 1", _whole(1), dimensional=False)
FRACTION = _Kind("a number in (0, 1]", _bounded(0.0, strict=True, high=1.0), dimensional=False)
POSITIVE = _Kind("a number > 0", _bounded(0.0, strict=True), dimensional=True)
NONNEGATIVE = _Kind("a number >= 0", _bounded(0.0, strict=False), dimensional=True)
BYTES = _Kind("a whole number of bytes > 0", _whole(1), dimensional=True)
NONNEGATIVE_BYTES = _Kind("a whole number of bytes >= 0", _whole(0), dimensional=True)

_LINK_SCHEMA = {"latency_s": NONNEGATIVE, "bandwidth_bytes_per_s": POSITIVE}
SCHEMA: dict[str, Any] = {
    "schema_version": COUNT,
    "name": TEXT,
    "device": TEXT,
    "devices_per_node": COUNT,
    "source": TEXT,
    "compute": {
        **{f"peak_{dtype}_flops_per_s": POSITIVE for dtype in DTYPES},
        "matmul_efficiency": FRACTION,
        "launch_overhead_s": NONNEGATIVE,
    },
    "memory": {
        "capacity_bytes": BYTES,
        "reserve_bytes": NONNEGATIVE_BYTES,
        "bandwidth_bytes_per_s": POSITIVE,
        "efficiency": FRACTION,
    },
    "links": {name: _LINK_SCHEMA for name in LINK_NAMES},
}


# ---------------------------------------------------------------- loading


def available_hardware() -> list[str]:
    """Names of the shipped hardware files, sorted; each loads with `load_hardware(name)`."""
    return sorted(p.stem for p in HARDWARE_DIR.glob("*.toml"))


def load_hardware(name_or_path: str | os.PathLike[str]) -> Hardware:
    """Load a shipped hardware name ("a100-80gb-sxm") or a path to a .toml file written to the schema above."""
    path = _resolve(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise HardwareError(f"{path}: cannot read hardware file ({e.strerror}); check the path") from e
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise HardwareError(f"{path}: not valid TOML: {e}; fix the syntax there") from e
    values = _check_table(doc, SCHEMA, section="", path=path)
    if values["schema_version"] != SCHEMA_VERSION:
        raise HardwareError(
            f"{path}: schema_version = {values['schema_version']} is not supported; "
            f"this autopar reads schema_version = {SCHEMA_VERSION}"
        )
    return _build(values)


def _resolve(name_or_path: str | os.PathLike[str]) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or len(candidate.parts) > 1:
        if not candidate.is_file():
            raise HardwareError(f"hardware file '{candidate}' does not exist; check the path")
        return candidate
    shipped = HARDWARE_DIR / f"{candidate}.toml"
    if not shipped.is_file():
        names = ", ".join(available_hardware())
        raise HardwareError(
            f"unknown hardware '{name_or_path}'; available: {names}; or pass the path to a .toml file"
        )
    return shipped


def _check_table(table: Mapping[str, Any], schema: Mapping[str, Any], section: str, path: Path) -> dict[str, Any]:
    """Check `table` against `schema` recursively; return the converted values with the same nesting."""
    for key in table:
        if key not in schema:
            raise HardwareError(f"{path}: {_unknown_key_message(key, schema, section)}")
    values: dict[str, Any] = {}
    for key, kind in schema.items():
        where = f"{section}.{key}" if section else key
        if key not in table:
            need = f"a [{where}] table" if isinstance(kind, dict) else kind.need
            raise HardwareError(f"{path}: missing field '{where}' ({need}); add it")
        value = table[key]
        if isinstance(kind, dict):
            if not isinstance(value, dict):
                raise HardwareError(f"{path}: '{where}' must be a table [{where}], got {value!r}")
            values[key] = _check_table(value, kind, where, path)
            continue
        try:
            values[key] = kind.convert(value)
        except ValueError:
            raise HardwareError(
                f"{path}: field '{where}' = {value!r} is invalid; set it to {kind.need}"
            ) from None
    return values


def _unknown_key_message(key: str, schema: Mapping[str, Any], section: str) -> str:
    where = f"[{section}]" if section else "the top level"
    close = difflib.get_close_matches(key, list(schema), n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"expected one of: {', '.join(sorted(schema))}"
    name = f"{section}.{key}" if section else key
    return f"unknown field '{name}' in {where}; {hint}"


def _build(v: Mapping[str, Any]) -> Hardware:
    compute, memory, links = v["compute"], v["memory"], v["links"]
    return Hardware(
        name=v["name"],
        device=v["device"],
        devices_per_node=v["devices_per_node"],
        peak_flops_per_s={dtype: compute[f"peak_{dtype}_flops_per_s"] for dtype in DTYPES},
        memory_bandwidth_bytes_per_s=memory["bandwidth_bytes_per_s"],
        memory_bytes=memory["capacity_bytes"],
        memory_reserve_bytes=memory["reserve_bytes"],
        matmul_efficiency=compute["matmul_efficiency"],
        memory_efficiency=memory["efficiency"],
        launch_overhead_s=compute["launch_overhead_s"],
        intra_node=Link(name="intra_node", **links["intra_node"]),
        inter_node=Link(name="inter_node", **links["inter_node"]),
        source=v["source"],
    )
