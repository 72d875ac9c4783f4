"""Context parallelism (cp) in the planner: `--fix cp=N`, the plan JSON, the search choosing cp for one long
sample and not at 8k tokens, `--explain`'s cp alternative, and the refusal of models cp cannot run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from autopar.capture import capture
from autopar.errors import MeshError, PlanError
from autopar.explain import candidates, explain
from autopar.plan import Plan
from autopar.planner.context import cp_analysis
from autopar.planning import make_plan

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(devices=2, hardware="cpu", batch=4, seq=64, model_args={"seq": 64})


@pytest.fixture(scope="module")
def cp2():
    return make_plan("gpt-tiny", **TINY, fix={"cp": 2})


def test_fix_cp_plans_the_sequence_split_and_the_json_records_it(cp2):
    assert cp2.degrees == {"dp": 1, "tp": 1, "pp": 1, "cp": 2}
    assert (cp2.batch, cp2.seq, cp2.micro_batch_size) == (4, 64, 4)  # cp does not multiply the batch
    assert cp2.predicted.memory_parts["ring_buffers"] > 0
    again = Plan.from_dict(json.loads(cp2.to_json()))
    assert again.degrees["cp"] == 2 and again.schema_version == 3


def test_cp_halves_the_activations_and_prices_the_ring():
    """dp=2 against cp=2 on the same 2 ranks: cp holds each sample's half sequence (activations about the same
    as dp's half batch), but pays for the ring: more time, plus ring buffers."""
    dp2 = make_plan("gpt-tiny", **TINY, fix={"dp": 2, "zero": 0, "ac": "none"})
    cp2 = make_plan("gpt-tiny", **TINY, fix={"cp": 2, "zero": 0, "ac": "none"})
    act = [p.predicted.memory_parts["activations"] for p in (dp2, cp2)]
    assert act[1] == pytest.approx(act[0], rel=0.05)
    assert cp2.predicted.compute_s > dp2.predicted.compute_s


def test_schema_2_plans_still_load(cp2):
    old = json.loads(make_plan("gpt-tiny", **TINY, fix={"dp": 2}).to_json())
    old["schema_version"] = 2
    assert Plan.from_dict(old).degrees.get("cp", 1) == 1


def test_explain_prices_the_best_cp_1_plan(cp2):
    assert {"cp": 1} in candidates(cp2)["cp"]
    rows = explain(cp2, lambda fix: make_plan("gpt-tiny", **TINY, fix=fix))
    (row,) = [r for r in rows if r.dimension == "cp"]
    assert row.step_time_s is not None and row.delta < 0  # at 64 tokens the ring does not pay: cp=1 is faster


@pytest.mark.parametrize("fix, error, says", [
    ({"cp": 4}, MeshError, "seq 60 is not divisible by 2 x cp = 8"),
    ({"cp": 2, "dp": 2}, MeshError, "does not divide 2 devices"),
], ids=["seq", "devices"])
def test_fix_cp_that_cannot_be(fix, error, says):
    with pytest.raises(error, match=re.escape(says)):
        make_plan("gpt-tiny", **{**TINY, "seq": 60 if fix["cp"] == 4 else 64}, fix=fix)


def test_manual_attention_is_refused():
    """softmax(QK^T) with a mask built from torch.ones(s, s): a ring cannot replace it; never a wrong program."""
    with pytest.raises(PlanError, match="sequence x sequence tensor from the input"):
        make_plan(f"{ROOT}/tests/tiny_models.py:eager_gpt", **{**TINY, "model_args": {}}, fix={"cp": 2})


@pytest.mark.slow
def test_one_long_sample_on_64_gpus_chooses_cp():
    """Llama-3-70B, 1 x 524288 tokens on 64 H100: dp must be 1 and tp stops at a node, so without cp only a
    pipeline could fill the devices, which one sample cannot (no cp=1 mesh exists)."""
    plan = make_plan("llama3-70b", devices=64, hardware="h100-80gb-sxm", batch=1, seq=524288,
                     model_args={"seq": 524288})
    assert plan.degrees["cp"] > 1 and plan.degrees["dp"] == 1
    assert plan.degrees["cp"] * plan.degrees["tp"] * plan.degrees.get("pp", 1) == 64
    assert "batch 1 cannot fill 64 devices" in plan.solver["cp_refused"]["1"]
    assert plan.predicted.memory_bytes_per_device <= plan.memory_budget_bytes


@pytest.mark.slow
def test_8k_tokens_do_not_choose_cp():
    plan = make_plan("llama3-8b", devices=64, hardware="h100-80gb-sxm", batch=64, seq=8192)
    assert plan.degrees["cp"] == 1
    assert 2 in plan.solver["cp_searched"]  # cp=2 was priced and lost
    assert any(a["degrees"].get("cp", 1) == 2 for a in plan.alternatives)


class _Attn(torch.nn.Module):
    """One attention over embedded tokens, in the variant `kind`."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.emb, self.head = kind, torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16)

    def forward(self, tokens):
        x = self.emb(tokens).unsqueeze(1)  # [b, 1 head, s, 8]
        s = tokens.shape[1]
        if self.kind == "causal":
            y = F.scaled_dot_product_attention(x, x, x, is_causal=True)
        elif self.kind == "bidirectional":
            y = F.scaled_dot_product_attention(x, x, x)
        elif self.kind == "mask":
            y = F.scaled_dot_product_attention(x, x, x, attn_mask=torch.ones(s, s, dtype=torch.bool).tril())
        else:  # no attention at all
            y = x
        return self.head(y.squeeze(1)).sum()


@pytest.mark.parametrize("kind, says", [("causal", None), ("bidirectional", "is not causal"),
                                        ("mask", "(top level) builds a tensor of the sequence's length without the input"),
                                        ("none", "no F.scaled_dot_product_attention")])
def test_cp_analysis_accepts_only_causal_sdpa(kind, says):
    model, tokens = _Attn(kind), torch.randint(0, 16, (2, 32))
    why, _ = cp_analysis(capture(model, (tokens[:, :16],)), capture(model, (tokens,)))
    assert why is None if says is None else says in why, why


def test_pruned_cp_search_finds_the_best_of_cp_1_and_the_pinned_cp(monkeypatch):
    """Unpinned, cp = 1 is planned first and a cp fold is cut short (micro-batches a cp = 1 plan matches token for
    token, and a best candidate that cannot beat cp = 1: search.py `Outpriced`); the plan is still the better of the
    two full searches, cp pinned to 1 and to 2."""
    import autopar.planner.cp_search as cp_search

    monkeypatch.setattr(cp_search, "MIN_LOCAL_SEQ", 16)  # search cp at 64 tokens, as it would at 8k
    for hw in ("cpu", "h100-80gb-sxm"):
        args = {**TINY, "hardware": hw}
        auto = make_plan("gpt-tiny", **args)
        assert auto.solver["cp_searched"] == [1, 2]
        pinned = [make_plan("gpt-tiny", **args, fix={"cp": cp}) for cp in (1, 2)]
        best = min(pinned, key=lambda p: p.predicted.step_time_s)
        assert auto.predicted.step_time_s == pytest.approx(best.predicted.step_time_s, rel=1e-9)
        assert auto.degrees == best.degrees


@pytest.mark.parametrize("hardware, batch", [("cpu", 4), ("h100-80gb-sxm", 4), ("h100-80gb-sxm", 1)])
def test_folds_searched_beside_cp_1_decide_as_one_after_the_other(monkeypatch, hardware, batch):
    """Where forking is safe, cp > 1 folds are searched in a forked process while cp = 1 is (cp_search.py
    `_folds_beside`), without cp = 1's step time to stop at; the plan, and what it says was searched, is the one the
    sequential search gives (which stops a fold that cannot beat cp = 1: search.py `Outpriced`)."""
    import autopar.planner.cp_search as cp_search
    from autopar.planner import search as searching

    monkeypatch.setattr(cp_search, "MIN_LOCAL_SEQ", 16)  # search cp at 64 tokens, as it would at 8k
    args = {**TINY, "hardware": hardware, "batch": batch}
    beside = make_plan("gpt-tiny", **args)
    monkeypatch.setattr(searching, "forbid_fork", lambda: True)
    after = make_plan("gpt-tiny", **args)
    assert beside.solver["cp_searched"] == after.solver["cp_searched"] == [1, 2]
    assert (beside.degrees, beside.num_micro_batches, beside.zero, beside.ac) == \
        (after.degrees, after.num_micro_batches, after.zero, after.ac)
    assert beside.strategies == after.strategies
    assert beside.predicted.step_time_s == pytest.approx(after.predicted.step_time_s, rel=1e-9)
    assert beside.alternatives == after.alternatives


def test_a_fold_leaves_out_pipelines_that_cannot_beat_cp_1s_flat_plan(monkeypatch):
    """cp = 1 posts its fastest flat step time once its flat meshes are solved (cp_search.FlatBest); a fold takes
    it before pricing its pipeline meshes and leaves out those whose floor cannot beat it. The plan is the one the
    fold's own incumbent alone gives, with fewer fold pipelines priced; ranked beside cp = 1 in the forked fold
    process (which waits for the post), the plan and its alternatives are the sequential search's."""
    import autopar.planner.cp_search as cp_search
    from autopar.planner import search as searching

    monkeypatch.setattr(cp_search, "MIN_LOCAL_SEQ", 16)
    args = {**TINY, "devices": 8, "hardware": "h100-80gb-sxm", "batch": 16}
    beside = make_plan("gpt-tiny", **args)
    monkeypatch.setattr(searching, "forbid_fork", lambda: True)
    priced = []
    real = searching._transferred
    monkeypatch.setattr(searching, "_transferred", lambda req, *a: priced.append(req.cp) or real(req, *a))
    shared = make_plan("gpt-tiny", **args)
    with_post = priced.count(2)
    priced.clear()
    monkeypatch.setattr(cp_search.FlatBest, "get", lambda self: None)
    alone = make_plan("gpt-tiny", **args)
    assert shared.solver["cp_searched"] == alone.solver["cp_searched"] == [1, 2, 4]
    assert (shared.degrees, shared.num_micro_batches, shared.zero, shared.ac, shared.strategies) == \
        (alone.degrees, alone.num_micro_batches, alone.zero, alone.ac, alone.strategies)
    assert shared.predicted.step_time_s == pytest.approx(alone.predicted.step_time_s, rel=1e-9)
    assert with_post < priced.count(2), (with_post, priced.count(2))
    assert (beside.degrees, beside.strategies, beside.alternatives) == \
        (shared.degrees, shared.strategies, shared.alternatives)


@pytest.mark.parametrize("forked", [True, False])
def test_a_model_cp_cannot_run_is_searched_at_cp_1_only(monkeypatch, forked):
    """Unpinned, a cp degree the model's attention cannot run as a ring is not searched, whether the folds are
    checked in the forked fold process or here."""
    import autopar.planner.cp_search as cp_search
    from autopar.planner import search as searching

    monkeypatch.setattr(cp_search, "MIN_LOCAL_SEQ", 16)
    if not forked:
        monkeypatch.setattr(searching, "forbid_fork", lambda: True)
    plan = make_plan(f"{ROOT}/tests/tiny_models.py:eager_gpt", **{**TINY, "model_args": {}})
    assert plan.solver["cp_searched"] == [1] and plan.degrees["cp"] == 1


def test_a_fold_leaves_the_micro_batches_a_cp_1_plan_matches():
    from dataclasses import replace

    from autopar.cost_models import load_hardware
    from autopar.planner.candidate import SearchRequest
    from autopar.planner.cp_search import fold
    from autopar.planner.search import micro_batch_counts

    req = SearchRequest(model="m", n_params=1, hardware=load_hardware("cpu"), devices=2, batch=8, seq=64)
    folded = fold(req, 2)  # batch 16 at seq 32, dp counting dp x cp = 2
    assert folded.cp_searched
    # a replica's micro-batch of k samples (16 // (m * 2)): k = 8, 4, 2 have cp = 1 twins; k = 1 does not
    assert micro_batch_counts(folded, 2) == [8]
    assert micro_batch_counts(replace(folded, cp_searched=False), 2) == [1, 2, 4, 8]
    assert not fold(replace(req, fix={"cp": 2}), 2).cp_searched  # pinned: every micro-batching is searched


HF_ARGS = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64}


def test_a_transformers_llama_plans_cp_and_a_sliding_window_model_is_refused():
    """transformers traces a causal mask tensor under torch.export; a plain-causal model is built without one
    (models/hf_attention.py), so it plans cp; Mistral's sliding window needs its mask, which cp cannot shard."""
    plan = make_plan("hf:llama", **{**TINY, "model_args": HF_ARGS}, fix={"cp": 2})
    assert plan.degrees["cp"] == 2
    with pytest.raises(PlanError, match="has an attention mask"):
        make_plan("hf:mistral", **{**TINY, "model_args": {**HF_ARGS, "sliding_window": 16}}, fix={"cp": 2})


def test_a_mixture_of_experts_token_index_is_not_taken_for_positions():
    """Mixtral's experts index tokens x top-k slots with an arange that grows with the sequence: not a position
    (mapping it to true positions indexed past the local tokens); cp is refused naming it."""
    moe = {**HF_ARGS, "num_local_experts": 4, "num_experts_per_tok": 2}
    with pytest.raises(PlanError, match=r"\(lm\.model\.layers\.0\.mlp\.experts\) .*tokens x experts"):
        make_plan("hf:mixtral", **{**TINY, "model_args": moe}, fix={"cp": 2})


def test_folds_ranked_beside_a_failing_cp_1_still_finish(monkeypatch):
    """The fold process waits for cp = 1's flat best (cp_search.FlatBest); where cp = 1 fails before posting it,
    search_cp posts nothing for it, and the folds are planned without: the plan is the best fold's."""
    import autopar.planner.cp_search as cp_search
    from autopar.errors import PlanError
    from autopar.planner import search as searching

    monkeypatch.setattr(cp_search, "MIN_LOCAL_SEQ", 16)
    real = searching.rank

    def failing_at_cp_1(req, *args):
        if req.cp == 1:
            raise PlanError("cp = 1 fails here")
        return real(req, *args)

    monkeypatch.setattr(searching, "rank", failing_at_cp_1)
    plans = [make_plan("gpt-tiny", **{**TINY, "devices": 8, "hardware": "h100-80gb-sxm", "batch": 16})]
    monkeypatch.setattr(searching, "forbid_fork", lambda: True)
    plans.append(make_plan("gpt-tiny", **{**TINY, "devices": 8, "hardware": "h100-80gb-sxm", "batch": 16}))
    for plan in plans:
        assert plan.degrees["cp"] > 1 and "1" in plan.solver["cp_refused"]
    assert plans[0].degrees == plans[1].degrees and plans[0].strategies == plans[1].strategies
