"""`autopar validate`: the statistics (tier 0) and one real run on 2 gloo ranks (tier 3)."""

from __future__ import annotations

import math

import pytest

from autopar.cli.main import main
from autopar.validate import Row, combine, spearman, statistics


def test_spearman_orders_and_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [5, 5, 9]) == pytest.approx(math.sqrt(3) / 2)  # ties take their mean rank
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_statistics_report_errors_against_the_measurement():
    rows = [Row("a", 1.2, 1.0, 110, 100), Row("b", 2.0, 2.5, 100, 100)]
    s = statistics(rows)
    assert s["step_mape"] == pytest.approx((0.2 + 0.2) / 2)
    assert s["memory_mape"] == pytest.approx(0.05)
    assert s["step_within_25"] == 2 and s["memory_within_15"] == 2


def test_rounds_combine_to_the_median_measurement():
    runs = [Row("dp=2", 0.2, t, 100, b) for t, b in ((0.30, 90), (0.21, 92), (0.25, 91))]
    row = combine(runs)
    assert (row.fix, row.predicted_s, row.predicted_bytes) == ("dp=2", 0.2, 100)
    assert row.measured_s == pytest.approx(0.25) and row.measured_bytes == 91
    with pytest.raises(ValueError):
        combine([runs[0], Row("tp=2", 0.2, 0.3, 100, 90)])


@pytest.mark.dist
def test_validate_runs_plans_and_prints_the_comparison(capsys):
    assert main(["validate", "--plans", "dp=2;dp=2,ac=full", "--steps", "2", "--rounds", "2", "--model-args",
                 "hidden=64,layers=2,seq=32"]) == 0
    out = capsys.readouterr().out
    assert "predicted vs measured" in out and "Spearman" in out
    # round-robin: the first plan's second run comes after the second plan's first
    assert out.index("round 2/2: running --fix dp=2 ") > out.index("round 1/2: running --fix dp=2,ac=full")
    assert "dp=2,ac=f" in out  # the second plan's row (rich may shorten the cell)
