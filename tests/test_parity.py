"""Tier 3, the proof: losses and gradients of the parallel program on real gloo ranks match one eager process.

Acceptance: gpt-tiny and llama-tiny under dp=4, tp=4, dp=2 x tp=2 and the planner's own choice, world 4, fp32:
10 steps of losses within 1e-5 relative and every gradient after the first step within 1e-5 relative.
"""

from __future__ import annotations

import pytest

from tests.dist_utils import grad_mismatches, max_rel_diff, run_train

pytestmark = [pytest.mark.dist, pytest.mark.slow]
COMMON = ["--steps", "10", "--seed", "0", "--batch", "8"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cache = {}

    def get(model: str):
        if model not in cache:
            dump = tmp_path_factory.mktemp("ref") / f"{model}.pt"
            rc, losses, err = run_train(["--model", model, *COMMON, "--reference"], None, dump)
            assert rc == 0, err
            cache[model] = (losses, dump)
        return cache[model]

    return get


@pytest.mark.parametrize("model", ["gpt-tiny", "llama-tiny"])
@pytest.mark.parametrize("fix", ["dp=4", "tp=4", "dp=2,tp=2", ""], ids=["dp4", "tp4", "dp2xtp2", "planner"])
def test_parity_world4(model, fix, reference, tmp_path):
    ref_losses, ref_dump = reference(model)
    dump = tmp_path / "par.pt"
    rc, losses, err = run_train(["--model", model, *COMMON, "--fix", fix], 4, dump)
    assert rc == 0, err[-3000:]
    assert len(losses) == 10
    assert max_rel_diff(ref_losses, losses) <= 1e-5, (ref_losses, losses)
    assert grad_mismatches(ref_dump, dump) == []
