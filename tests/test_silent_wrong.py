"""Issue 18's regressions: programs that trained silently wrong or crashed, as users wrote them, now train like one
process (losses and first-step gradients within 1e-5 relative), on real gloo ranks.

- complex feature rotation and |rfft| between linear layers (tp=2, dp=2 x tp=2): the planning graph once took a
  complex intermediate for the end of the gradient path, and codegen left out the backward all-reduce of the next
  column-parallel linear's input;
- in-place ops on an activation after a collective (dp=2): they modified the collective's output, which autograd
  forbids; capture now functionalizes them;
- random ops (dropout) run whole on every rank and draw what one process draws; a plan that would draw them in
  another order (micro-batches) or ranks whose generators differ are refused at compile time;
- Python builtins as call targets (`operator.getitem` before a saved reshape, `operator.add/mul/neg`): the
  planning graph read `.overloadpacket` from every target;
- verify=True under dp=2: the check ran one replica's micro-batch through a program that runs every replica's.
"""

from __future__ import annotations

import pytest

from tests.parity_worker import assert_matches_one_process, launch

M = "tests.regression_models"


def _case(name: str, factory: str, fix: dict) -> dict:
    return {"id": name, "factory": f"{M}:{factory}", "fix": fix, "steps": 3, "batch": 4}


WORLD2 = [_case("rotation-tp2", "ComplexRotation", {"tp": 2}), _case("rfft-tp2", "RfftMix", {"tp": 2}),
          _case("inplace-dp2", "InplaceAfterCollective", {"dp": 2}),
          _case("inplace-tp2", "InplaceAfterCollective", {"tp": 2}),
          _case("slice-assign-dp2", "SliceAssign", {"dp": 2}),
          _case("split-reshape-tp2", "SplitReshape", {"tp": 2}),
          _case("builtins-dp2", "builtin_targets", {"dp": 2}), _case("builtins-tp2", "builtin_targets", {"tp": 2}),
          _case("dropout-dp2", "TwoDropouts", {"dp": 2}), _case("dropout-tp2", "TwoDropouts", {"tp": 2}),
          _case("dropout-microbatches", "TwoDropouts", {"dp": 2, "mbs": 1}),
          _case("dropout-seeds-differ", "rank_seeded_dropouts", {"dp": 2}),
          {**_case("verify-passes", "SoftmaxMix", {"tp": 2}), "verify": True},
          {**_case("verify-passes-dp2", "SoftmaxMix", {"dp": 2}), "verify": True},
          {**_case("verify-catches-broken-rule", "broken_softmax_rule", {"tp": 2}), "verify": True}]
WORLD4 = [_case("rotation-dp2xtp2", "ComplexRotation", {"dp": 2, "tp": 2}),
          _case("rfft-dp2xtp2", "RfftMix", {"dp": 2, "tp": 2})]


def test_attention_and_dropout_without_dropout_are_not_random_ops():
    """Fuzzer find: aten.scaled_dot_product_attention carries the nondeterministic_seeded tag for its dropout_p, and
    was planned whole on every rank (no head parallelism) although it draws nothing at dropout_p=0."""
    import torch
    import torch.nn.functional as F

    from autopar.capture import capture
    from autopar.planner.graph import build, draws_random

    class Attn(torch.nn.Module):
        def forward(self, q):
            return F.dropout(F.scaled_dot_product_attention(q, q, q, is_causal=True), p=0.0, training=True)

    pg = build(capture(Attn(), (torch.randn(2, 4, 8, 8),)), (1, 2), ("dp", "tp"))
    ops = [p for p in pg.nodes.values() if p.kind == "op"]
    assert ops and not any(draws_random(p.node) for p in ops)
    sdpa = next(p for p in ops if "scaled_dot_product" in str(p.node.target))
    assert any(s.outs[0][1].is_shard for s in sdpa.strategies)  # heads (or batch) split over tp


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("silent")
    return {**launch(WORLD2, 2, tmp), **launch(WORLD4, 4, tmp)}


def _exact(result: dict) -> None:
    assert_matches_one_process(result)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("case", ["rotation-tp2", "rotation-dp2xtp2", "rfft-tp2", "rfft-dp2xtp2"])
def test_complex_ops_under_tensor_parallelism_are_exact(results, case):
    _exact(results[case])


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("case", ["inplace-dp2", "inplace-tp2", "slice-assign-dp2"])
def test_inplace_after_a_collective_is_exact(results, case):
    _exact(results[case])


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("case", ["split-reshape-tp2", "builtins-dp2", "builtins-tp2"])
def test_builtin_call_targets_plan_and_train(results, case):
    _exact(results[case])


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("case", ["dropout-dp2", "dropout-tp2"])
def test_random_ops_run_whole_and_draw_what_one_process_draws(results, case):
    _exact(results[case])


@pytest.mark.dist
@pytest.mark.slow
def test_random_ops_in_another_order_are_refused(results):
    error = results["dropout-microbatches"].get("error", "")
    assert error.startswith("PlanError") and "2 ops" in error and "micro-batches" in error and "mbs=" in error, error


@pytest.mark.dist
@pytest.mark.slow
def test_random_ops_with_unlike_generators_are_refused(results):
    error = results["dropout-seeds-differ"].get("error", "")
    assert error.startswith("PlanError") and "torch.manual_seed" in error, error


@pytest.mark.dist
@pytest.mark.slow
def test_verify_passes_a_correct_program(results):
    _exact(results["verify-passes"])


@pytest.mark.dist
@pytest.mark.slow
def test_verify_runs_one_micro_step_under_data_parallelism(results):
    """verify once gave the program one micro-batch of one replica where it runs one per replica (dp of them): every
    dp > 1 plan failed to compile with verify=True, on a shape error."""
    _exact(results["verify-passes-dp2"])


@pytest.mark.dist
@pytest.mark.slow
def test_verify_catches_a_broken_rule_and_names_the_parameter(results):
    """softmax's rule, monkeypatched to keep its normalised dim sharded, trains silently wrong without verify; with
    verify=True compile refuses and names the first parameter (in the model's order) whose gradient differs."""
    error = results["verify-catches-broken-rule"].get("error", "")
    assert error.startswith("VerifyError"), error
    assert "the first parameter whose gradient differs is 'emb.weight'" in error, error


def test_inplace_update_of_a_buffer_is_refused_with_a_clear_error():
    """A forward that updates its own state in place cannot be written back on every plan: refused at capture."""
    import torch

    from autopar.capture import capture
    from autopar.errors import ModelError

    class Counter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("seen", torch.zeros(8))

        def forward(self, x):
            self.seen.add_(x.sum(0))
            return x * 2

    with pytest.raises(ModelError, match="updates buffer 'seen' in place.*out of place"):
        capture(Counter(), (torch.randn(4, 8),))
