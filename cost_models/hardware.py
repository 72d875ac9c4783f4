"""Hardware descriptions: the schema of `cost_models/hardware/*.toml`, loading and validation.

Hardware is data (tinygrad's habit): every number the cost model uses lives in a TOML file, with its unit in the
field name and its source in a comment beside it. This module only reads and checks those files; the formulas
that use the numbers live in `compute.py` (roofline) and `comm.py` (alpha-beta collectives).

Schema (version 1), one table per concern:

    schema_version, name, device, devices_per_node, source          top level
    [compute]          peak_{bfloat16,float16,float32}_flops_per_s, matmul_efficiency, launch_overhead_s;
                       optional: matmul_overhead_s, attention_efficiency, {exp,tanh,erf}_per_s, comm_overlap
                       (see Hardware), triton_kernels (true or false: see below)
    [memory]           capacity_bytes, reserve_bytes, bandwidth_bytes_per_s, efficiency
    [links.intra_node] latency_s, bandwidth_bytes_per_s
    [links.inter_node] latency_s, bandwidth_bytes_per_s
    [links.<link>.<collective>]  optional: latency_s, bandwidth_bytes_per_s fitted to that collective alone
    [runtime]          optional: zero{2,3}_per_param_s, zero{2,3}_per_byte_s (see Hardware)

Optional numbers are the ones a profile measures and a datasheet does not give; OPTIONAL_FIELDS says for each why
it may be left out and what the cost model assumes without it.

`compute.triton_kernels` says whether autopar's fused kernels (autopar/kernels) run as Triton on this device: true
for CUDA GPUs; false where they would run their torch reference paths (a CPU), which cost step time the planner does
not price, so the search leaves fusion off there unless `--fix fuse=on` asks for it. Left out, it is false for a file
an `autopar profile` run on gloo wrote (`[provenance] backend = "gloo"`: CPU ranks), true otherwise.

Every dimensional field ends in its unit (`_s`, `_bytes`, `_per_s`); dimensionless ones are counts or fractions.
Every number may cite where it comes from in a sibling `<field>_source` string (datasheet, paper, or the
`autopar profile` run that measured it); shipped files cite all of theirs (tests/test_hardware_schema.py). An
optional `[provenance]` table records the run that wrote a profiled file (date, host, torch, backend, world size).
Unknown keys are errors, so a typo cannot silently fall back to a default; a key or value written in another unit
(`latency_us`, `"5 us"`) is named with its conversion to the unit the schema reads.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from autopar.errors import HardwareError

SCHEMA_VERSION = 1
HARDWARE_DIR = Path(__file__).resolve().parent / "hardware"
DTYPES = ("bfloat16", "float16", "float32")
LINK_NAMES = ("intra_node", "inter_node")
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")
FAMILIES = ("exp", "tanh", "erf")  # transcendental families with their own rate (compute.py)
UNIT_SUFFIXES = ("_s", "_bytes", "_per_s")
SOURCE_SUFFIX = "_source"


@dataclass(frozen=True)
class Link:
    """One interconnect level, in the alpha-beta model (Hockney 1994): a message of B bytes takes α + B/bw."""

    name: str  # "intra_node" | "inter_node"
    latency_s: float  # α, per message step
    bandwidth_bytes_per_s: float  # achieved bus bandwidth per device, each way (NCCL-tests "busbw"); β = 1/bw
    # Collective kind -> (α, bw) fitted to that kind alone, where a profile measured it: a backend may run each
    # collective with its own algorithm (gloo's all-gather and reduce-scatter are 2-4x slower per byte than its
    # all-reduce on the same host), which one (α, bw) per link cannot express. Kinds not listed use the link's.
    kinds: Mapping[str, tuple[float, float]] = field(default_factory=dict, hash=False)

    def alpha_beta(self, kind: str) -> tuple[float, float]:
        """(latency, bandwidth) that `kind` runs at on this link."""
        return self.kinds.get(kind, (self.latency_s, self.bandwidth_bytes_per_s))

    def without_latency(self) -> "Link":
        return replace(self, latency_s=0.0, kinds={k: (0.0, bw) for k, (_, bw) in self.kinds.items()})


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
    # Optional (a file may leave them out; the default is what the cost model assumed before they existed):
    # a fixed cost per matmul call beyond its FLOPs (operand packing, cold caches; 0: none), which makes a small
    # micro-batch's or a tensor-parallel shard's matmuls slower per FLOP than a large one's;
    matmul_overhead_s: float = 0.0
    # fused attention's fraction of peak, forward and backward together (None: matmul_efficiency);
    attention_efficiency: float | None = None
    # transcendental evaluations per second by family (compute.py FAMILIES: exp, tanh, erf), forward and backward
    # together: an extra ceiling on those ops beside compute and memory (a family left out has none: a GPU's
    # special-function units outrun its memory on them);
    special_per_s: Mapping[str, float] = field(default_factory=dict, hash=False)
    # the fraction of a collective's time that compute running at the same time hides (1: all of it, as with
    # NCCL on its own stream; on a CPU the collective needs the cores the compute is using).
    comm_overlap: float = 1.0
    # host time FSDP2 adds per parameter tensor per step beyond its collectives, under ZeRO-2 and ZeRO-3 (0: none
    # counted: on a GPU that host work runs ahead of the device's kernels)
    zero_per_param_s: Mapping[int, float] = field(default_factory=dict, hash=False)
    # and per byte of parameter, for its copies in and out of FSDP2's buffers (0: none counted)
    zero_per_byte_s: Mapping[int, float] = field(default_factory=dict, hash=False)
    # whether the fused kernels run as Triton here (CUDA); False: their torch reference paths run, slower than the
    # unfused program on a CPU, so the search does not fuse unless asked (planner/search.py memory_configs)
    triton_kernels: bool = True
    # Dotted field name ("compute.matmul_efficiency") -> where that number comes from; and the profile run that
    # wrote the file, if any. Neither changes a cost, so neither takes part in equality or hashing.
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)
    provenance: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    fields: frozenset[str] = field(default=frozenset(), compare=False, hash=False)  # dotted numbers in the file

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
    optional: bool = False  # True: the field may be left out


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


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):  # `1` or `"yes"` may mean either; TOML writes true or false
        raise ValueError
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError
    return value


TEXT = _Kind("a non-empty string", _text, dimensional=False)
COUNT = _Kind("a whole number >= 1", _whole(1), dimensional=False)
FRACTION = _Kind("a number in (0, 1]", _bounded(0.0, strict=True, high=1.0), dimensional=False)
OPTIONAL_FRACTION = _Kind("a number in (0, 1]", _bounded(0.0, strict=True, high=1.0), dimensional=False,
                          optional=True)
OPTIONAL_SHARE = _Kind("a number in [0, 1]", _bounded(0.0, strict=False, high=1.0), dimensional=False, optional=True)
OPTIONAL_POSITIVE = _Kind("a number > 0", _bounded(0.0, strict=True), dimensional=True, optional=True)
OPTIONAL_NONNEGATIVE = _Kind("a number >= 0", _bounded(0.0, strict=False), dimensional=True, optional=True)
POSITIVE = _Kind("a number > 0", _bounded(0.0, strict=True), dimensional=True)
NONNEGATIVE = _Kind("a number >= 0", _bounded(0.0, strict=False), dimensional=True)
BYTES = _Kind("a whole number of bytes > 0", _whole(1), dimensional=True)
NONNEGATIVE_BYTES = _Kind("a whole number of bytes >= 0", _whole(0), dimensional=True)
SOURCE = _Kind("a non-empty string citing a datasheet, paper or profile run", _text, dimensional=False, optional=True)
OPTIONAL_TEXT = _Kind("a non-empty string", _text, dimensional=False, optional=True)
OPTIONAL_COUNT = _Kind("a whole number >= 1", _whole(1), dimensional=False, optional=True)
OPTIONAL_FLAG = _Kind("true or false", _flag, dimensional=False, optional=True)
NUMERIC_KINDS = (COUNT, FRACTION, POSITIVE, NONNEGATIVE, BYTES, NONNEGATIVE_BYTES, OPTIONAL_FRACTION, OPTIONAL_SHARE,
                 OPTIONAL_POSITIVE, OPTIONAL_NONNEGATIVE)


def _with_sources(table: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """`table` plus an optional `<field>_source` string beside each numeric field."""
    sources = {f"{k}{SOURCE_SUFFIX}": SOURCE for k, kind in table.items() if kind in NUMERIC_KINDS and k not in skip}
    return {**table, **sources}


_ALPHA_BETA = _with_sources({"latency_s": NONNEGATIVE, "bandwidth_bytes_per_s": POSITIVE})
_LINK_SCHEMA = {**_ALPHA_BETA, **{kind: _ALPHA_BETA for kind in COLLECTIVES}}
# The run that wrote a profiled file; optional, and free of numbers the cost model reads.
PROVENANCE_SCHEMA = {
    "date": OPTIONAL_TEXT, "host": OPTIONAL_TEXT, "command": OPTIONAL_TEXT, "autopar_version": OPTIONAL_TEXT,
    "torch_version": OPTIONAL_TEXT, "backend": OPTIONAL_TEXT, "devices": OPTIONAL_TEXT,
    "world_size": OPTIONAL_COUNT, "nodes": OPTIONAL_COUNT, "threads_per_rank": OPTIONAL_COUNT,
    "host_load": OPTIONAL_TEXT,  # other work on the host slows what was measured; this says how much there was
}
OPTIONAL_TABLES = frozenset({"provenance", "runtime",
                             *(f"links.{link}.{kind}" for link in LINK_NAMES for kind in COLLECTIVES)})
SCHEMA: dict[str, Any] = {
    **_with_sources({
        "schema_version": COUNT,  # the file format's version, not a measurement: nothing to cite
        "name": TEXT,
        "device": TEXT,
        "devices_per_node": COUNT,
        "source": TEXT,
    }, skip=("schema_version",)),
    "compute": _with_sources({
        **{f"peak_{dtype}_flops_per_s": POSITIVE for dtype in DTYPES},
        "matmul_efficiency": FRACTION,
        "launch_overhead_s": NONNEGATIVE,
        "matmul_overhead_s": OPTIONAL_NONNEGATIVE,
        "attention_efficiency": OPTIONAL_FRACTION,
        **{f"{family}_per_s": OPTIONAL_POSITIVE for family in FAMILIES},
        "comm_overlap": OPTIONAL_SHARE,
        "triton_kernels": OPTIONAL_FLAG,  # not a measurement: which code runs, not how fast
    }),
    "memory": _with_sources({
        "capacity_bytes": BYTES,
        "reserve_bytes": NONNEGATIVE_BYTES,
        "bandwidth_bytes_per_s": POSITIVE,
        "efficiency": FRACTION,
    }),
    "links": {name: _LINK_SCHEMA for name in LINK_NAMES},
    "runtime": _with_sources({f"zero{z}_per_{unit}_s": OPTIONAL_NONNEGATIVE for z in (2, 3)
                              for unit in ("param", "byte")}),
    "provenance": PROVENANCE_SCHEMA,
}


# Why each optional number may be left out, and what the cost model assumes without it. The shipped GPU files carry
# the required numbers only; the CPU file, written by `autopar profile`, measures these too (test_hardware_schema.py
# checks that every number of cpu.toml is either in every shipped file or listed here).
_BY_COLLECTIVE = ("(latency, bandwidth) fitted to one collective alone; without it the collective uses its link's: "
                  "NCCL gives every ring collective the link's bus bandwidth (nccl-tests doc/PERFORMANCE.md), "
                  "gloo does not (its all-gather is 2-4x slower per byte than its all-reduce on one host)")
_FSDP_HOST = ("FSDP2's host work per step beyond its collectives; without it none is counted: on a GPU that host "
              "work runs ahead of the device's kernels, on a CPU it is on the critical path")
OPTIONAL_FIELDS: dict[str, str] = {
    "compute.matmul_overhead_s": "a fixed cost per matmul call beyond its FLOPs; without it 0: on a GPU a call costs "
                                 "its launch (launch_overhead_s), while a CPU packs its operands on every call",
    "compute.attention_efficiency": "fused attention's fraction of the matmul peak; without it matmul_efficiency "
                                    "(FlashAttention runs its two matmuls near GEMM efficiency on a GPU)",
    **{f"compute.{f}_per_s": f"{f} evaluations per second; without it no such ceiling: a GPU's special-function "
                             "units outrun its memory, so the memory roofline binds" for f in FAMILIES},
    "compute.comm_overlap": "the share of a collective that concurrent compute hides; without it 1: NCCL runs on "
                            "its own stream, while on a CPU a collective needs the cores the compute is using",
    **{f"links.{link}.{kind}.{f}": _BY_COLLECTIVE for link in LINK_NAMES for kind in COLLECTIVES
       for f in ("latency_s", "bandwidth_bytes_per_s")},
    **{f"runtime.zero{z}_per_{unit}_s": _FSDP_HOST for z in (2, 3) for unit in ("param", "byte")},
}


def optional_reason(dotted: str) -> str | None:
    """Why the number `dotted` ("compute.comm_overlap") may be left out of a hardware file; None if it is required."""
    return OPTIONAL_FIELDS.get(dotted)


def numeric_fields(schema: Mapping[str, Any] = SCHEMA, prefix: str = "") -> list[str]:
    """Dotted names of every number a hardware file must hold (all but schema_version and the optional ones)."""
    names = []
    for key, kind in schema.items():
        if isinstance(kind, dict):
            names += [] if prefix + key in OPTIONAL_TABLES else numeric_fields(kind, f"{prefix}{key}.")
        elif kind in NUMERIC_KINDS and not kind.optional and key != "schema_version":
            names.append(prefix + key)
    return names


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
    memory = values["memory"]
    if memory["reserve_bytes"] >= memory["capacity_bytes"]:
        raise HardwareError(
            f"{path}: field 'memory.reserve_bytes' = {memory['reserve_bytes']} leaves nothing of "
            f"'memory.capacity_bytes' = {memory['capacity_bytes']}; set the reserve below the capacity"
        )
    return _build(values)


def _resolve(name_or_path: str | os.PathLike[str]) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or len(candidate.parts) > 1:
        if not candidate.is_file():
            raise HardwareError(
                f"hardware file '{candidate}' does not exist; check the path, write one with "
                f"`autopar profile --out {candidate}`, or use a shipped name: {', '.join(available_hardware())}"
            )
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
            if where in OPTIONAL_TABLES or (not isinstance(kind, dict) and kind.optional):
                continue
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
            raise HardwareError(f"{path}: {_invalid_value_message(where, value, kind)}") from None
    return values


def _invalid_value_message(where: str, value: Any, kind: _Kind) -> str:
    key = where.rsplit(".", 1)[-1]
    unit = _field_unit(key) if kind.dimensional else None
    written = _parse_quantity(value) if isinstance(value, str) else None
    if unit and written:
        number, dimension, factor = written
        if dimension != unit[0]:
            return f"field '{where}' = {value!r} is not in {unit[0]}; write a plain number of {unit[0]} there"
        return (f"field '{where}' = {value!r} is a string; write a plain number of {unit[0]}: "
                f"{key} = {number * factor / unit[1]:.6g}")
    return f"field '{where}' = {value!r} is invalid; set it to {kind.need}"


def _unknown_key_message(key: str, schema: Mapping[str, Any], section: str) -> str:
    where = f"[{section}]" if section else "the top level"
    name = f"{section}.{key}" if section else key
    other_unit = _other_unit_message(key, schema)
    if other_unit:
        return f"field '{name}' in {where} {other_unit}"
    close = difflib.get_close_matches(key, list(schema), n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"expected one of: {', '.join(sorted(schema))}"
    return f"unknown field '{name}' in {where}; {hint}"


# ---------------------------------------------------------------- units a user may write instead of ours

# Dimension and factor to the schema's unit for each suffix it reads, longest first so `_bytes_per_s` wins.
_FIELD_UNITS = (("_flops_per_s", ("FLOP/s", 1.0)), ("_bytes_per_s", ("bytes/s", 1.0)),
                ("_per_s", ("evaluations per second", 1.0)), ("_bytes", ("bytes", 1.0)), ("_s", ("seconds", 1.0)))
_PREFIXES = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15,
             "ki": 2.0**10, "mi": 2.0**20, "gi": 2.0**30, "ti": 2.0**40}
# Lower-case unit text -> (dimension, factor to the base unit). Bits per second are left out on purpose:
# "Gbps" is a line rate, and the schema wants achieved bytes/s, so guessing would hide a factor of 8 and more.
_UNITS: dict[str, tuple[str, float]] = {
    "s": ("seconds", 1.0), "ms": ("seconds", 1e-3), "us": ("seconds", 1e-6), "µs": ("seconds", 1e-6),
    "ns": ("seconds", 1e-9),
    **{f"{p}b": ("bytes", f) for p, f in _PREFIXES.items()},
    **{f"{p}{b}": ("bytes/s", f) for p, f in _PREFIXES.items() for b in ("b/s", "bytes/s")},
    **{f"{p}{u}": ("FLOP/s", f) for p, f in _PREFIXES.items() for u in ("flop/s", "flops", "flops/s")},
    # a rate of events (exp_per_us): the stem keeps "per", so the written unit is the time after it
    **{f"per_{t}": ("evaluations per second", 1.0 / f) for t, f in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6),
                                                                     ("ns", 1e-9))},
}


def _field_unit(key: str) -> tuple[str, float] | None:
    return next((unit for suffix, unit in _FIELD_UNITS if key.endswith(suffix)), None)


def _parse_quantity(text: str) -> tuple[float, str, float] | None:
    """`"5 us"` -> (5.0, "seconds", 1e-6); None when `text` is not a number followed by a known unit."""
    match = re.fullmatch(r"\s*([-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-zµ/]+)\s*", text.replace("_", ""))
    if not match or match.group(2).lower() not in _UNITS:
        return None
    dimension, factor = _UNITS[match.group(2).lower()]
    return float(match.group(1)), dimension, factor


def _other_unit_message(key: str, schema: Mapping[str, Any]) -> str | None:
    """For `latency_us` beside a schema field `latency_s`: what the schema reads instead, or None."""
    for known, kind in schema.items():
        unit = None if isinstance(kind, dict) else _field_unit(known)
        suffix = next((s for s, _ in _FIELD_UNITS if known.endswith(s)), "")
        stem = known[: len(known) - len(suffix)]
        if not unit or not key.startswith(stem + "_"):
            continue
        written = _UNITS.get(key[len(stem) + 1 :].replace("_per_", "/").lower())
        if written and written[0] == unit[0]:
            return (f"is in another unit; this schema reads '{known}' in {unit[0]}: rename it and multiply "
                    f"the value by {written[1] / unit[1]:g}")
    return None


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
        matmul_overhead_s=compute.get("matmul_overhead_s", 0.0),
        attention_efficiency=compute.get("attention_efficiency"),
        special_per_s={f: compute[f"{f}_per_s"] for f in FAMILIES if f"{f}_per_s" in compute},
        comm_overlap=compute.get("comm_overlap", 1.0),
        zero_per_param_s=_per_zero_stage(v.get("runtime", {}), "param"),
        zero_per_byte_s=_per_zero_stage(v.get("runtime", {}), "byte"),
        triton_kernels=compute.get("triton_kernels", v.get("provenance", {}).get("backend") != "gloo"),
        intra_node=_link("intra_node", links["intra_node"]),
        inter_node=_link("inter_node", links["inter_node"]),
        source=v["source"],
        sources=_sources(v),
        provenance=dict(v.get("provenance", {})),
        fields=frozenset(_numbers(v)),
    )


def _per_zero_stage(runtime: Mapping[str, Any], unit: str) -> dict[int, float]:
    """ZeRO stage -> the [runtime] table's `zero{stage}_per_{unit}_s`, for the stages the file gives."""
    return {z: runtime[f"zero{z}_per_{unit}_s"] for z in (2, 3) if f"zero{z}_per_{unit}_s" in runtime}


def _link(name: str, table: Mapping[str, Any]) -> Link:
    kinds = {k: (table[k]["latency_s"], table[k]["bandwidth_bytes_per_s"]) for k in COLLECTIVES if k in table}
    return Link(name=name, latency_s=table["latency_s"], bandwidth_bytes_per_s=table["bandwidth_bytes_per_s"],
                kinds=kinds)


def _numbers(v: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the numbers in a checked file (schema_version aside): the ones that must cite a source."""
    out: list[str] = []
    for key, x in v.items():
        if isinstance(x, dict):
            out += [] if key == "provenance" else _numbers(x, f"{prefix}{key}.")
        elif isinstance(x, (int, float)) and not isinstance(x, bool) and key != "schema_version":
            out.append(prefix + key)
    return out


def _sources(v: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten `<field>_source` keys to {"section.field": text}."""
    out: dict[str, str] = {}
    for key, x in v.items():
        if isinstance(x, dict):
            out.update(_sources(x, f"{prefix}{key}."))
        elif key.endswith(SOURCE_SUFFIX):
            out[prefix + key.removesuffix(SOURCE_SUFFIX)] = x
    return out
