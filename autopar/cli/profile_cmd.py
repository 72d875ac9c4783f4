"""`autopar profile`: flags, the check of --out before any rank starts, and the summary rank 0 prints."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from autopar.errors import AutoparError
from autopar.profile import ProfileRequest, run_profile
from autopar.profile.write import HardwareProfile


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="measure this machine into a hardware file (run under torchrun or --nproc)",
                       description="Measure matmul throughput, memory bandwidth, the per-op floor and collective "
                                   "latency/bandwidth over the live process group; fit the cost model's "
                                   "parameters and write a hardware .toml for `autopar plan --hardware`.")
    p.add_argument("--out", required=True, metavar="PATH.toml", help="hardware file to write")
    p.add_argument("--name", help="the file's name field (default: cpu on CPUs, the GPU's name on GPUs)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and shorter timings (about 10 s on a CPU)")
    p.add_argument("--nproc", type=int, metavar="N", help="spawn N local ranks (when not under torchrun)")
    p.add_argument("--devices-per-node", type=int, metavar="N",
                   help="devices per node for the planner (default: GPUs on this host, or the ranks on it)")
    p.add_argument("--raw", metavar="PATH.json", help="also write every rank's timings as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    out = _checked_out(args.out)
    if args.devices_per_node is not None and args.devices_per_node < 1:
        raise AutoparError(f"--devices-per-node {args.devices_per_node} must be a whole number >= 1")
    req = ProfileRequest(out=out, name=args.name, quick=args.quick, devices_per_node=args.devices_per_node,
                         command=_command(args), raw=Path(args.raw).resolve() if args.raw else None)
    run_profile(req, args.nproc, show)
    return 0


def _checked_out(text: str) -> Path:
    out = Path(text)
    if out.suffix != ".toml":
        raise AutoparError(f"--out {text} must end in .toml, so that `--hardware {text}` reads it as a file")
    if not out.parent.is_dir():
        raise AutoparError(f"--out {text}: directory '{out.parent}' does not exist; create it first")
    return out.resolve()


def _command(args: argparse.Namespace) -> str:
    flags = [f"--out {args.out}", f"--name {args.name}" if args.name else "", "--quick" if args.quick else "",
             f"--nproc {args.nproc}" if args.nproc else "",
             f"--devices-per-node {args.devices_per_node}" if args.devices_per_node else "",
             f"--raw {args.raw}" if args.raw else ""]
    return " ".join(["autopar profile", *filter(None, flags)])


def show(profile: HardwareProfile, out: Path, elapsed_s: float) -> None:
    """Rank 0's summary: the fitted numbers as the planner will read them."""
    c = profile.compute
    table = Table(title=f"{profile.name}: {profile.device}", title_justify="left")
    for column in ("parameter", "value"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for dtype, peak in c.peak_flops_per_s.items():
        table.add_row(f"peak {dtype}", f"{peak / 1e9:,.1f} GFLOP/s")
    table.add_row("matmul efficiency", f"{c.matmul_efficiency:.3f}")
    table.add_row("matmul overhead", f"{c.matmul_overhead_s * 1e6:.1f} us per call")
    table.add_row("memory bandwidth", f"{c.memory_bandwidth_bytes_per_s / 1e9:.2f} GB/s")
    table.add_row("memory efficiency", f"{c.memory_efficiency:.3f}")
    table.add_row("launch overhead", f"{c.launch_overhead_s * 1e6:.2f} us")
    if c.attention_efficiency is not None:
        table.add_row("attention efficiency", f"{c.attention_efficiency:.3f}")
    for family, rate in c.per_s.items():
        table.add_row(f"{family} evaluations", f"{rate / 1e9:.3g} G/s")
    if profile.comm_overlap is not None:
        table.add_row("comm overlap", f"{profile.comm_overlap.fraction:.2f}")
    for z, seconds in sorted(profile.fsdp_per_param_s.items()):
        per_mib = profile.fsdp_per_byte_s.get(z, 0.0) * 2**20
        table.add_row(f"FSDP2 (ZeRO-{z}) per parameter", f"{seconds * 1e6:.0f} us + {per_mib * 1e3:.2f} ms/MiB")
    for link, fit in profile.links.items():
        table.add_row(f"{link} latency", f"{fit.latency_s * 1e6:.1f} us")
        table.add_row(f"{link} bandwidth", f"{fit.bandwidth_bytes_per_s / 1e9:.3f} GB/s")
    console = Console()
    console.print(table)
    console.print(f"wrote {out} in {elapsed_s:.0f} s; plan with it: autopar plan MODEL --devices N --hardware {out}",
                  highlight=False)
