"""`autopar plan`: parse and check the request, run the planner (with a spinner on a terminal), print, save."""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Callable, NoReturn

from rich.console import Console
from rich.table import Table

from autopar.capture import without_source_lines
from autopar.cli.report import count, mesh, micro_batching, pipeline_summary, render
from autopar.cost_models import Hardware, available_hardware, load_hardware
from autopar.errors import AutoparError
from autopar.fixspec import (FIX_KEYS, PIN_INTENTS, merge_mesh, parse_fix, parse_memory, parse_mesh, parse_pins,
                             planner_fix)
from autopar.models.registry import PRESETS, parse_model_args
from autopar.cli.report import explain_table
from autopar.explain import explain
from autopar.plan import Plan
from autopar.plot import plot_memory
from autopar.planning import make_plan

DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
EPILOG = """\
examples:
  autopar plan gpt3-1.3b --devices 32 --hardware a100-80gb-sxm --batch 512
  autopar plan gpt --model-args layers=24,hidden=2304,heads=24,vocab=51200 \\
      --devices 32 --hardware a100-80gb-sxm --batch 512 --seq 2048 --json plan.json
  autopar plan hf:./my-model --devices 8 --hardware h100-80gb-sxm --batch 64 --seq 2048 --json - | jq .degrees
  autopar plan llama3-8b --mesh dp=4,tp=8 --hardware h100-80gb-sxm --batch 256 --seq 4096
  autopar plan my_model.py:build --devices 8 --hardware my_cluster.toml --batch 64 --fix mbs=2
"""


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def usage_error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """argparse's usage errors (bad flag values, missing flags) in autopar's one error line."""
    parser.print_usage(sys.stderr)
    parser.exit(2, f"autopar: error: {message}; see `{parser.prog} --help`\n")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    keys = ", ".join(FIX_KEYS)
    p = subparsers.add_parser(
        "plan", help="plan how to train a model in parallel and print (or save) the plan",
        description="Plan DP/TP/SP for MODEL on N devices of a hardware kind, without that hardware.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    families = [name for name in PRESETS if "-" not in name]  # registry: families have no size suffix
    presets = [name for name in PRESETS if name not in families]
    p.add_argument("model", metavar="MODEL",
                   help=f"preset ({', '.join(presets)}), family ({', '.join(families)}; shape it with "
                        "--model-args), path/to/file.py:factory, or a transformers causal LM: hf:<model_type>, "
                        "hf:PATH (a save_pretrained folder) or hf:ORG/NAME (from the local HF cache)")
    p.add_argument("--devices", type=positive_int, metavar="N", help="number of devices (default: product of --mesh)")
    p.add_argument("--mesh", metavar="AXES", help="pin the mesh, e.g. dp=2,tp=4 (axes left out are 1); the same "
                                                  "as --fix with those degrees")
    p.add_argument("--hardware", required=True, metavar="NAME_OR_TOML",
                   help=f"a shipped hardware name ({', '.join(available_hardware())}) or a .toml file")
    p.add_argument("--batch", type=positive_int, required=True, metavar="B", help="global batch per optimizer step")
    p.add_argument("--seq", type=positive_int, metavar="S", help="sequence length (default: the model's)")
    p.add_argument("--model-args", default="", metavar="K=V,...", help="model config overrides, e.g. layers=24")
    p.add_argument("--json", metavar="FILE", help="also write the plan as JSON (load it with autopar.compile); "
                                                  "'-' writes it to stdout and the tables to stderr")
    p.add_argument("--fix", default="", metavar="K=V,...", help=f"pin parts of the plan; keys: {keys}")
    p.add_argument("--pin", action="append", metavar="GLOB=INTENT",
                   help=f"pin the matmuls of modules matching GLOB, e.g. 'blocks.*.mlp.*=row' (intents: "
                        f"{', '.join(PIN_INTENTS)}); the rest is still searched; repeatable")
    p.add_argument("--memory", metavar="SIZE", help="memory budget per device, e.g. 80GiB, 80GB, 512MiB "
                                                   "(default: the hardware's capacity minus its reserve)")
    p.add_argument("--dtype", choices=list(DTYPES), help="training dtype (default: bf16 on GPUs, fp32 on cpu)")
    p.add_argument("--explain", action="store_true",
                   help="also price the best alternative along each dimension (tp, ZeRO, checkpointing, "
                        "micro-batch size) as a what-if, with its delta and what moved")
    p.add_argument("--plot", metavar="FILE.png", help="draw the predicted memory per device, part by part")
    p.add_argument("--verbose", action="store_true", help="also list every node's placements; log progress")
    p.error = functools.partial(usage_error, p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    fix, devices, memory = _settle(args)
    pins = {"pins": parse_pins(args.pin)} if args.pin else {}
    model_args = parse_model_args(args.model_args)
    hardware = load_hardware(args.hardware)
    console = _console(stderr=args.json == "-")  # stdout carries only the JSON then

    def plan_with(pins_: dict, progress=None) -> Plan:
        return make_plan(args.model, devices=devices, hardware=hardware, batch=args.batch, seq=args.seq,
                         model_args=model_args, fix=pins_, memory_budget_bytes=memory,
                         dtype=DTYPES.get(args.dtype), progress=progress)

    with _planning_only():  # to the end: re-enabled, the collector would first walk the planner's whole heap
        with _progress(args.verbose) as progress:
            plan = plan_with({**planner_fix(fix), **pins}, progress)
        _report(args, plan, console, hardware, lambda f: plan_with({**f, **pins}))
    return 0


def _report(args: argparse.Namespace, plan: Plan, console, hardware, plan_with: Callable[[dict], Plan]) -> None:
    label = f"{args.model} ({args.model_args})" if args.model_args else args.model
    console.print(header(plan, label, hardware))
    render(plan, console, hardware=hardware, verbose=args.verbose)
    if args.explain:
        with _progress(True) as progress:
            progress("pricing the alternatives (one what-if plan each)")
            alternatives = explain(plan, plan_with)
        console.print(explain_table(alternatives))
    if args.plot:
        plot_memory(plan, args.plot)
        console.print(f"wrote the memory plot to {args.plot}", highlight=False)
    if args.json == "-":
        sys.stdout.write(plan.to_json() + "\n")
    elif args.json:
        _save(plan, args.json)
        console.print(f"wrote the plan to {args.json}", highlight=False)


def _settle(args: argparse.Namespace) -> tuple[dict[str, object], int, int | None]:
    """The flags that need no model: (pins from --fix and --mesh, device count, memory budget in bytes)."""
    fix = parse_fix(args.fix)
    devices = args.devices
    if args.mesh is not None:
        fix, devices = merge_mesh(parse_mesh(args.mesh), fix, devices)
    if devices is None:
        raise AutoparError("give --devices N (or --mesh, whose degrees multiply to the device count)")
    memory = parse_memory(args.memory) if args.memory is not None else None
    _check_writable(args.json)
    return fix, devices, memory


def _memory_decisions(plan: Plan) -> str:
    """'ZeRO-3, checkpointing full (blocks.0-11 none), bf16 mixed precision'."""
    zero = f"ZeRO-{plan.zero}" if plan.zero else "no ZeRO (replicated states)"
    ac = f"checkpointing {plan.ac}"
    if plan.ac_layers:
        ac += " (" + ", ".join(f"{layer} {mode}" for layer, mode in plan.ac_layers.items()) + ")"
    precision = "bf16 compute, fp32 master weights" if plan.precision == "bf16" else "fp32"
    return f"{zero}; {ac}; {precision}"


def header(plan: Plan, model_label: str, hardware: Hardware) -> Table:
    """What was asked and what was settled: model, hardware, mesh, batching, and how the planner got there."""
    s = plan.solver
    ilp = (f"{s.get('variables', '?')} variables, {s.get('constraints', '?')} constraints, "
           f"{s.get('candidates', '?')} mesh(es) solved, {s.get('status', '?')}")
    rows = [("model", f"{model_label}  ({count(plan.n_params)} params)"),
            ("hardware", f"{plan.hardware} ({hardware.device}, {hardware.devices_per_node} per node)"),
            ("devices", str(plan.devices)), ("mesh", mesh(plan.degrees, plan.axis_names)),
            ("batch × seq", f"{plan.batch} × {plan.seq}"),
            ("micro-batching", micro_batching(plan)),
            *([("pipeline", pipeline_summary(plan))] if plan.degrees.get("pp", 1) > 1 else []),
            ("memory", _memory_decisions(plan)),
            ("dtype", plan.dtype), ("planner", f"{s.get('seconds', 0):.2f} s; ILP {ilp}"),
            *(("note", note) for note in plan.notes)]
    table = Table.grid(padding=(0, 2))
    table.title, table.title_justify, table.title_style = "autopar plan", "left", "bold"
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def _console(stderr: bool = False) -> Console:
    # Off a terminal (pipes, CI logs, pytest) rich would wrap at 80 columns; 120 keeps the tables on one line each.
    stream = sys.stderr if stderr else sys.stdout
    return Console(highlight=False, stderr=stderr, width=None if stream.isatty() else 120)


@contextlib.contextmanager
def _planning_only() -> Iterator[None]:
    """While the planner runs: traces without source lines (capture.py), and no cyclic garbage collection. The
    traced graphs make the heap large and each full collection walks all of it, in this process and in every
    forked worker: ~2.5 of ~15 CPU seconds for llama3-8b on 64 H100s, against ~15 MiB more memory at the peak."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        with without_source_lines():
            yield
    finally:
        if collecting:
            gc.enable()


@contextlib.contextmanager
def _progress(verbose: bool) -> Iterator[Callable[[str], None] | None]:
    """make_plan's `progress` callback: a spinner on a terminal, log lines with --verbose, otherwise nothing, so
    piped output is exactly the report."""
    err = Console(stderr=True, highlight=False)
    if err.is_terminal:
        with err.status("planning") as status:
            yield lambda message: status.update(f"planning: {message}")
    elif verbose:
        yield lambda message: print(f"autopar: {message}", file=sys.stderr)
    else:
        yield None


def _check_writable(path: str | None) -> None:
    """Fail before planning, not after, when the plan could not be saved."""
    if path and path != "-" and not Path(path).resolve().parent.is_dir():
        raise AutoparError(f"--json {path}: directory {Path(path).resolve().parent} does not exist; create it first")


def _save(plan: Plan, path: str) -> None:
    try:
        plan.save(path)
    except OSError as err:
        raise AutoparError(f"--json {path}: cannot write the plan ({err.strerror}); choose a writable path") from err
