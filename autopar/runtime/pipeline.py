"""Pipeline parallelism at run time: this rank's pipeline stages, cut from the split program, run by a
torch.distributed.pipelining schedule over the mesh's pp axis (DESIGN decision 8).

The plan lists each stage's blocks: pp * v stages in pipeline order, stage c on pp rank c % pp (the loop placement
of the interleaved schedule, Narayanan et al. 2021, arXiv 2104.04473, Sec. 2.2). The split program
(codegen/blocks.py) is a chain of segments; a stage takes the segments of its blocks, the first stage also the code
before the first block (embeddings), the last the code after the last block (head, loss), and code between blocks
goes with the block before it. Stages talk only to their neighbours, so a value a later stage needs (integer
targets, rotary tables) is passed through every stage in between: a stage's inputs are the values produced before
it and used at or after it; its outputs the values produced at or before it and used after it. The first stage
takes the model's inputs, the last returns the micro-batch's loss, and the schedule's loss function is the
identity. Each rank keeps only its own stages' parameters.

A parameter used on two pp ranks (GPT's lm_head tied to wte: embedding on the first stage, head on the last)
has a copy on each; their gradients are summed over those ranks after the schedule, as Megatron-LM all-reduces the
word-embedding gradients between its first and last stage (Shoeybi et al. 2019, arXiv 1909.08053; Megatron's
`_allreduce_word_embedding_grads`), so the copies stay identical after every optimizer step.
"""

from __future__ import annotations

import functools
import itertools

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn

from autopar.codegen.emit import BLOCK_META
from autopar.codegen.regather import regather_saved
from autopar.errors import MeshError, ModelError, NotSupportedYet, PlanError

# Plan schedule -> torch schedule. Zero-bubble is ZB-H1 on the loop placement (Qi et al. 2023, arXiv 2401.10241);
# torch's ZBV variant needs the "V" placement (stage c and 2pp-1-c on one rank), which plans do not describe.
# torch.distributed.pipelining's class per schedule name, imported when a pipeline is built: planning alone
# (which imports the runtime's constants) should not pay ~1 s for pipelining and FSDP.
SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved": "ScheduleInterleaved1F1B",
             "zero-bubble": "ScheduleInterleavedZeroBubble"}
SINGLE_STAGE = ("gpipe", "1f1b")  # one stage per rank (v = 1)


def check_stages(plan, blocks: list[str]) -> None:
    """Refuse a pipeline the program cannot run: `blocks` are the model's layers in program order."""
    pp, v = plan.degrees.get("pp", 1), plan.virtual_stages
    if plan.schedule not in SCHEDULES:
        raise PlanError(f"the plan's schedule {plan.schedule!r} is not one of {', '.join(SCHEDULES)}; set "
                        "\"schedule\" in the plan file")
    if plan.schedule in SINGLE_STAGE and v != 1:
        raise PlanError(f"schedule {plan.schedule} runs one stage per rank but the plan has virtual_stages={v}; "
                        "use the interleaved or zero-bubble schedule, or v=1")
    if len(blocks) < pp * v:
        raise MeshError(f"the model has {len(blocks)} layers but pp={pp} x v={v} makes {pp * v} pipeline stages "
                        "of at least one layer each; lower pp or v")
    if len(plan.stages) != pp * v or [] in plan.stages:
        raise PlanError(f"the plan has {len(plan.stages)} pipeline stages ({plan.stages}) but pp={pp} x v={v} "
                        f"needs {pp * v} non-empty ones; re-plan")
    if [b for stage in plan.stages for b in stage] != blocks:
        raise PlanError(f"the plan's stages {plan.stages} must list the model's layers {blocks} once each, in "
                        "order; re-plan for this model")
    if plan.schedule == "zero-bubble":
        _check_zero_bubble(plan)


def _check_zero_bubble(plan) -> None:
    """Zero-bubble splits each backward into an input-gradient and a weight-gradient pass over one autograd graph
    (torch's stage_backward_input / stage_backward_weight). Two combinations do not survive that here."""
    if "selective" in {plan.ac, *plan.ac_layers.values()}:
        raise NotSupportedYet("the zero-bubble schedule with selective activation checkpointing: torch allows one "
                              "backward per selectively checkpointed region and zero-bubble runs two (input, then "
                              "weight gradients); use ac=full or ac=none, or the interleaved schedule")
    if plan.zero == 3 and plan.degrees.get("dp", 1) > 1:
        raise NotSupportedYet("the zero-bubble schedule with ZeRO-3: torch's pipelining runtime deadlocks when "
                              "FSDP reshards parameters between the input and weight passes (seen with torch 2.13 "
                              "on gloo); use zero=2, or the interleaved schedule")


class StageModule(nn.Module):
    """One pipeline stage: its segments, run in the contexts of the compiled forward (bf16 autocast where FSDP
    does not cast, sequence-parallel gathers kept as shards). The root FSDP shards under ZeRO-2/3."""

    def __init__(self, body: fx.GraphModule, index: int, autocast: bool):
        super().__init__()
        self.body, self.index, self.autocast = body, index, autocast

    def forward(self, *args):
        with torch.autocast(args[0].device.type, torch.bfloat16, enabled=self.autocast), regather_saved():
            return self.body(*args)


def local_stages(program: fx.GraphModule, plan, pp_rank: int, autocast: bool
                 ) -> tuple[nn.ModuleList, dict[str, tuple[int, ...]]]:
    """This rank's stage modules, and the parameters held on more than one pp rank -> those ranks."""
    top, n, pp = program.graph, len(plan.stages), plan.degrees["pp"]
    stage_of = _stage_of_nodes(top, plan.stages)
    loss = _loss_value(top)
    last_use = {v: max(stage_of[u] for u in v.users) for v in top.nodes if v.users}

    def live_after(c: int) -> list[fx.Node]:
        return [v for v in top.nodes if v in last_use and stage_of[v] <= c < last_use[v]]

    modules = nn.ModuleList()
    for c in range(pp_rank, n, pp):
        inputs = [v for v in top.nodes if v.op == "placeholder"] if c == 0 else live_after(c - 1)
        g = fx.Graph()
        env = {v: g.placeholder(v.name) for v in inputs}
        for node in top.nodes:
            if node.op in ("call_module", "call_function") and stage_of[node] == c:
                env[node] = g.node_copy(node, lambda v: env[v])
        g.output(env[loss] if c == n - 1 else tuple(env[v] for v in live_after(c)))
        modules.append(StageModule(fx.GraphModule(program, g, class_name=f"Stage{c}"), c, autocast))
    return modules, _shared_parameters(program, stage_of, pp)


def _stage_of_nodes(top: fx.Graph, stages: list[list[str]]) -> dict[fx.Node, int]:
    """Stage of every node of the top graph: -1 for the model's inputs; a segment outside blocks goes with the
    block before it (the first stage before any block); a segment's results with the segment."""
    where = {block: c for c, blocks in enumerate(stages) for block in blocks}
    stage_of: dict[fx.Node, int] = {}
    current = 0
    for node in top.nodes:
        if node.op == "placeholder":
            stage_of[node] = -1
        elif node.op == "call_module":
            current = where.get(node.meta.get(BLOCK_META), current)
            stage_of[node] = current
        elif node.op == "output":
            stage_of[node] = len(stages) - 1
        else:  # operator.getitem of a segment's results
            stage_of[node] = stage_of[node.args[0]]
    return stage_of


def _loss_value(top: fx.Graph) -> fx.Node:
    result = next(n for n in top.nodes if n.op == "output").args[0]
    values = result if isinstance(result, (tuple, list)) else [result]
    if len(values) != 1 or not isinstance(values[0], fx.Node):
        raise ModelError(f"pipeline parallelism needs a forward that returns the loss, one scalar tensor; this "
                         f"model returns {len(values)} values. Compute the loss inside forward (pass the targets)")
    return values[0]


def _shared_parameters(program: fx.GraphModule, stage_of: dict[fx.Node, int], pp: int
                       ) -> dict[str, tuple[int, ...]]:
    """Attributes (parameters and buffers) read by stages on more than one pp rank -> those pp ranks."""
    holders: dict[str, set[int]] = {}
    for node in program.graph.nodes:
        if node.op == "call_module":
            segment = getattr(program, node.target)
            for inner in getattr(segment, "inner", segment).graph.nodes:  # a checkpoint wrapper holds `.inner`
                if inner.op == "get_attr":
                    holders.setdefault(inner.target, set()).add(stage_of[node] % pp)
    return {name: tuple(sorted(ranks)) for name, ranks in holders.items() if len(ranks) > 1}


def _stage(*args, **kwargs):
    from torch.distributed.pipelining import PipelineStage

    return PipelineStage(*args, **kwargs)


class Pipeline:
    """Runs one optimizer step's micro-batches through this rank's stages with the plan's schedule.

    torch's PipelineStage learns the tensors stages exchange either from example tensors (static) or by running
    every stage on tensors it makes from shapes alone (dynamic), which feeds uninitialised integers to embeddings
    and losses. So the first step runs its first micro-batch forward through the stages once, passing the real
    values along (`_probe`), and builds static stages from what it saw."""

    def __init__(self, stages: nn.ModuleList, plan, mesh,
                 shared: dict[str, tuple[tuple[int, ...], torch.Tensor | None]]):
        """shared: parameter FQN -> (the pp ranks holding it, this rank's tensor or None), the same on all ranks."""
        self.modules, self.group = list(stages), mesh.get_group("pp")
        self.n, self.pp, self.m = len(plan.stages), plan.degrees["pp"], plan.num_micro_batches
        self.schedule_name = plan.schedule
        self.device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" \
            else torch.device(mesh.device_type)
        # torch's own rules for m and the stage count, checked at compile time on stages without metadata; the
        # first step builds the schedule it runs (see the class docstring)
        self._make_schedule([_stage(s, s.index, self.n, self.device, group=self.group) for s in self.modules])
        self.schedule, self.stages = None, []
        self.shared = _shared_groups(mesh, shared)

    def _make_schedule(self, stages: list):
        from torch.distributed import pipelining

        cls = getattr(pipelining, SCHEDULES[self.schedule_name])
        try:
            # Each micro-batch's loss is its own mean, so the step's gradient is the mean over m: the loss is scaled
            # by 1/m before backward (as train_step does at pp = 1), not the gradients after the schedule
            # (scale_grads), which would write into buckets the data-parallel reduction is already sending.
            return cls(stages[0] if self.schedule_name in SINGLE_STAGE else stages, self.m,
                       loss_fn=functools.partial(_stage_output_is_loss, m=self.m), scale_grads=False)
        except ValueError as e:  # 1F1B needs m >= stages, interleaved m a multiple of its rounds
            raise PlanError(f"schedule {self.schedule_name} with pp={self.pp}, {self.n} stages and "
                            f"num_micro_batches={self.m}: {str(e).rstrip('.')}; choose another num_micro_batches") \
                from None

    def step(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """Forward and backward of every micro-batch; returns their mean loss, the same on every rank."""
        if self.schedule is None:
            self.stages = self._probe([x.tensor_split(self.m)[0] for x in inputs])
            self.schedule = self._make_schedule(self.stages)
        losses: list[torch.Tensor] = []
        # The loss is computed inside the last stage; the schedule still wants a target per micro-batch.
        placeholder = torch.zeros(self.m, device=self.device)
        self.schedule.step(*inputs, target=placeholder, losses=losses, return_outputs=False)
        for stage in self.stages:
            # Backward leaves each received activation's gradient on its receive buffer (autograd accumulates into
            # leaves) after sending it; torch frees them at the next step's start (clear_runtime_states), which
            # would keep m of them per stage through the optimizer step. Every send has been waited for here.
            stage.clear_runtime_states()
        loss = torch.stack([x.detach().float() for x in losses]).sum() if losses else \
            torch.zeros((), device=self.device)
        dist.broadcast(loss, group=self.group, group_src=(self.n - 1) % self.pp)
        return loss

    def _probe(self, micro_batch: list[torch.Tensor]) -> list:
        """Static PipelineStages from one forward of `micro_batch` through the pipeline, stage by stage, the
        values sent between ranks as objects. Gradients are on, so outputs say which of them need one."""
        mine = {s.index: s for s in self.modules}
        stages, values = [], micro_batch
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            for c in range(self.n):
                if c not in mine:
                    continue
                if c > 0 and c - 1 not in mine:
                    values = self._recv(c - 1)
                inputs = [_example(v) for v in values]
                out = mine[c](*inputs)
                values = list(out) if isinstance(out, (tuple, list)) else [out]
                stages.append(_stage(mine[c], c, self.n, self.device, input_args=tuple(inputs),
                                     output_args=tuple(_example(v) for v in values), group=self.group))
                if c + 1 < self.n and c + 1 not in mine:
                    self._send(values, c + 1)
        from torch.distributed.fsdp import FSDPModule

        for module in (m for s in self.modules for m in s.modules() if isinstance(m, FSDPModule)):
            module.reshard()  # as pipelining's own metadata inference does: free what the probe gathered
        return stages

    def _send(self, values: list[torch.Tensor], stage: int) -> None:
        payload = [[(v.detach().cpu(), v.requires_grad) for v in values]]
        dist.send_object_list(payload, dst=dist.get_global_rank(self.group, stage % self.pp), group=self.group)

    def _recv(self, stage: int) -> list[torch.Tensor]:
        payload: list = [None]
        dist.recv_object_list(payload, src=dist.get_global_rank(self.group, stage % self.pp), group=self.group)
        return [v.to(self.device).requires_grad_(grad) for v, grad in payload[0]]

    def sum_shared_grads(self) -> None:
        """Add the gradients of parameters held on several pp ranks (tied embeddings) over those ranks."""
        for param, group in self.shared:
            if param.grad is not None:
                grad = param.grad
                dist.all_reduce(grad.to_local() if hasattr(grad, "to_local") else grad, group=group)

    def gather(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every pp rank's tensors by name, on every rank."""
        parts: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(parts, {k: v.cpu() for k, v in local.items()}, group=self.group)
        return {k: v for part in parts for k, v in part.items()}


def _example(value: torch.Tensor) -> torch.Tensor:
    """A detached copy that still says whether the value needs a gradient (static stage metadata keeps it)."""
    return value.detach().requires_grad_(value.requires_grad)


def _stage_output_is_loss(output: torch.Tensor, target: torch.Tensor, m: int = 1) -> torch.Tensor:
    """The last stage returns the micro-batch's mean loss; its share of the step's mean is 1/m of it."""
    return output / m if m > 1 else output


def _shared_groups(mesh, shared: dict[str, tuple[tuple[int, ...], torch.Tensor | None]]) -> list:
    """(local parameter, process group of the pp ranks holding it) for each shared parameter held here.

    new_group is collective over the world: every rank creates every group, in the same order."""
    out, me = [], dist.get_rank()
    ranks_of = mesh.mesh  # global ranks, shape (pp, dp, tp)
    for name in sorted(shared):
        holders, param = shared[name]
        for rest in itertools.product(*(range(d) for d in ranks_of.shape[1:])):
            ranks = [int(ranks_of[(p, *rest)]) for p in holders]
            group = dist.new_group(ranks)
            if me in ranks and param is not None:
                out.append((param, group))
    return out
