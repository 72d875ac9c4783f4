"""Past one machine: two torchrun launches of 2 ranks each share a c10d rendezvous on this host (loopback), as two
nodes would. Tensor parallelism stays inside a node as the launcher reports it (LOCAL_WORLD_SIZE=2): a tp=4 plan is
refused in one line, a tp=2 group holds ranks of one node, and dp=2 x tp=2 across the two "nodes" trains with the
losses of one eager process.

    torchrun --nnodes 2 --nproc_per_node 2 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:PORT \
        tests/test_multinode.py REPORT.json      # twice, as the fixture launches it
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH = 3, 8


def _losses(fix: dict | None) -> tuple[list[float], object]:
    import torch

    import autopar
    from autopar.models import build_model, sample_inputs

    torch.manual_seed(0)
    model, info = build_model("gpt-tiny")
    gen = torch.Generator().manual_seed(1)
    data = [tuple(torch.randint(0, info.vocab, (BATCH, 32), generator=gen) for _ in range(2)) for _ in range(STEPS)]
    if fix is not None:
        model = autopar.compile(model, sample_inputs=sample_inputs(info, BATCH, 32), fix=fix, hardware="cpu")
    opt = model.optimizer(torch.optim.AdamW, lr=1e-3) if fix else torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for x, y in data:
        loss = model.train_step(x, y) if fix else model(x, y)
        if not fix:
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, model


def _launch(out: str) -> None:
    import torch.distributed as dist

    from autopar.errors import MeshError

    dist.init_process_group("gloo")
    try:
        _losses({"tp": 4})
        refused = None
    except MeshError as err:
        refused = str(err)
    losses, compiled = _losses({"dp": 2, "tp": 2})
    tp_ranks = compiled.mesh["tp"].mesh.tolist()
    nodes = [None] * dist.get_world_size()  # torchrun's GROUP_RANK: which node (launch) each rank belongs to
    dist.all_gather_object(nodes, int(os.environ["GROUP_RANK"]))
    if dist.get_rank() == 0:
        report = {"refused": refused, "losses": losses, "reference": _losses(None)[0],
                  "tp_nodes": sorted({nodes[r] for r in tp_ranks}), "nodes": sorted(set(nodes)),
                  "local_world_size": int(os.environ["LOCAL_WORLD_SIZE"])}
        Path(out).write_text(json.dumps(report))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("multinode") / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", "autopar-test",
           "--local-addr", "127.0.0.1", __file__, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                              start_new_session=True) for _ in range(2)]
    try:
        results = [node.communicate(timeout=900) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, 9)
    assert all(node.returncode == 0 for node in nodes), "\n".join(err[-3000:] for _, err in results)
    return json.loads(out.read_text())


@pytest.mark.dist
def test_two_nodes_train_dp_across_them_with_the_losses_of_one_process(report):
    assert report["nodes"] == [0, 1] and report["local_world_size"] == 2
    assert len(report["losses"]) == STEPS
    assert max(abs(a - b) / abs(a) for a, b in zip(report["reference"], report["losses"])) <= 1e-5


@pytest.mark.dist
def test_tensor_parallelism_stays_inside_a_node(report):
    assert len(report["tp_nodes"]) == 1  # both ranks of the tp=2 group on one node
    assert "tp=4 would span nodes: the launcher reports 2 ranks per node (LOCAL_WORLD_SIZE)" in report["refused"]


if __name__ == "__main__":
    _launch(sys.argv[1])
