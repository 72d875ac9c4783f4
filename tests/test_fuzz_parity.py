"""The differential fuzzer's CI subset: models composed from the op zoo (tests/fuzz_zoo.py) under every plan kind
(dp, tp, dp x tp, ZeRO-1, ZeRO-3, full and selective checkpointing, pp), every pattern at least once per plan kind,
each compared with one process: losses over 2 SGD steps and first-step gradients within 1e-5 relative. The pairs
run in one torchrun launch of 4 gloo ranks (tests/parity_worker.py). The long run is
`python tests/benchmarks/fuzz_parity.py --seeds N`.
"""

from __future__ import annotations

import pytest

from tests.fuzz_zoo import PATTERNS, PLAN_KINDS, allowed, covering_cases
from tests.parity_worker import assert_matches_one_process, launch

PER_MODEL = 16  # 24 models cover every pattern once per plan kind (12 took 32)
CASES = covering_cases(PER_MODEL, seed=0)


def test_the_ci_subset_covers_every_pattern_once_per_plan_kind():
    assert len(PATTERNS) >= 40
    for kind in PLAN_KINDS:
        covered = {p for c in CASES if c["id"].startswith(f"{kind}-") for p in c["patterns"]}
        assert covered == {p for p in PATTERNS if allowed([p], kind)}, kind


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return launch(CASES, 4, tmp_path_factory.mktemp("fuzz"), timeout=1800)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_fuzz_pair_matches_one_process(results, case):
    result = results[case["id"]]
    assert_matches_one_process(result, case["patterns"], case["fix"])
