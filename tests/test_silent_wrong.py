"""Issue 18's regressions: programs that trained silently wrong or crashed, as users wrote them, now train like one
process (losses and first-step gradients within 1e-5 relative), on real gloo ranks.

- complex feature rotation and |rfft| between linear layers (tp=2, dp=2 x tp=2): the planning graph once took a
  complex intermediate for the end of the gradient path, and codegen left out the backward all-reduce of the next
  column-parallel linear's input;
- in-place ops on an activation after a collective (dp=2): they modified the collective's output, which autograd
  forbids; capture now functionalizes them;
- Python builtins as call targets (`operator.getitem` before a saved reshape, `operator.add/mul/neg`): the
  planning graph read `.overloadpacket` from every target.
"""

from __future__ import annotations

import pytest

from tests.parity_worker import launch

pytestmark = [pytest.mark.dist, pytest.mark.slow]
M = "tests.regression_models"


def _case(name: str, factory: str, fix: dict) -> dict:
    return {"id": name, "factory": f"{M}:{factory}", "fix": fix, "steps": 3, "batch": 4}


WORLD2 = [_case("rotation-tp2", "ComplexRotation", {"tp": 2}), _case("rfft-tp2", "RfftMix", {"tp": 2}),
          _case("inplace-dp2", "InplaceAfterCollective", {"dp": 2}),
          _case("inplace-tp2", "InplaceAfterCollective", {"tp": 2}),
          _case("split-reshape-tp2", "SplitReshape", {"tp": 2}),
          _case("builtins-dp2", "builtin_targets", {"dp": 2}), _case("builtins-tp2", "builtin_targets", {"tp": 2})]
WORLD4 = [_case("rotation-dp2xtp2", "ComplexRotation", {"dp": 2, "tp": 2}),
          _case("rfft-dp2xtp2", "RfftMix", {"dp": 2, "tp": 2})]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("silent")
    return {**launch(WORLD2, 2, tmp), **launch(WORLD4, 4, tmp)}


def _exact(result: dict) -> None:
    assert "error" not in result, result.get("trace", result)
    assert result["loss_rel"] <= 1e-5, result
    assert result["grad_bad"] == {}, result


@pytest.mark.parametrize("case", ["rotation-tp2", "rotation-dp2xtp2", "rfft-tp2", "rfft-dp2xtp2"])
def test_complex_ops_under_tensor_parallelism_are_exact(results, case):
    _exact(results[case])


@pytest.mark.parametrize("case", ["inplace-dp2", "inplace-tp2"])
def test_inplace_after_a_collective_is_exact(results, case):
    _exact(results[case])


@pytest.mark.parametrize("case", ["split-reshape-tp2", "builtins-dp2", "builtins-tp2"])
def test_builtin_call_targets_plan_and_train(results, case):
    _exact(results[case])
