"""From every rank's measurements to a hardware file in the shipped schema (cost_models/hardware.py).

Each number gets `<field>_source = "autopar profile <date> <host>"` and a comment above it saying what was measured
and how well the cost model's formula fits it; the run itself goes to `[provenance]`. The text is checked with
`load_hardware` before it is written, so a profile can never produce a file the planner rejects.
"""

from __future__ import annotations

import math
import statistics
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from autopar.cost_models.comm import COLLECTIVES
from autopar.cost_models.hardware import DTYPES, LINK_NAMES, SCHEMA_VERSION, load_hardware

from .collectives import OverlapSample
from .fit import ComputeFit, LinkFit, fit_alpha_beta, fit_compute, merge_ranks
from .measure import ProfileConfig, RankMeasurements, stream_mib


@dataclass(frozen=True)
class HardwareProfile:
    """Everything a profiled hardware file says, before it is text."""

    name: str
    device: str
    devices_per_node: int
    devices_per_node_how: str  # why that count, for the comment beside it
    compute: ComputeFit
    capacity_bytes: int
    reserve_bytes: int
    links: dict[str, LinkFit]  # the link classes measured; the file copies intra_node into any other
    per_kind: dict[str, dict[str, LinkFit]]  # link -> collective kind -> its own fit, shown in comments
    config: ProfileConfig
    provenance: dict[str, Any]  # date, host, torch_version, backend, devices, world_size, ...
    matmul_sizes: dict[str, list[int]] = field(default_factory=dict)  # dtype -> n measured (slow dtypes stop early)
    layer_matmul_dtypes: tuple[str, ...] = ()  # the dtypes also timed at [M, K] @ [K, N] layer shapes
    overlap: list[OverlapSample] = field(default_factory=list)  # one per link class measured
    fsdp_per_param_s: dict[int, float] = field(default_factory=dict)  # ZeRO stage -> median over ranks
    fsdp_per_byte_s: dict[int, float] = field(default_factory=dict)  # ZeRO stage -> median over ranks

    @property
    def comm_overlap(self) -> OverlapSample | None:
        """The link whose collective compute hid least: the fraction the planner may count on."""
        return min(self.overlap, key=lambda o: o.fraction) if self.overlap else None

    @property
    def source(self) -> str:
        return f"autopar profile {self.provenance['date'][:10]} {self.provenance['host']}"


def build_profile(ranks: list[RankMeasurements], name: str, devices_per_node: int, devices_per_node_how: str,
                  config: ProfileConfig, provenance: dict[str, Any]) -> HardwareProfile:
    """Fit the merged measurements of all ranks (median over ranks, then least squares)."""
    merged = merge_ranks([r.compute for r in ranks])
    compute = fit_compute(merged)
    matmul_sizes = {d: sorted({s.size for s in merged if s.op == "matmul" and s.dtype == d}) for d in DTYPES}
    layered = tuple(d for d in DTYPES if any(s.op == "layer_matmul" and s.dtype == d for s in merged))
    comm = merge_ranks([r.comm for r in ranks])
    links = {link: fit_alpha_beta([s for s in comm if s.link == link]) for link in LINK_NAMES
             if any(s.link == link for s in comm)}
    if "intra_node" not in links:
        raise ValueError("no intra_node collectives were measured: run at least 2 ranks on one host")
    per_kind = {link: {kind: _own_fit([s for s in comm if s.link == link and s.kind == kind], links[link])
                       for kind in COLLECTIVES} for link in links}
    total = min(r.memory_total_bytes for r in ranks)
    available = min(r.memory_available_bytes for r in ranks)
    names = sorted({r.device_name for r in ranks})
    overlap = {o.link: o for r in ranks for o in r.overlap}  # the same slowest-rank times on every rank
    fsdp = {z: statistics.median(r.fsdp_per_param_s[z] for r in ranks) for z in ranks[0].fsdp_per_param_s}
    per_byte = {z: statistics.median(r.fsdp_per_byte_s[z] for r in ranks) for z in ranks[0].fsdp_per_byte_s}
    return HardwareProfile(name, f"{' + '.join(names)}, {len(ranks)} ranks", devices_per_node,
                           devices_per_node_how, compute, total, max(0, total - available), links, per_kind,
                           config, provenance, matmul_sizes, layered, list(overlap.values()), fsdp, per_byte)


def _own_fit(samples: list, joint: LinkFit) -> LinkFit:
    """A collective's own fit, or the link's joint one where its times alone do not grow with message size (noise
    on a busy host, or messages too small to show bandwidth): the file then says so in the comment."""
    try:
        return fit_alpha_beta(samples)
    except ValueError:
        return replace(joint, note="its own times did not grow with message size; the link's joint fit")


def write_profile(profile: HardwareProfile, out: Path) -> None:
    """Render, check with load_hardware (a failure here is an autopar bug), then write `out`."""
    text = render_toml(profile)
    with tempfile.TemporaryDirectory() as tmp:
        check = Path(tmp) / "check.toml"
        check.write_text(text, encoding="utf-8")
        load_hardware(check)
    out.write_text(text, encoding="utf-8")


def render_toml(p: HardwareProfile) -> str:
    c, src = p.compute, p.source
    def sizes(dtype: str) -> str:
        n = p.matmul_sizes.get(dtype) or p.config.matmul_sizes
        return f"n = {n[0]}..{n[-1]}"
    lines = [
        f"# Written by `{p.provenance.get('command', 'autopar profile')}`.",
        f"# {p.device}; torch {p.provenance['torch_version']}, {p.provenance['backend']}.",
        "# The comment above each number says what was measured; its `_source` names the run.",
        f"schema_version = {SCHEMA_VERSION}",
        f"name = {_str(p.name)}",
        f"device = {_str(p.device)}",
        *_number("devices_per_node", p.devices_per_node, p.devices_per_node_how, src),
        f"source = {_str(f'{src}: matmuls, memory streams, tiny ops and collectives, fitted by least squares')}",
        "",
        "[compute]",
    ]
    for dtype in DTYPES:
        layers = " and [M, K] @ [K, N] layer shapes" if dtype in p.layer_matmul_dtypes else ""
        lines += _number(f"peak_{dtype}_flops_per_s", c.peak_flops_per_s[dtype],
                         f"best {dtype} matmul throughput over n x n x n, {sizes(dtype)}{layers}", src)
    lines += _number("matmul_efficiency", c.matmul_efficiency, "roofline fit to all those matmuls and the "
                     f"[M, K] @ [K, N] layer shapes, with the overhead below (rms error {c.matmul_rms_rel_error:.0%})",
                     src)
    lines += _number("matmul_overhead_s", c.matmul_overhead_s, "fixed time per matmul call, fitted with the "
                     "efficiency above", src)
    lines += _number("launch_overhead_s", c.launch_overhead_s, "median time of a one-element add", src)
    if c.attention_efficiency is not None:
        lines += _number("attention_efficiency", c.attention_efficiency, "causal attention forward + backward at "
                         "[4, 4, 128..512, 64], fraction of the matmul peak the roofline fits "
                         f"(rms error {c.attention_rms_rel_error:.0%})", src)
    for family, ops in (("exp", "silu and softmax"), ("tanh", "tanh-approximated gelu"), ("erf", "gelu")):
        if family in c.per_s:
            lines += _number(f"{family}_per_s", c.per_s[family], f"{ops} forward + backward on 2^20 float32 "
                             f"elements: {family} evaluations per second the roofline fits (rms error "
                             f"{c.per_s_rms_rel_error[family]:.0%})", src)
    if p.comm_overlap is not None:
        o = p.comm_overlap
        lines += _number("comm_overlap", round(o.fraction, 3), f"{o.link} all-reduce of {o.nbytes // 2**20} MiB "
                         f"{o.comm_s * 1e3:.1f} ms and matmuls {o.compute_s * 1e3:.1f} ms took {o.both_s * 1e3:.1f} "
                         "ms together: the share of the shorter that was hidden", src)
    lines += _triton_kernels(p)
    lines += ["", "[memory]"]
    lines += _number("capacity_bytes", p.capacity_bytes, _capacity_how(p), src)
    lines += _number("reserve_bytes", p.reserve_bytes, "capacity minus the memory available at the end of the "
                     "run (OS, other processes, this runtime)", src)
    lines += _number("bandwidth_bytes_per_s", c.memory_bandwidth_bytes_per_s, "best float32 copy/add stream "
                     f"rate over {stream_mib(p.config.stream_numels)} MiB buffers", src)
    lines += _number("efficiency", c.memory_efficiency, "roofline fit to all those streams "
                     f"(rms error {c.stream_rms_rel_error:.0%})", src)
    for link in LINK_NAMES:
        lines += ["", *_link(p, link)]
    if p.fsdp_per_param_s:
        lines += ["", "[runtime]"]
        for z, seconds in sorted(p.fsdp_per_param_s.items()):
            lines += _number(f"zero{z}_per_param_s", seconds, f"FSDP2 as ZeRO-{z} on a one-rank mesh minus plain "
                             "training, per parameter tensor per step (64 Linear parameters at widths 64 and 256)", src)
            if z in p.fsdp_per_byte_s:
                lines += _number(f"zero{z}_per_byte_s", p.fsdp_per_byte_s[z], "and per parameter byte (its "
                                 "copies in and out of FSDP2's buffers), from the same two widths", src)
    lines += ["", "[provenance]", *(f"{k} = {_value(v)}" for k, v in p.provenance.items())]
    return "\n".join(lines) + "\n"


def _link(p: HardwareProfile, link: str) -> list[str]:
    """The link's joint fit, then each collective's own fit (what the cost model prices that collective with)."""
    measured = link in p.links
    if not measured:  # one host: the planner never prices this link, but the schema needs numbers
        fit, source = p.links["intra_node"], f"{p.source}: not measured (one host), copy of intra_node"
        how = "not measured: all ranks on one host; copy of intra_node"
    else:
        fit, source = p.links[link], p.source
        how = (f"alpha-beta least squares over {', '.join(COLLECTIVES)} together (rms error "
               f"{fit.rms_rel_error:.0%}); each collective's own fit below is what the planner uses for it")
    lines = [f"[links.{link}]", *_number("latency_s", fit.latency_s, how, source),
             *_number("bandwidth_bytes_per_s", fit.bandwidth_bytes_per_s, None, source)]
    for kind, f in p.per_kind[link if measured else "intra_node"].items():
        lines += ["", f"[links.{link}.{kind}]",
                  *_number("latency_s", f.latency_s, f"{kind} alone: {_kind_fit(f)}" if measured else None, source),
                  *_number("bandwidth_bytes_per_s", f.bandwidth_bytes_per_s, None, source)]
    return lines


def _number(key: str, value: float, how: str | None, source: str) -> list[str]:
    comment = [f"# {how}"] if how else []
    return [*comment, f"{key} = {_value(value)}", f"{key}_source = {_str(source)}"]


def _value(v: Any) -> str:
    if isinstance(v, str):
        return _str(v)
    if isinstance(v, int):
        return f"{v:_}" if v >= 10_000 else str(v)
    if not math.isfinite(v):
        raise ValueError(f"cannot write {v} to a hardware file")
    return f"{v:.4g}"


def _str(text: str) -> str:
    # TOML basic strings share JSON's escapes for the characters that can occur here.
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'


def _kind_fit(f: LinkFit) -> str:
    return (f"latency {f.latency_s * 1e6:.1f} us, bandwidth {f.bandwidth_bytes_per_s / 1e9:.3g} GB/s "
            f"(rms error {f.rms_rel_error:.0%})" + (f": {f.note}" if f.note else ""))


def _triton_kernels(p: HardwareProfile) -> list[str]:
    """Which code the fused kernels run on these devices (autopar/kernels/dispatch.py): Triton on CUDA tensors."""
    if p.provenance["backend"] == "nccl":
        return ["# CUDA tensors: autopar's fused kernels run as Triton", "triton_kernels = true"]
    return ["# CPU tensors: autopar's fused kernels run their torch reference paths, not Triton",
            "triton_kernels = false"]


def _capacity_how(p: HardwareProfile) -> str:
    if p.provenance["backend"] == "nccl":
        return "torch.cuda.mem_get_info total of the smallest device"
    return "host RAM, shared by the ranks on it; the planner's per-device check cannot express sharing"
