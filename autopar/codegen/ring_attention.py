"""Causal ring attention over a context-parallel (cp) process group, with the load-balanced sequence layout.

Layout (Liu et al. 2023, "Ring Attention with Blockwise Transformers", arXiv 2310.01889, for the ring; the
"zig-zag" balance used by Llama 3's CP, arXiv 2407.21783 Sec. 3.3.2, and Megatron-LM's `--context-parallel-size`):
the sequence is cut into 2*cp equal chunks and rank i holds chunks i and 2*cp-1-i, concatenated in that order. Under
a causal mask every rank then does the same work: its diagonal block (its own two chunks, causal) plus, for each
other rank j, one half block -- all local queries against chunk j when j < i (chunk 2*cp-1-j lies after both of
rank i's chunks), and the later local chunk 2*cp-1-i against both of j's chunks when j > i.

Forward: K and V travel round the ring (rank i sends to i+1, receives from i-1) by `batch_isend_irecv`, posted
before the current block's attention so that the transfer hides behind it. Partial outputs are merged by their
log-sum-exp (the online softmax of Milakov & Gimelshein 2018, arXiv 1805.02867): with per-row lse l and output o,
    l' = log(exp(l) + exp(l_b)),   o' = o exp(l - l') + o_b exp(l_b - l').
Backward: the flash backward of each block, given the *final* output and lse of its query rows, is exactly that
block's share of dQ, dK, dV (it recomputes P = exp(S - lse) and D = rowsum(dO * O) from them, Dao 2023,
arXiv 2307.08691 Alg. 2), so the same ring runs again with dK/dV accumulators travelling beside K/V and arriving
home after cp hops.

Grouped K/V heads (GQA, Ainslie et al. 2023, arXiv 2305.13245; SDPA's `enable_gqa`): K and V travel with their own
h_kv heads, h / h_kv times fewer bytes than repeated ones, and each block repeats them locally (query head j reads
K/V head j // (h / h_kv), `repeat_interleave` as SDPA does); a block's dK/dV sums back over each head's group.

Local attention is torch's: `_scaled_dot_product_flash_attention_for_cpu` (and its backward) on CPU, the
memory-efficient kernel with `compute_log_sumexp` on CUDA (untested here: this machine has no GPU).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

aten = torch.ops.aten


# -- load-balanced layout -----------------------------------------------------------------------------------------
def shard_sequence(x: torch.Tensor, dim: int, cp: int, rank: int) -> torch.Tensor:
    """This cp rank's part of a full-sequence tensor: chunks rank and 2*cp-1-rank of 2*cp along `dim`."""
    chunks = _chunks(x, dim, cp)
    return torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]], dim=dim)


def unshard_sequence(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """The full-sequence tensor from every cp rank's part (in rank order): the inverse of `shard_sequence`."""
    cp = len(parts)
    halves = [p.chunk(2, dim=dim) for p in parts]
    return torch.cat([halves[i][0] for i in range(cp)] + [halves[i][1] for i in reversed(range(cp))], dim=dim)


def sequence_positions(seq: int, cp: int, rank: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The true positions of this rank's tokens (rotary tables are indexed by them, not by local offsets)."""
    return shard_sequence(torch.arange(seq, device=device), 0, cp, rank)


def _chunks(x: torch.Tensor, dim: int, cp: int) -> tuple[torch.Tensor, ...]:
    if x.shape[dim] % (2 * cp):
        raise ValueError(f"sequence length {x.shape[dim]} is not divisible by 2*cp={2 * cp} (load-balanced "
                         "causal chunks); use a sequence length that is a multiple of 2*cp")
    return x.chunk(2 * cp, dim=dim)


# -- local attention returning the log-sum-exp ----------------------------------------------------------------------
def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(output [b, h, sq, d], lse [b, h, sq] in fp32) of softmax(q k^T * scale) v."""
    if q.device.type == "cuda":
        out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)[:2]
        return out, lse[..., : q.shape[2]]  # the kernel pads lse's rows to a multiple of its block
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return out, lse


def local_attention_backward(dout, q, k, v, out, lse, causal: bool, scale: float):
    """(dq, dk, dv) of one block, given the final output and lse of q's rows."""
    if q.device.type == "cuda":
        empty = torch.empty(0, device=q.device)
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, None, out, lse.contiguous(), empty, empty, 0.0, [True, True, True, False], causal,
            scale=scale)
        return dq, dk, dv
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(dout, q, k, v, out, lse, 0.0, causal,
                                                                    scale=scale)


def _merge(out: torch.Tensor, lse: torch.Tensor, blk_out: torch.Tensor, blk_lse: torch.Tensor):
    """Online-softmax merge of two partial attentions over disjoint key sets (module docstring)."""
    new = torch.logaddexp(lse, blk_lse)
    out = out * torch.exp(lse - new).unsqueeze(-1) + blk_out.float() * torch.exp(blk_lse - new).unsqueeze(-1)
    return out, new


# -- the ring ---------------------------------------------------------------------------------------------------
class _Ring:
    """Send to the next cp rank, receive from the previous one, without blocking (P2P on the cp group)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group, self.cp = group, dist.get_world_size(group)
        me = dist.get_rank(group)
        self.rank = me
        self.next = dist.get_global_rank(group, (me + 1) % self.cp)
        self.prev = dist.get_global_rank(group, (me - 1) % self.cp)

    def shift(self, t: torch.Tensor):
        """Start passing `t` on; returns (the tensor that will arrive, a wait function)."""
        got = torch.empty_like(t)
        reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, t, self.next, self.group),
                                       dist.P2POp(dist.irecv, got, self.prev, self.group)])

        def wait() -> torch.Tensor:
            for r in reqs:
                r.wait()
            return got
        return got, wait


def _block(step: int, rank: int, cp: int, q: torch.Tensor, kv: torch.Tensor):
    """What rank `rank` computes at ring step `step` (its module-docstring case): (query rows, k, v, causal) where
    the query rows are a slice of the local rows (all, or the later half); k and v with q's heads."""
    src = (rank - step) % cp
    k, v = _repeat_heads(kv[0], q), _repeat_heads(kv[1], q)
    half = q.shape[2] // 2
    if step == 0:
        return slice(None), k, v, True
    if src < rank:  # every local query row sees the source's first (earlier) chunk only
        return slice(None), k[:, :, :half], v[:, :, :half], False
    return slice(half, None), k, v, False  # the later local chunk sees both of the source's chunks


def _repeat_heads(t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """K or V [b, h_kv, s, d] with q's h heads: each K/V head serves h / h_kv consecutive query heads."""
    groups = q.shape[1] // t.shape[1]
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def _sum_heads(g: torch.Tensor, heads: int) -> torch.Tensor:
    """A block's dK or dV over q's heads, summed back onto the `heads` K/V heads they were repeated from."""
    b, h, s, d = g.shape
    return g if h == heads else g.view(b, heads, h // heads, s, d).sum(2)


class RingAttention(torch.autograd.Function):
    """Causal attention of the load-balanced local q, k, v [b, h, s/cp, d] over the whole sequence."""

    @staticmethod
    def forward(ctx, q, k, v, group: dist.ProcessGroup, scale: float):
        ring = _Ring(group)
        kv = torch.stack([k, v]).contiguous()
        # [b, h, s, d] in [b, s, h, d] memory, as torch's flash kernel lays out its output: the model's
        # `transpose(1, 2).reshape(b, s, h * d)` after attention is then a view, not a copy the projection saves
        b, h, sq, d = q.shape
        out = torch.zeros(b, sq, h, d, dtype=torch.float32, device=q.device).transpose(1, 2)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        for step in range(ring.cp):
            wait = ring.shift(kv)[1] if step < ring.cp - 1 else None  # the next block travels meanwhile
            rows, kb, vb, causal = _block(step, ring.rank, ring.cp, q, kv)
            blk_out, blk_lse = local_attention(q[:, :, rows], kb, vb, causal, scale)
            out[:, :, rows], lse[:, :, rows] = _merge(out[:, :, rows], lse[:, :, rows], blk_out, blk_lse)
            if wait is not None:
                kv = wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.scale = group, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        ring = _Ring(ctx.group)
        dout = dout.contiguous()
        kv = torch.stack([k, v]).contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)  # travels with kv, home after cp hops
        wait_dkv = None
        for step in range(ring.cp):
            wait_kv = ring.shift(kv)[1] if step < ring.cp - 1 else None
            rows, kb, vb, causal = _block(step, ring.rank, ring.cp, q, kv)
            g = local_attention_backward(dout[:, :, rows], q[:, :, rows].contiguous(), kb.contiguous(),
                                         vb.contiguous(), out[:, :, rows].contiguous(),
                                         lse[:, :, rows].contiguous(), causal, ctx.scale)
            dq[:, :, rows] += g[0]
            if wait_dkv is not None:
                dkv = wait_dkv()
            n = g[1].shape[2]  # a first-chunk-only block touches the first half of the source's keys
            dkv[0, :, :, :n] += _sum_heads(g[1], k.shape[1])
            dkv[1, :, :, :n] += _sum_heads(g[2], v.shape[1])
            del g  # else this step's dq, dk, dv stay alive through the next step's kernel
            dkv, wait_dkv = ring.shift(dkv)
            if wait_kv is not None:
                kv = wait_kv()
        dkv = wait_dkv()
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup,
                   scale: float | None = None) -> torch.Tensor:
    """Causal attention of this cp rank's load-balanced q [b, heads, s/cp, head_dim] and k, v [b, kv_heads, s/cp,
    head_dim] over the whole sequence (kv_heads divides heads: GQA as SDPA's enable_gqa); the result is this
    rank's rows."""
    if q.shape[2] % 2:
        raise ValueError(f"local sequence {q.shape[2]} is odd: each cp rank holds two equal chunks")
    if k.shape[1] != v.shape[1] or q.shape[1] % k.shape[1]:
        raise ValueError(f"ring attention: {q.shape[1]} query heads cannot share {k.shape[1]} key and {v.shape[1]} "
                         "value heads (GQA needs equal K/V heads that divide the query heads)")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return RingAttention.apply(q, k, v, group, scale)
