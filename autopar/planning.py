"""Planning without the hardware: build the model on the meta device, trace it, search. Used by `autopar plan`
and by `autopar.compile` when no plan file is given."""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Callable

import torch

from autopar.capture import Captured, capture
from autopar.cost_models import Hardware, load_hardware
from autopar.errors import MeshError, ModelError
from autopar.models import build_model, n_params, sample_inputs
from autopar.plan import Plan
from autopar.planner.cp_search import search_cp
from autopar.planner.rebatch import Rebatching
from autopar.planner.redepth import Deepening
from autopar.planner.search import SearchRequest

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def make_plan(model: str, *, devices: int, hardware: str | Hardware, batch: int, seq: int | None = None,
              model_args: dict | None = None, fix: dict | None = None, memory_budget_bytes: float | None = None,
              dtype: str | None = None, progress: Callable[[str], None] | None = None) -> Plan:
    """Plan `model` (preset, family or path.py:factory) for `devices` devices of `hardware`."""
    hw = hardware if isinstance(hardware, Hardware) else load_hardware(hardware)
    dtype = dtype or ("float32" if hw.name == "cpu" else "bfloat16")
    module, info = build_model(model, model_args or {}, seq=seq, device="meta", dtype=DTYPES[dtype])
    seq = seq or info.seq
    if seq is None:
        raise MeshError(f"model {model} does not state its sequence length; pass --seq")
    if devices < 1 or batch < 1:
        raise MeshError(f"--devices ({devices}) and --batch ({batch}) must be positive integers")

    shallow = None
    depth = getattr(info.config, "layers", None)
    if isinstance(depth, int) and depth > 2 and (model_args or {}).get("layers", depth) == depth:
        shallow = functools.lru_cache(maxsize=None)(lambda blocks: build_model(
            model, {**(model_args or {}), "layers": blocks}, seq=seq, device="meta", dtype=DTYPES[dtype])[0])
        try:  # a factory (path.py:fn) whose model states its layers need not take `layers`: then no copy
            shallow(2)
        except ModelError:
            shallow = None

    @functools.lru_cache(maxsize=None)
    def proxy(cp: int):  # a two-block copy at seq / cp, planned at the model's depth (planner/proxy.py); a fold's
        proxy_trace = Rebatching(lambda b: capture(shallow(2), sample_inputs(info, b, seq // cp, device="meta")),
                                 proxy(1)[0] if cp > 1 else None)  # batches derived like cp = 1's (rebatch.py)
        return proxy_trace, depth / 2

    @functools.lru_cache(maxsize=None)
    def traces(cp: int):  # the model at seq / cp: a cp plan is planned as its fold (planner/cp_search.py)
        def real(micro_batch: int) -> Captured:
            if progress:
                progress(f"tracing {model} at batch {micro_batch} x seq {seq // cp}")
            return capture(module, sample_inputs(info, micro_batch, seq // cp, device="meta"))
        if shallow is None:
            return functools.lru_cache(maxsize=None)(real)
        # the full trace as the proxy's repeated (planner/redepth.py), checked once on a real three-block trace
        three = lambda: capture(shallow(3), sample_inputs(info, Deepening.CHECK_BATCH, seq // cp, device="meta"))
        deepening = Deepening(proxy(cp)[0], three, real)

        @functools.lru_cache(maxsize=None)
        def trace(micro_batch: int) -> Captured:
            if progress and not deepening.holds():
                progress(f"the two-block trace does not repeat into the full model's ({deepening.why_not})")
            return deepening(depth, micro_batch)
        trace.deepening = deepening  # cp_search starts its check beside the search (Deepening.check_beside)
        return trace

    req = SearchRequest(model=model, n_params=n_params(module), hardware=hw, devices=devices, batch=batch, seq=seq,
                        fix=dict(fix or {}), memory_budget_bytes=memory_budget_bytes, dtype=dtype)
    plan = search_cp(req, traces, progress, proxy if shallow is not None else None)
    return replace(plan, notes=list(info.notes)) if info.notes else plan
