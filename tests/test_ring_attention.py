"""Ring attention (codegen/ring_attention.py): the load-balanced layout, and real gloo ranks (cp=2 and cp=4 in one
launch of 4) against full causal attention in one process, forward and q/k/v gradients, with as many K/V heads as
query heads and with one K/V head for all of them (GQA/MQA, SDPA's enable_gqa)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from autopar.codegen.ring_attention import ring_attention, sequence_positions, shard_sequence, unshard_sequence

B, H, S, D = 2, 3, 48, 8  # S divisible by 2*cp for cp = 2 and 4


def test_layout_gives_each_rank_chunks_i_and_2cp_minus_1_minus_i_and_round_trips():
    x = torch.arange(16).view(1, 16)
    parts = [shard_sequence(x, 1, 4, r) for r in range(4)]
    assert parts[0].tolist() == [[0, 1, 14, 15]] and parts[3].tolist() == [[6, 7, 8, 9]]
    assert torch.equal(unshard_sequence(parts, 1), x)
    assert sequence_positions(16, 4, 1).tolist() == [2, 3, 12, 13]


def test_layout_balances_causal_work():
    """Each rank's (query, key) pairs under the causal mask are the same in number."""
    cp, seq = 4, 32
    pos = [sequence_positions(seq, cp, r) for r in range(cp)]
    work = [int((p[:, None] >= torch.arange(seq)[None, :]).sum()) for p in pos]
    assert len(set(work)) == 1, work


def test_a_sequence_that_does_not_split_into_2cp_chunks_is_refused():
    with pytest.raises(ValueError, match="not divisible by 2\\*cp=8"):
        shard_sequence(torch.zeros(1, 12), 1, 4, 0)


def _inputs(kv_heads: int = H):
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(B, H, S, D, generator=g) for _ in range(4))
    return q, k[:, :kv_heads].contiguous(), v[:, :kv_heads].contiguous(), dout


def _reference(kv_heads: int = H):
    q, k, v, dout = _inputs(kv_heads)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != H)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    halves = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group, in order
    errors = {}
    for (cp, group), kv_heads in [(c, h) for c in ((4, None), (2, halves[rank // 2])) for h in (H, 1)]:
        ref = _reference(kv_heads)
        group = group or dist.group.WORLD
        r = dist.get_rank(group)
        q, k, v, dout = (shard_sequence(t, 2, cp, r) for t in _inputs(kv_heads))
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        out = ring_attention(q, k, v, group)
        out.backward(dout)
        got = [out.detach(), q.grad, k.grad, v.grad]
        want = [shard_sequence(t, 2, cp, r) for t in ref]
        errors[f"cp{cp}-kv_heads{kv_heads}"] = [_rel(a, b) for a, b in zip(got, want)]
    Path(out_dir, f"{rank}.json").write_text(json.dumps(errors))
    dist.destroy_process_group()


@pytest.mark.dist
def test_ring_attention_matches_full_causal_attention_on_gloo_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(4, port, str(tmp_path)), nprocs=4, start_method="spawn")
    for rank in range(4):
        errors = json.loads((tmp_path / f"{rank}.json").read_text())
        for cp, (fwd, dq, dk, dv) in errors.items():
            assert max(fwd, dq, dk, dv) < 1e-5, (rank, cp, fwd, dq, dk, dv)
