"""compiled.save / compiled.load called directly (synchronous save), on one gloo rank in this process, and what
`autopar checkpoint` prints about the result."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

import autopar
from autopar.cli.main import main
from autopar.models import build_model, sample_inputs


@pytest.fixture
def one_rank():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_save_then_load_restores_parameters_optimizer_and_step(one_rank, tmp_path, capsys):
    torch.manual_seed(0)
    model, info = build_model("gpt-tiny", {})
    batch = sample_inputs(info, 2, 8)
    compiled = autopar.compile(model, sample_inputs=batch)
    opt = compiled.optimizer(torch.optim.AdamW, lr=1e-2)

    def step():
        compiled.train_step(*batch)
        opt.step()
        opt.zero_grad()

    step()
    saved = compiled.save(tmp_path, 1, data={"batches": 1})
    params = {k: v.clone() for k, v in compiled.full_state().items()}
    moments = {k: v["exp_avg"].clone() for k, v in opt.state.items()}
    step()  # moves parameters and moments away from the checkpoint
    state = compiled.load(tmp_path)
    assert (state.step, state.data, state.path) == (1, {"batches": 1}, str(saved))
    assert all(torch.equal(params[k], v) for k, v in compiled.full_state().items())
    assert all(torch.equal(moments[p], s["exp_avg"]) for p, s in opt.state.items())

    assert main(["checkpoint", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "step 1, data position {'batches': 1}" in out and "all match their CRC-32" in out
