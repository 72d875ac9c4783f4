"""Render a `Plan` for people: what was decided (mesh, per-layer placements) and what it is predicted to cost.

Per-layer tables group the traced nodes by the module they came from and fold repeated blocks (`blocks.0` ..
`blocks.23`) into one table when their decisions are identical, so a 96-layer model prints as one block, not 96.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from itertools import groupby

from rich.console import Console
from rich.table import Table

from autopar.cost_models import Hardware
from autopar.plan import NodeDecision, Plan

# Ops whose output placement tells the story of a layer; the rest (views, pointwise) follow their producers.
MAIN_OPS = {"linear", "mm", "addmm", "bmm", "matmul", "embedding", "layer_norm", "rms_norm", "cross_entropy_loss",
            "scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_efficient_attention"}
SHORT_NAMES = {"scaled_dot_product_attention": "sdpa", "_scaled_dot_product_flash_attention": "sdpa",
               "_scaled_dot_product_efficient_attention": "sdpa", "cross_entropy_loss": "cross_entropy"}
NOT_OPS = {"param", "buffer", "input"}
_INDEXED = re.compile(r"^(?P<stack>.+?)\.(?P<index>\d+)(?:\.(?P<rest>.+))?$")
_NORM = re.compile(r"(^|_)(ln|norm)|norm$", re.IGNORECASE)


@dataclass(frozen=True)
class Row:
    module: str  # relative to its block for repeated blocks, else the full path
    weights: str  # "weight S0/R\nbias S0/R"
    outputs: str  # "linear S0/S2"
    reading: str  # "data-parallel, column-parallel (tp)"


@dataclass(frozen=True)
class Group:
    title: str
    count: int  # identical instances folded into this table
    rows: list[Row]


def op_name(op: str) -> str:
    """'aten.linear.default' -> 'linear'; non-aten targets are kept whole."""
    parts = op.split(".")
    return parts[1] if parts[0] == "aten" and len(parts) > 1 else op


def short(op: str) -> str:
    name = op_name(op)
    return SHORT_NAMES.get(name, name)


def _by_module(plan: Plan) -> dict[str, list[NodeDecision]]:
    """Op decisions per module path. Modules are ordered by their first main op, so `attn` (sdpa) sits between
    `attn.v` and `attn.proj` and the loss comes last; modules that own parameters but run no op come at the end."""
    modules: dict[str, list[NodeDecision]] = {}
    first: dict[tuple[str, bool], int] = {}
    for i, d in enumerate(d for d in plan.strategies.values() if d.op not in NOT_OPS):
        modules.setdefault(d.module, []).append(d)
        first.setdefault((d.module, op_name(d.op) in MAIN_OPS), i)
    for fqn in plan.params:
        modules.setdefault(fqn.rpartition(".")[0], [])
    order = sorted(modules, key=lambda m: first.get((m, True), first.get((m, False), math.inf)))
    return {m: modules[m] for m in order}


def _weights(plan: Plan) -> dict[str, dict[str, str]]:
    """Parameter placements by owning module: {'blocks.0.attn.q': {'weight': 'S0/R', 'bias': 'S0/R'}}."""
    out: dict[str, dict[str, str]] = {}
    for fqn, placement in plan.params.items():
        owner, _, name = fqn.rpartition(".")
        out.setdefault(owner, {})[name] = placement
    return out


def _split(module: str) -> tuple[str | None, int | None, str]:
    """'blocks.3.attn.q' -> ('blocks', 3, 'attn.q'); 'lm_head' -> (None, None, 'lm_head')."""
    m = _INDEXED.match(module)
    return (m["stack"], int(m["index"]), m["rest"] or "") if m else (None, None, module)


def groups(plan: Plan) -> list[Group]:
    """Tables to print, in graph order: runs of identical blocks fold into one; other modules share a table."""
    modules, weights = _by_module(plan), _weights(plan)

    def row(label: str, module: str) -> Row | None:
        return _row(plan, label, modules[module], weights.get(module, {}), module)

    out: list[Group] = []
    for stack, run in groupby(modules, key=lambda m: _split(m)[0]):
        if stack is None:
            rows = [r for m in run if (r := row(m or "(top level)", m))]
            out.append(Group(", ".join(r.module for r in rows), 1, rows))
            continue
        instances: dict[int, list[tuple[str, str]]] = {}
        for m in run:
            _, index, rel = _split(m)
            instances.setdefault(index, []).append((rel, m))
        for span, count, members in _fold(instances, modules, weights):
            out.append(Group(f"{stack}.{span}", count, [r for rel, m in members if (r := row(rel or "(block)", m))]))
    return [g for g in out if g.rows]


def _fold(instances: dict[int, list[tuple[str, str]]], modules: dict, weights: dict) -> list[tuple[str, int, list]]:
    """Runs of consecutive block instances whose decisions (block index taken out) are identical:
    [(span, count, members of the run's first instance)], span '*' when one run covers every instance."""
    def signature(i: int) -> list:  # groupby compares keys with ==, so lists will do
        return [(rel, [(d.op, d.outs, d.ins) for d in modules[m]], sorted(weights.get(m, {}).items()))
                for rel, m in instances[i]]

    runs = [list(run) for _, run in groupby(sorted(instances), key=signature)]
    spans = ["*" if len(runs) == 1 else f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs]
    return [(span, len(r), instances[r[0]]) for span, r in zip(spans, runs)]


def _row(plan: Plan, label: str, decisions: list[NodeDecision], weights: dict[str, str], module: str) -> Row | None:
    main = [d for d in decisions if op_name(d.op) in MAIN_OPS]
    if not main and not weights:
        return None  # views, residual adds, activations: they follow their producers
    shown = main or decisions[-1:]
    outputs = "\n".join(dict.fromkeys(f"{short(d.op)} {d.outs[0]}" for d in shown if d.outs))
    used = {"weight": w for d in shown if (w := _weight_in(d))}
    # A weight stored one way and used another (gathered or sliced before the op) shows both.
    text = "\n".join(f"{name} {pl}" + (f" → {used[name]}" if used.get(name, pl) != pl else "")
                     for name, pl in weights.items())
    return Row(label, text, outputs, reading(plan, module, shown, weights))


def _weight_in(d: NodeDecision) -> str | None:
    """The placement the op consumes its weight in: aten.linear(input, weight, bias), aten.embedding(weight, idx)."""
    at = {"linear": 1, "embedding": 0}.get(op_name(d.op))
    return d.ins[at] if at is not None and len(d.ins) > at else None


def _on(placement: str, plan: Plan, axis: str) -> str | None:
    """The placement on `axis` ('S0', 'R', 'P'), or None when the axis is absent or of degree 1."""
    if axis not in plan.axis_names or plan.degrees.get(axis, 1) == 1:
        return None
    return placement.split("/")[plan.axis_names.index(axis)]


def reading(plan: Plan, module: str, decisions: list[NodeDecision], weights: dict[str, str]) -> str:
    """Name the parallelism a row shows, in the words of Megatron-LM (column/row-parallel linears, sequence
    parallelism, Korthikanti et al. 2022) where the placements match them; empty when nothing is recognisable."""
    words: list[str] = []
    for d in decisions:
        name = short(d.op)
        batch = d.ins[0] if name == "cross_entropy" and d.ins else (d.outs[0] if d.outs else "R")
        if _on(batch, plan, "dp") == "S0":
            words.append("data-parallel")
        words += _tp_words(plan, module, d, name, weights)
    if plan.degrees.get("cp", 1) > 1 and any(short(d.op) == "sdpa" for d in decisions):
        words.append(f"ring attention (cp={plan.degrees['cp']})")
    if any(_on(pl, plan, "dp") not in (None, "R") for pl in weights.values()):
        words.append("ZeRO-3-like (dp)")  # stored sharded on dp, gathered for use
    placements = [*weights.values(), *(o for d in decisions for o in d.outs)]
    if not words and all(set(pl.split("/")) == {"R"} for pl in placements):
        words.append("replicated")
    return ", ".join(dict.fromkeys(words))


def _tp_words(plan: Plan, module: str, d: NodeDecision, name: str, weights: dict[str, str]) -> list[str]:
    if name in ("linear", "embedding"):
        tp = _on(_weight_in(d) or weights.get("weight", "R"), plan, "tp")
        if name == "embedding" and tp == "S0":
            return ["vocab-parallel (tp)"]
        return {"S0": ["column-parallel (tp)"], "S1": ["row-parallel (tp)"]}.get(tp or "", [])
    out_tp = _on(d.outs[0], plan, "tp") if d.outs else None
    if (name in ("layer_norm", "rms_norm") or _NORM.search(module.rpartition(".")[2])) and out_tp == "S1":
        return ["sequence-parallel (tp)"]
    if name == "sdpa" and out_tp == "S1":
        return ["heads split (tp)"]
    if name == "cross_entropy" and d.ins and _on(d.ins[0], plan, "tp") == "S1":
        return ["vocab-parallel loss (tp)"]
    return []


def render(plan: Plan, console: Console, *, hardware: Hardware | None, verbose: bool) -> None:
    """Per-layer decisions, step time and memory with their parts, other meshes, fallbacks."""
    tables = list(map(_group_table, groups(plan)))
    tables += [_nodes_table(plan)] if verbose else []
    tables += [step_table(plan, hardware), stages_table(plan), memory_table(plan), fusions_table(plan, hardware),
               alternatives_table(plan), fallback_table(plan)]
    for table in tables:
        if table is not None:
            console.print(table)


def _table(title: str, *columns: str) -> Table:
    """A titled table; a column named '>x' is right-aligned (numbers)."""
    table = Table(title=title, title_justify="left", title_style="bold")
    for column in columns:
        table.add_column(column.lstrip(">"), justify="right" if column.startswith(">") else "left")
    return table


def _group_table(group: Group) -> Table:
    table = _table(group.title + (f" ×{group.count}" if group.count > 1 else ""),
                   "module", "weights", "activations", "reading")
    for row in group.rows:
        table.add_row(row.module, row.weights, row.outputs, row.reading)
    return table


def _nodes_table(plan: Plan) -> Table:
    table = _table("every node (--verbose)", "node", "op", "module", "inputs", "outputs")
    for name, d in plan.strategies.items():
        table.add_row(name, short(d.op), d.module, " ".join(d.ins), " ".join(d.outs))
    return table


def count(n: float) -> str:
    """1652230656 -> '1.65B'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"


def seconds(t: float) -> str:
    """Four significant digits in the largest unit that keeps the number at least 1: '134.6 ms'."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        if abs(t) >= scale:
            return f"{t / scale:.4g} {unit}" if abs(t) < 1000 * scale else f"{t / scale:,.0f} {unit}"
    return "0 s"


def gib(n: float) -> str:
    """Bytes in GiB for anything sizeable, smaller units for test-sized models."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale / 4:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def mesh(degrees: dict[str, int], axes: list[str]) -> str:
    pipeline = [f"pp={degrees['pp']}"] if degrees.get("pp", 1) > 1 else []
    shown = [f"{axis}={degrees.get(axis, 1)}" for axis in axes]
    if degrees.get("cp", 1) > 1:  # the mesh is (pp, dp, cp, tp): cp between dp and tp
        shown.insert(1 if axes and axes[0] == "dp" else 0, f"cp={degrees['cp']}")
    return " ".join(pipeline + shown)


def pipeline_summary(plan: Plan) -> str:
    """'1f1b over 2 ranks, 1 stage each: blocks 0-3 | 4-7'."""
    cuts = " | ".join(_span(layers) for layers in plan.stages)
    per = f"{plan.virtual_stages} stages each (interleaved)" if plan.virtual_stages > 1 else "1 stage each"
    return f"{plan.schedule} over {plan.degrees['pp']} ranks, {per}: blocks {cuts}"


def _span(layers: list[str]) -> str:
    idx = [int(name.rsplit(".", 1)[1]) for name in layers]
    return "none" if not idx else str(idx[0]) if len(idx) == 1 else f"{idx[0]}-{idx[-1]}"


def stages_table(plan: Plan) -> Table | None:
    """Each pipeline stage: its rank, blocks (the first also runs the embeddings, the last the head and loss),
    forward + backward of one micro-batch, and the peak memory of its rank."""
    if not plan.predicted.stages:
        return None
    table = _table("pipeline stages", ">stage", ">rank", "blocks", ">time / micro-batch", ">rank memory")
    last = len(plan.predicted.stages) - 1
    for st in plan.predicted.stages:
        extra = " + embeddings" if st["stage"] == 0 else " + head, loss" if st["stage"] == last else ""
        table.add_row(str(st["stage"]), str(st["rank"]), _span(st["layers"]) + extra, seconds(st["time_s"]),
                      gib(st["memory_bytes"]))
    return table


def micro_batching(plan: Plan) -> str:
    """Megatron's terms: global batch = micro-batch per replica x dp x micro-batches (gradient accumulation)."""
    m, dp = plan.num_micro_batches, plan.degrees.get("dp", 1)
    cp = plan.degrees.get("cp", 1)
    split = f"; each sample's sequence split over cp {cp} ranks ({plan.seq // cp} tokens each)" if cp > 1 else ""
    return (f"global batch {plan.batch} = mbs {plan.micro_batch_size} per replica × dp {dp} × {m} "
            f"micro-batch{'es' if m > 1 else ''} (gradient accumulation){split}")


def step_table(plan: Plan, hardware: Hardware | None) -> Table:
    """The step as the cost model adds it up: compute + exposed communication + exposed gradient sync + optimizer
    step (+ bubble, recompute where they exist). Collectives appear only as time; the Plan does not record the edges."""
    p, m = plan.predicted, plan.num_micro_batches
    rows = [("compute", p.compute_s, f"forward + backward, {m} micro-batch{'es' if m > 1 else ''}"),
            ("communication, exposed", p.exposed_comm_s, "stage-boundary sends" if p.stages else
             "activation resharding on the critical path"),
            ("gradient sync, exposed", p.grad_sync_exposed_s,
             f"of {seconds(p.grad_sync_s)} gradient collectives; the rest overlaps backward"),
            ("pipeline bubble", p.bubble_s, ""), ("recompute", p.recompute_s, ""),
            ("optimizer step", p.optimizer_s, "with FSDP2's per-parameter work" if plan.zero >= 2 and p.optimizer_s
             else "")]
    table = _table("predicted step time", "part", ">time", ">share", "")
    for name, t, note in rows:
        if t or note:
            table.add_row(name, seconds(t), f"{t / p.step_time_s:.1%}" if p.step_time_s else "-", note)
    peak = hardware.peak_flops_per_s.get(plan.dtype) if hardware else None
    mfu = f" ({p.tflops_per_device * 1e12 / peak:.0%} of {plan.dtype} peak)" if peak else ""
    table.add_row("step", seconds(p.step_time_s), "100%",
                  f"{p.tokens_per_s:,.0f} tokens/s, {p.tflops_per_device:.3g} TFLOP/s per device{mfu}", style="bold")
    return table


def memory_table(plan: Plan) -> Table:
    table = _table("predicted memory per device", "part", ">size", ">share")
    total = plan.predicted.memory_bytes_per_device
    for name, size in plan.predicted.memory_parts.items():
        if size:
            table.add_row(name.replace("_", " "), gib(size), f"{size / total:.1%}" if total else "-")
    table.add_row("peak", gib(total), "100%", style="bold")
    budget = plan.memory_budget_bytes
    table.add_row("budget", gib(budget), f"{total / budget:.1%} used" if budget else "-")
    if plan.predicted.memory_binding:
        table.caption, table.caption_justify = plan.predicted.memory_binding, "left"
    return table


def alternatives_table(plan: Plan) -> Table | None:
    if not plan.alternatives:
        return None
    table = _table("meshes evaluated", "mesh", "memory", ">micro-batches", ">step time", ">vs chosen",
                   ">memory/device", ">tokens/s")
    p = plan.predicted
    table.add_row(mesh(plan.degrees, plan.axis_names), f"zero={plan.zero} ac={plan.ac}", str(plan.num_micro_batches),
                  seconds(p.step_time_s), "chosen", gib(p.memory_bytes_per_device), f"{p.tokens_per_s:,.0f}",
                  style="bold")
    for alt in sorted(plan.alternatives, key=lambda a: a["step_time_s"]):
        delta = alt["step_time_s"] / p.step_time_s - 1 if p.step_time_s else 0.0
        table.add_row(mesh(alt["degrees"], plan.axis_names), f"zero={alt.get('zero', 0)} ac={alt.get('ac', 'none')}",
                      str(alt["num_micro_batches"]),
                      seconds(alt["step_time_s"]), f"{delta:+.1%}", gib(alt["memory_bytes_per_device"]),
                      f"{alt['tokens_per_s']:,.0f}")
    return table


FUSED_OPS = {"add_norm": "residual add + norm", "norm": "RMSNorm", "swiglu": "SwiGLU", "bias_gelu": "bias + GELU",
             "rotary": "rotary embedding", "cross_entropy": "head matmul + cross-entropy (chunked)"}


def fusions_table(plan: Plan, hardware: Hardware | None = None) -> Table | str:
    """The fused kernels of the program and what the planner predicts each kind saves (`--fix fuse=off` to compare);
    one line when there are none."""
    reference = hardware is not None and not hardware.triton_kernels
    if not plan.fuse and reference:
        return (f"fused kernels: off (on {hardware.name} they would run their torch reference paths, not Triton; "
                "--fix fuse=on turns them on)")
    if not plan.fuse:
        return "fused kernels: off (--fix fuse=off)"
    title = (f"fused kernels (on {hardware.name} their torch reference paths; the times below price the Triton "
             "kernels)" if reference else "fused kernels (autopar/kernels; --fix fuse=off turns them off)")
    table = _table(title, "chain", ">count", ">step time saved", ">activations saved / micro-batch")
    for f in plan.fusions:
        table.add_row(FUSED_OPS.get(f["kind"], f["kind"]), str(f["count"]), seconds(f["time_saved_s"]),
                      gib(f["memory_saved_bytes"]) if f["memory_saved_bytes"] >= 0 else
                      "-" + gib(-f["memory_saved_bytes"]))
    return table


def fallback_table(plan: Plan) -> Table | None:
    if not plan.fallback_ops:
        return None
    table = _table("ops without a sharding rule (replicated; add a rule under strategies/ to shard them)",
                   "op", ">nodes", ">time per step", ">share of step")
    step = plan.predicted.step_time_s
    for op, n in sorted(plan.fallback_ops.items(), key=lambda kv: -plan.fallback_seconds.get(kv[0], 0.0)):
        t = plan.fallback_seconds.get(op, 0.0)
        table.add_row(op, str(n), seconds(t), f"{t / step:.1%}" if step else "-")
    return table


def explain_table(alternatives) -> Table:
    """`--explain`: the best alternative along each dimension, as a what-if (`--fix` reproduces each row)."""
    table = _table("best alternative per dimension (--explain; each row is `--fix` of its pins)", "dimension",
                   "pins", ">step time", ">vs chosen", "what moved")
    for a in alternatives:
        pins = ",".join(f"{k}={v}" for k, v in a.fix.items())
        if a.step_time_s is None:
            table.add_row(a.dimension, pins, "-", "-", a.reason)
        else:
            table.add_row(a.dimension, pins, seconds(a.step_time_s), f"{a.delta:+.1%}", a.reason)
    return table
