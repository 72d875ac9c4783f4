"""Bad input gets one clear line, no traceback from autopar, and a non-zero exit (acceptance of the foundation).

CLI cases (unknown hardware, unknown --model-args key, malformed --fix/--mesh/--memory, ...) are in test_cli.py;
this file covers the training path under torchrun and tracing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from autopar.capture import capture
from autopar.errors import ModelError
from tests.dist_utils import ROOT, run_train


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if "autopar: error:" in ln]
    assert len(lines) == 1, stderr[-2000:]
    assert "[rank0]: Traceback" not in stderr and "[rank1]: Traceback" not in stderr, stderr[-2000:]
    return lines[0]


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # a Python branch on a tensor value: neither export nor symbolic_trace can follow it
            return self.lin(x).sum()
        return x.sum()


def test_untraceable_forward_names_the_source_line():
    with pytest.raises(ModelError) as err:
        capture(DataDependent(), (torch.randn(2, 4),))
    msg = str(err.value)
    assert "test_bad_input.py" in msg and "if x.sum() > 0" in msg and "\n" not in msg


def test_untraceable_model_file_via_cli(tmp_path):
    f = tmp_path / "bad_model.py"
    f.write_text("import types\nfrom torch import nn\n\nclass M(nn.Module):\n    def __init__(self):\n"
                 "        super().__init__()\n        self.l, self.config = nn.Linear(8, 8), types.SimpleNamespace(vocab=16, seq=8)\n"
                 "    def forward(self, x, y):\n"
                 "        if x.float().mean() > 1:\n            return self.l(x.float()).sum()\n"
                 "        return self.l(y.float()).sum()\n\ndef factory():\n    return M()\n")
    proc = subprocess.run([sys.executable, "-m", "autopar.cli.main", "plan", f"{f}:factory", "--devices", "2",
                           "--hardware", "cpu", "--batch", "2", "--seq", "8"], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr)
    assert "bad_model.py:9" in line and "Traceback" not in proc.stderr


@pytest.mark.dist
def test_world_size_not_matching_the_mesh():
    rc, _, err = run_train(["--model", "gpt-tiny", "--steps", "1", "--fix", "dp=4"], 2)
    assert rc != 0
    assert "dp=4" in _one_error_line(err)


@pytest.mark.dist
def test_plan_file_for_another_world_size(tmp_path):
    plan = tmp_path / "plan.json"
    subprocess.run([sys.executable, "-m", "autopar.cli.main", "plan", "gpt-tiny", "--devices", "4", "--hardware",
                    "cpu", "--batch", "8", "--seq", "32", "--mesh", "dp=4", "--json", str(plan)], check=True,
                   capture_output=True, cwd=ROOT)
    assert json.loads(plan.read_text())["degrees"]["dp"] == 4
    rc, _, err = run_train(["--model", "gpt-tiny", "--steps", "1", "--plan", str(plan)], 2)
    assert rc != 0
    assert "world size is 2" in _one_error_line(err)


@pytest.mark.dist
def test_batch_not_divisible_by_dp():
    rc, _, err = run_train(["--model", "gpt-tiny", "--steps", "1", "--batch", "6", "--fix", "dp=4"], 4)
    assert rc != 0
    assert "divisible" in _one_error_line(err)
