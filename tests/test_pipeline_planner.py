"""Pipeline parallelism in the planner (issue 4): bubble formulas, the stage-cut dynamic programme, per-stage
memory, and the published Megatron-LM cases (Narayanan et al. 2021, ../shared/reference)."""

from __future__ import annotations

import numpy as np
import pytest

from autopar.errors import MeshError
from autopar.planner.pipeline import Pieces, bubble_fraction, in_flight, partition, rank_memory, stages_of
from autopar.planning import make_plan

# ---------------------------------------------------------------- pure functions


@pytest.mark.parametrize("p, m", [(2, 1), (2, 8), (4, 4), (4, 16), (8, 64)])
def test_bubble_is_p_minus_1_over_m(p, m):
    for schedule in ("gpipe", "1f1b"):
        assert bubble_fraction(schedule, p, m) == pytest.approx((p - 1) / m)
    for v in (2, 4):
        assert bubble_fraction("interleaved", p, m, v) == pytest.approx((p - 1) / (v * m))
        # zero-bubble fills the backward part of the bubble: only the forward third remains
        assert bubble_fraction("zero-bubble", p, m, v) == pytest.approx((p - 1) / (v * m) / 3)


def test_in_flight_micro_batches_per_schedule():
    assert in_flight("gpipe", 4, 16, 1, 0) == 16  # GPipe keeps every micro-batch until the flush
    assert [in_flight("1f1b", 4, 16, 1, r) for r in range(4)] == [4, 3, 2, 1]  # Korthikanti: first stage holds p
    assert in_flight("1f1b", 4, 2, 1, 0) == 2  # never more than there are
    # interleaved: Korthikanti's factor 1 + (p-1)/(p v) on the first rank's p layer-sets of activations
    assert in_flight("interleaved", 4, 16, 2, 0) == pytest.approx(4 * (1 + 3 / 8))


def test_partition_balances_blocks_around_the_embedding_and_head():
    blocks = 8

    def cost(embed: float, head: float, stages: int):
        return lambda s: np.arange(blocks + 1) * 1.0 + (embed if s == 0 else 0) + (head if s == stages - 1 else 0)

    assert partition(blocks, 4, cost(0, 0, 4)) == [2, 2, 2, 2]
    assert partition(blocks, 2, cost(3, 0, 2)) == [3, 5]  # the embedding costs 3 blocks: stage 0 takes fewer
    sizes = partition(blocks, 3, cost(0, 2, 3))
    assert sum(sizes) == blocks and max(n + (2 if s == 2 else 0) for s, n in enumerate(sizes)) == 4
    full = lambda s: np.where(np.arange(blocks + 1) <= 1, np.arange(blocks + 1) * 1.0, np.inf)  # noqa: E731
    assert partition(blocks, 4, full) is None  # at most one block fits per stage: no cut of 8 into 4


def test_every_stage_holds_a_block_even_when_an_empty_one_looks_cheaper():
    """A head that outweighs every block once made the DP leave the last stage empty (llama-tiny, 2 layers,
    pp=2: stages [[layers.0, layers.1], []], refused by the runtime)."""
    head_heavy = lambda s: np.arange(3) * 1.0 + (10.0 if s == 1 else 0.0)  # noqa: E731
    assert partition(2, 2, head_heavy) == [1, 1]
    assert partition(1, 2, head_heavy) is None  # fewer blocks than stages: no cut
    plan = make_plan("llama-tiny", devices=2, hardware="cpu", batch=8, fix={"pp": 2})
    assert all(plan.stages) and len(plan.stages) == 2 * plan.virtual_stages


def test_rank_memory_scales_activations_by_micro_batches_in_flight():
    pcs = Pieces(time_s={"pre": 0, "block": 1, "post": 0}, fwd_s={}, recompute_s={}, sync_s={},
                 memory={"pre": {"params": 10.0, "activations": 1.0}, "block": {"params": 100.0, "activations": 5.0},
                         "post": {"params": 20.0, "activations": 2.0}},
                 p2p_bytes=0.0, blocks=4)
    first, last = stages_of([2, 2], 2)
    assert rank_memory(pcs, [first], 2.0) == {"params": 10 + 2 * 100, "activations": 2 * (1 + 2 * 5)}
    assert rank_memory(pcs, [last], 1.0) == {"params": 20 + 2 * 100, "activations": 2 + 2 * 5}


def test_rank_memory_counts_pipelinings_receive_buffers_and_input_gradients():
    """torch's PipelineStage allocates a receive buffer per micro-batch for activations (every stage but the first)
    and for output gradients (every stage but the last); a received activation's gradient stays on its buffer
    until the step ends. The in-flight micro-batches' received activations are already saved activations."""
    pcs = Pieces(time_s={"pre": 0, "block": 1, "post": 0}, fwd_s={}, recompute_s={}, sync_s={},
                 memory={side: {"activations": 1.0} for side in ("pre", "block", "post")}, p2p_bytes=7.0, blocks=4)
    first, last = stages_of([2, 2], 2)
    m = 8
    assert rank_memory(pcs, [first], 2.0, m)["p2p_buffers"] == m * 7  # gradients in only
    assert "p2p_grads" not in rank_memory(pcs, [first], 2.0, m)  # its inputs are the model's: no gradient
    assert rank_memory(pcs, [last], 1.0, m)["p2p_buffers"] == (m - 1) * 7  # activations in, one already counted
    assert rank_memory(pcs, [last], 1.0, m)["p2p_grads"] == m * 7
    middle = stages_of([1, 1, 2], 3)[1]  # both ways; GPipe keeps all m in flight, so its inputs are activations
    assert rank_memory(pcs, [middle], float(m), m)["p2p_buffers"] == m * 7


# ---------------------------------------------------------------- the planner


GPT = dict(layers=8, hidden=512, heads=8, vocab=8192, seq=512)


def _pp(m: int, **fix):
    return make_plan("gpt", model_args=GPT, devices=2, hardware="a100-80gb-sxm", batch=16,
                     fix={"pp": 2, "mbs": 16 // m, **fix})


def test_predicted_bubble_follows_p_minus_1_over_m():
    """The bubble is the fill and drain: (p-1) stage times whatever m, so its share of the step falls as (p-1)/m
    (exactly so for balanced stages; here the head makes the last stage slower, and the bubble is the others)."""
    fractions = {}
    for m in (2, 4, 8):
        plan = _pp(m, schedule="1f1b")
        p, stage_s = plan.predicted, [s["time_s"] for s in plan.predicted.stages]
        assert p.bubble_s == pytest.approx(sum(stage_s) - max(stage_s), rel=1e-6)
        fractions[m] = p.bubble_s / (m * max(stage_s))
        assert fractions[m] == pytest.approx((2 - 1) / m * (sum(stage_s) - max(stage_s)) / max(stage_s))
    # the same law across m, up to the stage times themselves changing with the micro-batch size
    assert fractions[2] > fractions[4] > fractions[8] and 3.0 < fractions[2] / fractions[8] < 5.0
    # one micro-batch leaves each rank idle half the step; two already hide a third of that (at this size, smaller
    # micro-batches soon cost more per sample than the bubble saves: the per-op overheads of the cost model)
    assert _pp(1, schedule="1f1b").predicted.step_time_s > _pp(2, schedule="1f1b").predicted.step_time_s


def test_a_one_replica_pipeline_takes_the_sharding_of_its_flat_mesh(monkeypatch):
    """Pipeline meshes take the solved sharding of the pp = 1 mesh with their tp (search._pipelines), dp = 1 ones
    too: a placement over a dp axis of one rank is the whole tensor, so no ILP of their own is built. The mesh is
    still priced (an alternative of the plan)."""
    from autopar.planner import search as S

    monkeypatch.setattr(S, "forbid_fork", lambda: True)  # in this process, so every mesh solved is seen
    solved, real = [], S._solve_meshes
    monkeypatch.setattr(S, "_solve_meshes", lambda req, trace, meshes, *args, **kwargs:
                        solved.extend(meshes) or real(req, trace, meshes, *args, **kwargs))
    plan = make_plan("gpt", model_args=GPT, devices=4, hardware="a100-80gb-sxm", batch=16, fix={"cp": 1})
    one_replica = [a for a in plan.alternatives if a["degrees"]["pp"] > 1 and a["degrees"]["dp"] == 1]
    assert one_replica and plan.degrees["pp"] * plan.degrees["dp"] * plan.degrees["tp"] == 4
    assert not [d for d in solved if d["pp"] > 1 and d["dp"] == 1], solved
    assert [d for d in solved if d["pp"] == 1 and d["dp"] == 1]  # their donors: the flat meshes, solved


def test_plan_records_stages_and_schedule():
    plan = _pp(4, schedule="interleaved", v=2)
    assert plan.degrees["pp"] == 2 and plan.schedule == "interleaved" and plan.virtual_stages == 2
    assert len(plan.stages) == 4 and sum(plan.stages, []) == [f"blocks.{i}" for i in range(8)]
    assert [s["rank"] for s in plan.predicted.stages] == [0, 1, 0, 1]
    assert plan.predicted.bubble_s > 0 and plan.predicted.memory_peak_at.endswith("pipeline rank 0")


@pytest.mark.parametrize("fix, says", [({"pp": 16}, "more stages than its 8 blocks"),
                                       ({"pp": 1, "schedule": "1f1b"}, "needs pp > 1"),
                                       ({"pp": 2, "schedule": "1f1b", "v": 2}, "v > 1 needs interleaved")])
def test_pipeline_pins_are_checked(fix, says):
    with pytest.raises(MeshError, match=says):
        make_plan("gpt", model_args=GPT, devices=16, hardware="a100-80gb-sxm", batch=16, fix=fix)


# ---------------------------------------------------------------- published cases (Narayanan et al. 2021)


def test_162b_on_64_a100_prefers_tp8_pp8_and_the_search_picks_tp8():
    """Fig. 13: 162.2B GPT (32 layers, hidden 20480, 128 heads), 64 A100, batch 128, micro-batch 1: among
    (pp, tp) in {(2,32), (4,16), (8,8), (16,4), (32,2)} the best is tp=8 (one node); bad splits cost up to 2x."""
    args = dict(layers=32, hidden=20480, heads=128, vocab=51200, seq=2048)
    common = dict(model_args=args, devices=64, hardware="a100-80gb-sxm", batch=128)
    tput = {(pp, tp): make_plan("gpt", fix={"pp": pp, "tp": tp, "mbs": 1}, **common).predicted.tokens_per_s
            for pp, tp in [(2, 32), (4, 16), (8, 8), (16, 4), (32, 2)]}
    assert max(tput, key=tput.get) == (8, 8), tput
    assert max(tput.values()) / min(tput.values()) > 1.5  # the split matters
    assert make_plan("gpt", **common).degrees["tp"] == 8


def test_39b_on_512_a100_published_configuration_and_the_search_beats_it():
    """Table 1: 39.1B GPT (48 layers, hidden 8192, 64 heads), 512 A100, batch 1536, TP 8, PP 2, micro-batch 4,
    interleaved schedule, full recompute: 138 TFLOP/s per GPU counted with F = 96 B s l h^2 (1 + s/(6h) +
    V/(16 l h))."""
    args = dict(layers=48, hidden=8192, heads=64, vocab=51200, seq=2048)
    common = dict(model_args=args, devices=512, hardware="a100-80gb-sxm", batch=1536)
    published = make_plan("gpt", fix={"pp": 2, "tp": 8, "dp": 32, "mbs": 4, "ac": "full", "zero": 0,
                                      "schedule": "interleaved"}, **common)
    b, s, l, h, v = 1536, 2048, 48, 8192, 51200
    flops = 96 * b * s * l * h * h * (1 + s / (6 * h) + v / (16 * l * h))
    assert flops / published.predicted.step_time_s / 512 / 1e12 == pytest.approx(138, rel=0.20)
    searched = make_plan("gpt", **common)
    assert searched.predicted.tokens_per_s >= published.predicted.tokens_per_s


def test_data_parallel_reduction_hides_behind_the_last_micro_batch_backward():
    """runtime/compiled.py reduces each gradient bucket as its last micro-batch's gradient lands, during the schedule:
    on a GPU (comm_overlap 1) the reduction hides behind that micro-batch's backward through the rank's stages (2/3 of
    its forward + backward), and only the rest is exposed; ZeRO-1's broadcast after the optimizer step never hides."""
    args = dict(layers=4, hidden=1024, heads=16, vocab=51200, seq=2048)
    common = dict(model_args=args, devices=64, hardware="a100-80gb-sxm", batch=64)
    preds = {zero: make_plan("gpt", fix={"pp": 2, "dp": 32, "tp": 1, "mbs": 1, "zero": zero, "schedule": "1f1b"},
                             **common).predicted for zero in (0, 1)}
    for pred in preds.values():
        window = 2 / 3 * max(s["time_s"] for s in pred.stages)
        assert 0 < window < pred.grad_sync_s  # a case where part is hidden and part is not
        assert pred.grad_sync_exposed_s == pytest.approx(pred.grad_sync_s - window, rel=1e-9)
    after = preds[1].exposed_comm_s - preds[0].exposed_comm_s  # beside the same stage-boundary sends
    assert after == pytest.approx(0.5 * preds[1].grad_sync_s, rel=1e-6)  # an all-gather's volume, after the step
