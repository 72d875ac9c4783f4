"""`autopar plan --explain` and `--plot` (tier 0)."""

from __future__ import annotations

import pytest

from autopar.cli.main import main
from autopar.explain import explain, pins_of
from autopar.planning import make_plan

SETUP = dict(devices=4, hardware="cpu", batch=8)


def test_each_alternative_is_its_fix_evaluation():
    plan = make_plan("gpt-tiny", **SETUP)
    alternatives = explain(plan, lambda fix: make_plan("gpt-tiny", fix=fix, **SETUP))
    assert len([a for a in alternatives if a.step_time_s is not None]) >= 3
    assert {a.dimension for a in alternatives} >= {"tp", "ac", "mbs"}
    for a in alternatives:
        if a.step_time_s is None:
            continue
        again = make_plan("gpt-tiny", fix=a.fix, **SETUP).predicted.step_time_s  # what --fix prints
        assert a.delta == pytest.approx(again / plan.predicted.step_time_s - 1, rel=1e-6, abs=1e-9)
        if a.dimension == "cp":  # the best plan at another context-parallel degree, searched freely
            assert a.fix == {"cp": 2}
            continue
        changed = {k for k, v in a.fix.items() if v != pins_of(plan)[k]}
        # one decision changed (a tp change moves dp with it, and drops ZeRO when dp becomes 1)
        assert changed == {a.dimension} or a.dimension == "tp" and {"tp", "dp"} <= changed <= {"tp", "dp", "zero"}


def test_explain_and_plot_on_the_command_line(tmp_path, capsys):
    png = tmp_path / "memory.png"
    assert main(["plan", "gpt-tiny", "--devices", "4", "--batch", "8", "--hardware", "cpu", "--explain",
                 "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "best alternative per dimension" in out and "vs chosen" in out
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_plot_to_a_missing_directory_is_one_error_line(tmp_path, capsys):
    code = main(["plan", "gpt-tiny", "--devices", "2", "--batch", "2", "--hardware", "cpu", "--plot",
                 str(tmp_path / "nope" / "m.png")])
    err = capsys.readouterr().err
    assert code == 2 and "--plot" in err and "Traceback" not in err


FLIP_MODEL = '''
import torch
from torch import nn


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lin = nn.Embedding(64, 32), nn.Linear(32, 64)
        self.config = type("C", (), {"vocab": 64, "seq": 16})()

    def forward(self, tokens, targets):
        h = torch.flip(self.emb(tokens), dims=[-1])  # aten.flip has no sharding rule
        return nn.functional.cross_entropy(self.lin(h).flatten(0, 1), targets.flatten())


def build():
    return M()
'''


def test_ops_without_a_rule_are_listed_with_their_cost(tmp_path, capsys):
    path = tmp_path / "flip_model.py"
    path.write_text(FLIP_MODEL)
    plan = make_plan(f"{path}:build", devices=2, hardware="cpu", batch=4, seq=16)
    assert plan.fallback_ops == {"aten.flip.default": 1}
    assert 0 < plan.fallback_seconds["aten.flip.default"] < plan.predicted.step_time_s
    assert main(["plan", f"{path}:build", "--devices", "2", "--batch", "4", "--seq", "16", "--hardware", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "ops without a sharding rule" in out and "aten.flip.default" in out and "time per step" in out
