"""Capture: a plain nn.Module + sample inputs -> an fx graph of ATen ops with shapes.

torch.export (non-strict) gives the training IR: high-level ATen ops (linear, layer_norm, scaled_dot_product_attention,
cross_entropy_loss) with parameters lifted to placeholders, `node.meta["val"]` fake tensors and
`node.meta["nn_module_stack"]`. Where export fails we retry on a torch.fx.symbolic_trace of the model (which removes
Python-level structure export may reject); if both fail the error names the user's source line.
Sample inputs may live on the meta device, so a 175B model built on meta traces without memory.
"""

from __future__ import annotations

import contextlib
import io
import linecache
import logging
import os
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from autopar.errors import ModelError


@dataclass
class Captured:
    """The traced forward, and what its placeholders are."""

    graph: fx.Graph
    params: dict[str, str]  # placeholder name -> parameter FQN ("blocks.0.attn.q.weight")
    buffers: dict[str, str]  # placeholder name -> buffer FQN
    constants: dict[str, str]  # placeholder name -> lifted constant name
    user_inputs: list[str]  # placeholder names of the forward's tensor arguments, in order
    program: ExportedProgram
    method: str  # "torch.export" or "symbolic_trace+export"
    analysis: dict | None = None  # mesh-independent planning analysis, filled by planner.graph.build
    block_classes: list | None = None  # repeated layers found by that analysis

    def placeholder_kind(self, name: str) -> str:
        if name in self.params:
            return "param"
        if name in self.buffers or name in self.constants:
            return "buffer"
        return "input"


@contextlib.contextmanager
def without_source_lines() -> Iterator[None]:
    """Traces taken inside carry no `node.meta["stack_trace"]`: torch.fx extracts and formats the Python stack for
    every node it records (about a quarter of torch.export's time on Llama-3-8B), which only generated code and
    debugging show. Planning alone (`autopar plan`) never shows them."""
    before = torch.fx.config.do_not_emit_stack_traces
    torch.fx.config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        torch.fx.config.do_not_emit_stack_traces = before


def capture(model: torch.nn.Module, sample_inputs: tuple) -> Captured:
    """Trace `model(*sample_inputs)` to ATen; raise ModelError naming the source line if it cannot be traced."""
    try:
        with _quiet():
            return _from_program(torch.export.export(model, tuple(sample_inputs)), "torch.export")
    except Exception as export_error:  # noqa: BLE001 - any export failure falls back, then is reported
        first = export_error
    try:
        with _quiet():
            traced = fx.symbolic_trace(model)
            program = torch.export.export(traced, tuple(sample_inputs))
        return _from_program(program, "symbolic_trace+export")
    except Exception:  # noqa: BLE001 - the export error is the one that explains the problem
        raise ModelError(_explain(model, first)) from None


@contextlib.contextmanager
def _quiet():
    """torch.export logs partial graphs and guard details while it fails; our error says what matters."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _from_program(ep: ExportedProgram, method: str) -> Captured:
    ep = _functionalized(ep)
    _inline_grad_mode_regions(ep)
    _drop_trace_asserts(ep.graph)
    params, buffers, constants, user_inputs = {}, {}, {}, []
    for spec in ep.graph_signature.input_specs:
        name = spec.arg.name
        if spec.kind == InputKind.PARAMETER:
            params[name] = spec.target
        elif spec.kind == InputKind.BUFFER:
            buffers[name] = spec.target
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            constants[name] = spec.target
        elif spec.kind == InputKind.USER_INPUT:
            user_inputs.append(name)
    return Captured(ep.graph, params, buffers, constants, user_inputs, ep, method)


def _mutates(node: fx.Node) -> bool:
    target = node.target
    return node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and any(
        a.alias_info is not None and a.alias_info.is_write for a in target._schema.arguments)


def _functionalized(ep: ExportedProgram) -> ExportedProgram:
    """The program with its in-place ops rewritten out of place by torch's functionalization (an empty
    decomposition table keeps every other op as traced), when it has any.

    Each op of the generated program runs on a redistributed copy of its input where the plan moves it, so an
    in-place op would update the copy and miss the other names of the tensor (views, earlier readers), or modify
    a collective's output autograd forbids touching (issue 18). Functional, `h[..., :2].mul_(2)` becomes a
    `slice_scatter` into a new value every later reader uses. Mutations of the model's state or inputs inside
    forward (a buffer updated in place) remain graph outputs, which a step cannot write back on every plan: they
    are refused."""
    if not any(_mutates(n) for n in ep.graph.nodes):
        return ep
    with _quiet():
        ep = ep.run_decompositions({})
    kinds = {OutputKind.BUFFER_MUTATION: "buffer", OutputKind.USER_INPUT_MUTATION: "input",
             OutputKind.PARAMETER_MUTATION: "parameter"}
    for spec in ep.graph_signature.output_specs:
        if spec.kind in kinds:
            raise ModelError(f"the forward updates {kinds[spec.kind]} '{spec.target}' in place; autopar runs each "
                             "rank on its own shards and cannot write that update back on every plan. Compute the "
                             "new value out of place and return it, or update it outside the forward")
    return ep


_TRACE_ASSERTS = {torch.ops.aten._assert_tensor_metadata.default}


def _drop_trace_asserts(graph: fx.Graph) -> None:
    """`.to(dtype)` and friends leave dtype/device assertions with no output; the trace already fixed what they
    check, and a node without tensor values has no strategy to plan or emit."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _TRACE_ASSERTS and not node.users:
            graph.erase_node(node)


def _inline_grad_mode_regions(ep: ExportedProgram) -> None:
    """Inline `wrap_with_set_grad_enabled` regions (a `torch.no_grad()` inside forward, e.g. HF's rotary
    embeddings) so every op is a plain node the planner sees. A no-grad region's outputs are detached, which keeps
    autograd exactly as in eager: nothing inside is differentiated and its results are constants to backward."""
    graph, gm = ep.graph, ep.graph_module
    hop = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)
    for node in [n for n in graph.nodes if hop is not None and n.op == "call_function" and n.target is hop]:
        enabled, submod_node, *operands = node.args
        body = getattr(gm, submod_node.target).graph
        inputs = [n for n in body.nodes if n.op == "placeholder"]
        with graph.inserting_before(node):
            outs = graph.graph_copy(body, dict(zip(inputs, operands)))
            outs = outs if isinstance(outs, (tuple, list)) else (outs,)
            if not enabled:
                outs = [_detached(graph, out) for out in outs]
        for user in list(node.users):  # getitem(region, i) -> the i-th inlined output
            user.replace_all_uses_with(outs[user.args[1]])
            graph.erase_node(user)
        graph.erase_node(node)
        if not submod_node.users:
            graph.erase_node(submod_node)


def _detached(graph: fx.Graph, value: fx.Node) -> fx.Node:
    out = graph.call_function(torch.ops.aten.detach.default, (value,))
    out.meta = {**value.meta, "val": value.meta["val"].detach()} if "val" in value.meta else dict(value.meta)
    return out


def _explain(model: torch.nn.Module, error: Exception) -> str:
    where = _user_frame(error)
    kind = "data-dependent control flow" if "data-dependent" in str(error).lower() or "GuardOnDataDependent" in type(
        error).__name__ else type(error).__name__
    first_line = next((ln.strip() for ln in str(error).splitlines() if ln.strip()), "")[:200]
    at = f" at {where}" if where else ""
    return (f"cannot trace {type(model).__name__}.forward{at}: {kind} ({first_line}); torch.export and "
            "torch.fx.symbolic_trace both failed. Make the forward free of Python branches on tensor values "
            "(use torch.where / torch.cond) or pass a plan that avoids tracing")


def _user_frame(error: BaseException) -> str | None:
    """The innermost traceback frame outside torch and autopar: the user's source line."""
    best = None
    for exc in (error, error.__cause__, error.__context__):
        if exc is None or exc.__traceback__ is None:
            continue
        for frame in traceback.extract_tb(exc.__traceback__):
            path = os.path.normpath(frame.filename)
            if f"{os.sep}torch{os.sep}" in path or f"{os.sep}autopar{os.sep}" in path or path.startswith("<"):
                continue
            line = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
            best = f"{frame.filename}:{frame.lineno} `{line}`"
    return best
