"""The search is never beaten by its own what-ifs (DESIGN decision 12): on 8B- and 70B-class GPT and Llama shapes at
tp = 2, 4, 8 on H100s, the free layout's predicted step time is at most that of Megatron's layout with sequence
parallelism, without it, and of random per-module pins, all priced by the same predictor (predict.py); and where
sequence parallelism is the cheaper of Megatron's two, the free layout shards the norms on the sequence dim.

Shapes are real widths at one block (the property concerns one layer's layout; repeated blocks share it), with
one micro-batch of 2 x 2048 tokens, degrees pinned (dp = 1)."""

from __future__ import annotations

import random

import pytest
import torch

from autopar.capture import capture
from autopar.cost_models import axis_links, load_hardware
from autopar.models import build_model, sample_inputs
from autopar.placement import R, S
from autopar.planner.candidate import Candidate, SearchRequest
from autopar.planner.cost import CostContext
from autopar.planner.graph import build
from autopar.planner.ilp import MIP_GAP, ShardingILP
from autopar.planner.memory import MemoryConfig
from autopar.planner.pins import pinned_strategies
from autopar.planner.predict import predict

pytestmark = pytest.mark.filterwarnings("ignore:Constructing LpVariable:DeprecationWarning")

H100 = load_hardware("h100-80gb-sxm")
BATCH, SEQ = 2, 2048
RANDOM_PINS = 20
# family -> (model args of the 8B and 70B classes, Megatron's pins: column then row, Shoeybi et al. 2019 Sec. 3)
MODELS = {
    "gpt": ({"8b": {"hidden": 4096, "heads": 32, "vocab": 50304}, "70b": {"hidden": 8192, "heads": 64, "vocab": 50304}},
            {"blocks.*.attn.q": "column", "blocks.*.attn.k": "column", "blocks.*.attn.v": "column",
             "blocks.*.attn.proj": "row", "blocks.*.mlp.fc": "column", "blocks.*.mlp.proj": "row"},
            ("ln1", "ln2")),
    "llama": ({"8b": {"hidden": 4096, "heads": 32, "kv_heads": 8, "intermediate": 14336, "vocab": 128256},
               "70b": {"hidden": 8192, "heads": 64, "kv_heads": 8, "intermediate": 28672, "vocab": 128256}},
              {"layers.*.attn.q": "column", "layers.*.attn.k": "column", "layers.*.attn.v": "column",
               "layers.*.attn.o": "row", "layers.*.ffn.w1": "column", "layers.*.ffn.w3": "column",
               "layers.*.ffn.w2": "row"},
              ("attn_norm", "ffn_norm")),
}


@pytest.fixture(scope="module", params=[(f, s) for f in MODELS for s in ("8b", "70b")], ids=lambda p: "-".join(p))
def captured(request):
    family, size = request.param
    args = {**MODELS[family][0][size], "layers": 1, "seq": SEQ}
    model, info = build_model(family, args, device="meta", dtype=torch.bfloat16)
    return family, capture(model, sample_inputs(info, BATCH, SEQ, device="meta"))


def _predicted(pg, ctx, tp: int, pinned: dict[str, list[int]]) -> tuple[float, dict[str, int]]:
    sol = ShardingILP(pg, ctx, H100.memory_bytes - H100.memory_reserve_bytes, 1, pinned).solve()
    assert sol is not None and sol.status == "Optimal"
    req = SearchRequest(model="what-if", n_params=0, hardware=H100, devices=tp, batch=BATCH, seq=SEQ,
                        dtype="bfloat16")
    return predict(req, Candidate({"pp": 1, "dp": 1, "tp": tp}, 1, pg, ctx, sol)).step_time_s, sol.choice


def _norm_ops(pg, norms) -> list[str]:
    """Owners of the norms' element-wise ops and of the residual adds: the sequence-parallel region."""
    return [p.node.name for p in pg.owners() if p.kind == "op" and p.block is not None and
            (p.module.rsplit(".", 1)[-1] in norms or p.module == p.block)]


def _with_region(pg, pinned: dict[str, list[int]], names: list[str], placement) -> dict[str, list[int]]:
    """`pinned` plus: the region's nodes output `placement` on tp (where they can)."""
    out = dict(pinned)
    for name in names:
        keep = [k for k, s in enumerate(pg.nodes[name].strategies) if all(o[1] == placement for o in s.outs)]
        if keep:
            out[name] = keep
    return out


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_free_layout_is_never_beaten_by_a_what_if(captured, tp):
    family, cap = captured
    _, pins, norms = MODELS[family]
    pg = build(cap, (1, tp), ("dp", "tp"))
    links = axis_links(H100, [("dp", 1), ("tp", tp)])
    ctx = CostContext(H100, (1, tp), (links["dp"], links["tp"]), MemoryConfig(0, "none", "bf16"), 1)
    free, choice = _predicted(pg, ctx, tp, {})
    bound = free / (1 + MIP_GAP)
    megatron = pinned_strategies(pg, pins)
    region = _norm_ops(pg, norms)
    sp, _ = _predicted(pg, ctx, tp, _with_region(pg, megatron, region, S(1)))
    no_sp, _ = _predicted(pg, ctx, tp, _with_region(pg, megatron, region, R))
    assert bound <= sp and bound <= no_sp, (free, sp, no_sp)
    rng = random.Random(tp)
    for _ in range(RANDOM_PINS):
        drawn = {glob: rng.choice(("column", "row", "tp")) for glob in pins if rng.random() < 0.7}
        pinned = pinned_strategies(pg, drawn)
        if pinned is None:
            continue
        what_if, _ = _predicted(pg, ctx, tp, pinned)
        assert bound <= what_if, (drawn, free, what_if)
    outs = {pg.nodes[n].strategies[choice[n]].outs[0][1] for n in region}
    if sp < no_sp:  # sequence parallelism pays: the free layout is sequence-parallel, or the predictor prices it
        # at least as fast as Megatron-SP (asserted above); it never keeps the norms replicated
        assert outs != {R}, (free, sp, no_sp, outs)
