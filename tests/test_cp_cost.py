"""Tier 0: context parallelism's prices (cost_models.comm.ring_attention_s, planner/context.py): the ring's send/recv
and how much local attention hides, the folded model's activations at 1/cp, attention at its true work under cp."""

from __future__ import annotations

import pytest

from autopar.cost_models import Link, collective_time_s, load_hardware
from autopar.cost_models.comm import ring_attention_s
from autopar.planner.context import folded
from autopar.planner.ring import ring_buffer_bytes
from autopar.planning import make_plan

H100 = load_hardware("h100-80gb-sxm")
NVLINK = H100.intra_node


def test_one_rank_has_no_ring():
    assert ring_attention_s(H100, NVLINK, 1e9, 1, 1.0, 2.0) == (0.0, 0.0)


def test_ring_moves_kv_2_cp_minus_2_times_and_dkv_cp_times():
    link = Link("x", 0.0, 1e9)
    comm, _ = ring_attention_s(H100, link, 1e6, 4, 0.0, 0.0, grad_bytes=2e6)
    assert comm == pytest.approx((2 * 3 * 1e6 + 4 * 2e6) / 1e9)


def test_without_attention_to_hide_behind_every_hop_is_exposed():
    comm, exposed = ring_attention_s(H100, NVLINK, 1e8, 8, 0.0, 0.0)
    assert exposed == pytest.approx(comm)


def test_long_attention_hides_all_but_the_last_gradient_hop():
    comm, exposed = ring_attention_s(H100, NVLINK, 1e8, 8, 10.0, 20.0, grad_bytes=2e8)
    assert exposed == pytest.approx(collective_time_s("send_recv", 2e8, 2, NVLINK))
    assert exposed < comm / 10


def _llama70b_layer(seq: int, cp: int) -> tuple[float, float]:
    """(comm, exposed) of one Llama-3-70B layer's ring (64 heads of 128 after GQA's repeat, bf16, batch 1, tp=1),
    attention at the roofline's peak x efficiency."""
    kv = 2 * 64 * (seq // cp) * 128 * 2
    flops = 4 * 64 * seq * seq / 2 * 128 / cp  # the rank's causal share
    fwd = flops / (H100.peak_flops_per_s["bfloat16"] * H100.matmul_efficiency)
    return ring_attention_s(H100, NVLINK, kv, cp, fwd, 2 * fwd, 2 * kv)


def test_long_sequences_hide_the_ring_and_short_ones_do_not():
    """Attention grows with S^2 / cp, the hop with S / cp: at 512k tokens the ring hides behind attention on
    NVLink; at 2k it cannot."""
    comm, exposed = _llama70b_layer(524288, 8)
    assert exposed < 0.2 * comm
    comm, exposed = _llama70b_layer(2048, 8)
    assert exposed > 0.5 * comm


def test_fold_divides_the_sequence_and_multiplies_the_batch():
    assert folded(2, 64, 4) == (8, 16)
    with pytest.raises(ValueError, match="2\\*cp=8"):
        folded(1, 60, 4)


def test_folded_plan_holds_activations_divided_by_cp():
    """A cp=2 rank's activations (the folded model on dp=2) are half of one rank's at the whole sequence."""
    fix = {"tp": 1, "zero": 0, "ac": "none"}
    whole = make_plan("gpt-tiny", devices=1, hardware="cpu", batch=32, seq=32, fix=fix)
    b, s = folded(32, 32, 2)  # a batch at which activations set the peak (backward start)
    half = make_plan("gpt-tiny", devices=2, hardware="cpu", batch=b, seq=s, fix={**fix, "dp": 2})
    act = [p.predicted.memory_parts["activations"] + p.predicted.memory_parts["inputs"] for p in (whole, half)]
    assert act[1] == pytest.approx(act[0] / 2, rel=0.02), act


def test_cp_prices_attention_at_its_true_work_plus_the_exposed_ring():
    from dataclasses import replace

    from autopar.capture import capture
    from autopar.models import build_model, sample_inputs
    from autopar.planner.footprint import ring_buffer_terms
    from autopar.planner.ring import is_attention
    from autopar.planner.cost import node_cost
    from autopar.planner.search import SearchRequest
    from autopar.planner.space import graph_for as _graph

    model, info = build_model("gpt-tiny", {}, device="meta")
    b, s = folded(4, 32, 2)
    captured = capture(model, sample_inputs(info, b, s, device="meta"))
    cpu = load_hardware("cpu")
    req = SearchRequest(model="gpt-tiny", n_params=0, hardware=cpu, devices=2, batch=b, seq=s, cp=2)
    pg, ctx = _graph(req, captured, {"pp": 1, "dp": 2, "tp": 1})
    assert ctx.cp == 2 and ctx.cp_link is not None
    attn = next(p for p in pg.owners() if is_attention(p))
    strategy = attn.strategies[0]
    one, two = node_cost(replace(ctx, cp=1), attn, strategy), node_cost(ctx, attn, strategy)
    assert two.fwd_s > 2 * one.fwd_s and two.bwd_s > 2 * one.bwd_s  # cp x the work, plus exposed hops
    assert two.activation_bytes == one.activation_bytes  # the ring saves what the local kernel saves
    other = next(p for p in pg.owners() if p.kind == "op" and not is_attention(p))
    assert node_cost(ctx, other, other.strategies[0]) == node_cost(replace(ctx, cp=1), other, other.strategies[0])
    # gpt-tiny: 4 heads x 8 dims; replicated strategy: the folded micro-batch of 8 samples x 16 tokens
    kv = 2 * 8 * 4 * 16 * 8 * 4
    (term,) = ring_buffer_terms(pg, ctx)
    assert term.values[0] == ring_buffer_bytes(kv, 4) == 6 * kv  # fp32: K/V, dK/dV, each with its copy; dQ; grads


def test_the_ring_adds_nothing_to_a_peak_made_by_the_gradient_bucket():
    """ZeRO-0 at a small batch: the peak is the end of backward, where the gradients are flattened into a bucket
    after the last ring has run; cp=2 x dp=2 then needs what dp=4 needs at the same tokens per rank (measured so
    by bench_memory). At a larger batch activations make the peak, and there the ring's buffers count."""
    fix = {"tp": 1, "zero": 0, "ac": "none"}
    kw = dict(devices=4, hardware="cpu", seq=64, model_args={"seq": 64})
    cp = make_plan("gpt-tiny", **kw, batch=4, fix={**fix, "dp": 2, "cp": 2})
    dp = make_plan("gpt-tiny", **kw, batch=4, fix={**fix, "dp": 4})
    assert cp.predicted.memory_parts["buckets"] > 0  # the end of backward
    assert cp.predicted.memory_bytes_per_device == pytest.approx(dp.predicted.memory_bytes_per_device, rel=1e-3)
    large = make_plan("gpt-tiny", **kw, batch=8, fix={**fix, "dp": 2, "cp": 2})
    assert large.predicted.memory_parts["activations"] > 0 and large.predicted.memory_parts["ring_buffers"] > 0
