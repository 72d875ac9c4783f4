"""`autopar.compile`: plan (or load a plan), generate this rank's program, shard the parameters, return a module
that trains with any torch optimizer under torchrun."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from autopar.capture import Captured, capture
from autopar.codegen import context
from autopar.codegen.collectives import AxisComm
from autopar.codegen.emit import emit
from autopar.codegen.random_ops import check_random_ops
from autopar.codegen.fuse import fuse as fuse_chains
from autopar.cost_models import load_hardware
from autopar.errors import MeshError, PlanError
from autopar.runtime.pipeline import check_stages
from autopar.placement import parse
from autopar.plan import Plan
from autopar.planner.graph import build
from autopar.planner.predict import fingerprint
from autopar.planner.context import cp_analysis
from autopar.planner.cp_search import search_cp
from autopar.planner.search import AXES, SearchRequest
from autopar.runtime.compiled import CompiledModel
from autopar.strategies import Strategy
from autopar.verify import verify_first_step


def compile(model: nn.Module, mesh: DeviceMesh | None = None, *, sample_inputs: tuple, plan: str | Path | Plan | None = None,
            fix: dict | None = None, hardware: str | None = None, memory_budget_bytes: float | None = None,
            verify: bool = False, fuse: bool | None = None) -> CompiledModel:
    """Parallelise `model` over the ranks of the current process group.

    sample_inputs: the forward's arguments at the training batch shape (the global batch; every rank passes the
    same global batch at run time and works on its share; the model is captured at the plan's micro-batch, the
    first samples of each input). mesh: a DeviceMesh with axes named from ("dp", "tp"), or ("pp", "dp", "tp") with
    pp outermost, pins the degrees; None lets the planner choose them for the world size. plan: a plan file or
    Plan to run instead of searching. fix: pins such as {"dp": 2, "tp": 2} (or {"pp": 2, "schedule": "1f1b"}).
    verify: run the parallel program's first step on the first micro-batch of sample_inputs beside `model` run
    eagerly, and raise VerifyError naming the first parameter whose gradient differs (autopar/verify.py).
    fuse: fused kernels (autopar/kernels) in the generated program; None follows the plan (searched plans fuse
    where the hardware runs them as Triton: not on "cpu", the default hardware without CUDA), True or False turns
    them on or off (and plans so). Train with `compiled.train_step(*batch)`.
    """
    if not dist.is_initialized():
        raise MeshError("torch.distributed is not initialised; run under torchrun (or call "
                        "torch.distributed.init_process_group) before autopar.compile")
    world = dist.get_world_size()
    sample_inputs = tuple(sample_inputs)
    pins = dict(fix or {})
    if fuse is not None:
        pins["fuse"] = fuse
    if mesh is not None:
        pins.update(_mesh_degrees(mesh, world))
    traces = functools.lru_cache(maxsize=None)(lambda cp: _tracer(model, sample_inputs, cp))
    if plan is None:
        plan = _search_on_rank0(model, traces, sample_inputs, world, pins, hardware, memory_budget_bytes)
    elif not isinstance(plan, Plan):
        plan = Plan.load(plan)
    _check_pins(plan, pins)
    _check_tp_inside_a_node(plan)
    planned, cp = plan, plan.degrees.get("cp", 1)
    if cp > 1:  # run the fold: a data-parallel program over dp x cp (codegen/context.py)
        if mesh is not None:
            raise MeshError("a context-parallel plan (cp > 1) lays out its own (pp, dp, cp, tp) mesh; pass mesh=None")
        plan = dataclasses.replace(plan, degrees={**plan.degrees, "dp": plan.degrees["dp"] * cp, "cp": 1},
                                   batch=plan.batch * cp, seq=plan.seq // cp)
    trace = traces(cp)
    pp = plan.degrees.get("pp", 1)
    degrees = tuple(plan.degrees[a] for a in AXES)
    if pp * math.prod(degrees) != world:
        raise MeshError(f"the plan's mesh {_fmt(plan.degrees)} has {pp * math.prod(degrees)} devices but the world "
                        f"size is {world}; launch with --nproc_per_node {pp * math.prod(degrees)} or re-plan")
    captured = trace(plan.micro_batch_size * plan.degrees["dp"])  # the plan's graph runs one micro-step
    pg = build(captured, degrees, AXES)
    if fingerprint(pg) != plan.graph_fingerprint:
        raise PlanError(f"the plan was made for another model or input shape ({plan.model}, batch {plan.batch} x seq "
                        f"{plan.seq}: fingerprint {plan.graph_fingerprint}; this model and sample inputs trace to "
                        f"{fingerprint(pg)}); re-plan for this model and batch")
    if pp > 1:
        check_stages(plan, list(dict.fromkeys(p.block for p in pg.nodes.values() if p.block)))
    check_random_ops(pg, plan.num_micro_batches, pp > 1)
    names = (("pp",) if pp > 1 else ()) + AXES  # the pipeline axis outermost: stages talk least often
    mesh = mesh or init_device_mesh(_device_type(), ((pp,) if pp > 1 else ()) + degrees, mesh_dim_names=names)
    coords = tuple(mesh.get_local_rank(a) for a in AXES)
    decisions = {name: Strategy(outs=tuple(parse(o) for o in d.outs), ins=tuple(parse(i) for i in d.ins))
                 for name, d in plan.strategies.items()}
    fsdp_axes = (AXES.index("dp"),) if plan.zero >= 2 and plan.degrees["dp"] > 1 else None  # FSDP owns dp
    emitted = emit(pg, decisions, coords, fsdp_axes)
    if pins.get("fuse", plan.fuse):  # codegen/fuse.py: the chains planner/fusion.py priced
        fuse_chains(emitted.graph, pg, emitted.values)
    root, placements, aliases = _shard_parameters(model, captured, pg, decisions, mesh, coords)
    if cp > 1:
        why, sources = cp_analysis(trace(1), traces(1)(1))
        if why:
            raise PlanError(f"the plan has cp={cp}, but {why}; re-plan with cp=1")
        context.rewrite(emitted, captured, sources, planned.seq, cp, coords[0] % cp)
        root.comm.cp = context.RingComm(context.cp_groups(world, pp, planned.degrees["dp"], cp, degrees[1]))
    deferred = {captured.params[name]: axes for name, axes in emitted.deferred_sync.items()}
    compiled = CompiledModel(root, emitted.graph, plan, mesh, captured.program.call_spec.out_spec, placements,
                             deferred, aliases)
    if cp > 1:  # the global batch as the fold's: each sample's sequence cut among its cp ranks
        compiled.planned = planned
        compiled.fold_inputs = functools.partial(context.fold_inputs, seq=planned.seq, cp=cp)
    if verify:
        verify_first_step(compiled, model, sample_inputs)
    return compiled


def _tracer(model: nn.Module, sample_inputs: tuple, cp: int = 1) -> Callable[[int], Captured]:
    """trace(micro_batch): the model captured on the first `micro_batch` samples of every input (batch-first);
    with cp > 1, of the folded inputs (batch x cp samples of seq / cp, codegen/context.py)."""
    if cp > 1:
        seq = sample_inputs[0].shape[1] if sample_inputs and sample_inputs[0].dim() > 1 else 1
        if seq % (2 * cp):
            raise PlanError(f"cp={cp} needs a sequence divisible by 2 x cp = {2 * cp}; the sample inputs have {seq}")
        sample_inputs = tuple(context.fold_inputs(list(sample_inputs), seq, cp, 1))

    @functools.lru_cache(maxsize=None)
    def trace(micro_batch: int) -> Captured:
        batch = _batch_of(sample_inputs)
        if micro_batch > batch or batch % micro_batch:
            raise PlanError(f"the plan's micro_batch_size {micro_batch} does not divide the batch {batch} of "
                            "sample_inputs; pass sample inputs at the plan's global batch")
        return capture(model, tuple(x[:micro_batch] if isinstance(x, torch.Tensor) and x.dim() else x
                                    for x in sample_inputs))
    return trace


def _batch_of(sample_inputs: tuple) -> int:
    return sample_inputs[0].shape[0] if sample_inputs and sample_inputs[0].dim() else 1


def _search_on_rank0(*args) -> Plan:
    """Rank 0 plans and every rank runs that plan: solvers may break ties differently from run to run, and ranks
    executing different plans would issue mismatched collectives."""
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = _search(*args)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            box[0] = e
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]


def _search(model, traces, sample_inputs, world, pins, hardware, budget) -> Plan:
    batch = _batch_of(sample_inputs)
    seq = sample_inputs[0].shape[1] if sample_inputs and sample_inputs[0].dim() > 1 else 1
    hw = load_hardware(hardware or ("h100-80gb-sxm" if torch.cuda.is_available() else "cpu"))
    if _ranks_per_node():  # the launch's nodes, not the hardware file's: tp is searched inside them
        hw = dataclasses.replace(hw, devices_per_node=_ranks_per_node())
    if int(pins.get("pp", 1)) <= 1 and "mbs" not in pins:  # without a pipeline: the whole batch at once
        pins["num_micro_batches"] = 1
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    req = SearchRequest(model=type(model).__name__, n_params=n, hardware=hw, devices=world, batch=batch, seq=seq,
                        fix=pins, memory_budget_bytes=budget,
                        dtype=str(next(model.parameters()).dtype).removeprefix("torch."))
    return search_cp(req, traces)


def _mesh_degrees(mesh: DeviceMesh, world: int) -> dict[str, int]:
    names = mesh.mesh_dim_names or ()
    if not names or any(n not in AXES + ("pp",) for n in names):
        raise MeshError(f"mesh axes {names} must be named from {AXES + ('pp',)}, e.g. "
                        "init_device_mesh('cpu', (2, 2), mesh_dim_names=('dp', 'tp'))")
    if mesh.size() != world:
        raise MeshError(f"the mesh has {mesh.size()} devices but the world size is {world}; make the mesh cover "
                        "every rank")
    axes = AXES + (("pp",) if "pp" in names else ())  # pp is pinned only by a mesh that names it
    return {a: (mesh.size(names.index(a)) if a in names else 1) for a in axes}


def _device_type() -> str:
    return "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"


def _check_pins(plan: Plan, pins: dict) -> None:
    """A plan file is run as it is: degrees pinned by `fix` or `mesh` that it contradicts are an error, not ignored."""
    clash = {a: pins[a] for a in AXES + ("pp",) if a in pins and pins[a] != plan.degrees.get(a, 1)}
    if clash:
        asked = ", ".join(f"{a}={d}" for a, d in clash.items())
        raise PlanError(f"the plan's mesh {_fmt(plan.degrees)} contradicts {asked} given by fix/mesh; drop those "
                        "pins to run the plan, or re-plan with them")


def _ranks_per_node() -> int:
    """Ranks on this node as the launcher reports them (torchrun's LOCAL_WORLD_SIZE); 0 when not launched so."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)


def _check_tp_inside_a_node(plan: Plan) -> None:
    """Tensor parallelism's per-layer collectives need the fastest links: a tp group never spans nodes. The mesh
    puts tp innermost and torchrun numbers each node's ranks contiguously, so tp dividing the node is enough."""
    local, tp = _ranks_per_node(), plan.degrees.get("tp", 1)
    if local and local % tp:
        raise MeshError(f"the plan's tp={tp} would span nodes: the launcher reports {local} ranks per node "
                        f"(LOCAL_WORLD_SIZE) and tensor parallelism stays inside a node; use a tp that divides "
                        f"{local}, or launch more ranks per node")


def _fmt(degrees: dict) -> str:
    return " x ".join(f"{a}={degrees[a]}" for a in ("pp",) + AXES if a in degrees and (a != "pp" or degrees[a] > 1))


def _shard_parameters(model: nn.Module, captured: Captured, pg, decisions, mesh, coords):
    """Root module with this rank's shards under the original module paths, plus the comm modules."""
    root = nn.Module()
    root.comm = nn.Module()
    for axis in AXES:
        setattr(root.comm, axis, AxisComm(axis, mesh.get_group(axis)))
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    state.update(captured.program.constants)
    placements, aliases, by_tensor = {}, {}, {}
    for name, p in pg.nodes.items():
        if p.kind not in ("param", "buffer") or p.fqn is None:
            continue
        full = state[p.fqn]
        if not p.node.users:  # a second name of a tied tensor: point it at the shard the graph uses
            aliases[p.fqn] = id(full)
            continue
        pl = decisions[name].outs[0]
        local = full.detach()
        for axis, place in enumerate(pl):
            if place.is_shard:
                local = local.chunk(pg.degrees[axis], place.dim)[coords[axis]]
        owner, attr = _owner(root, p.fqn)
        if p.kind == "param":
            owner.register_parameter(attr, nn.Parameter(local.clone(), requires_grad=full.requires_grad))
            placements[p.fqn] = pl
            by_tensor[id(full)] = p.fqn
        else:
            owner.register_buffer(attr, local.clone())
    aliases = {fqn: by_tensor[t] for fqn, t in aliases.items() if t in by_tensor}
    return root, placements, aliases


def _owner(root: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    *path, attr = fqn.split(".")
    mod = root
    for part in path:
        if not hasattr(mod, part):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    return mod, attr
