"""Fused head matmul + cross-entropy over vocab-sharded logits, chunk by chunk of tokens.

Per chunk of tokens: logits = x_c @ W_local^T ([chunk x vocab/tp], fp32), each rank's row maximum and sum of
exponentials (online softmax, Milakov & Gimelshein 2018), one all-reduce MAX of the maxima and one all-reduce SUM
of the rescaled sums together with the target's logit over the tp group (Megatron's vocab-parallel cross-entropy,
Shoeybi et al. 2019 Sec. 3, without ever gathering the logits), the per-row loss lse - logit[target], and, since
the loss is a sum of these rows, its gradient right away: d = softmax - onehot (written over the chunk's logits),
dx_c = d @ W_local, dW_local += d^T @ x_c (the scheme of Liger-Kernel's fused linear cross-entropy). The
[tokens x vocab] logits never exist whole, in forward or backward; backward scales the saved dx, dW by the
incoming gradient. dx is this rank's addend over its vocab slice: the caller's tp all-reduce of the head's input
gradient (Megatron's f) completes it. Rows whose target is ignore_index count zero.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from autopar.kernels.dispatch import block, kernel, triton, use_triton

VOCAB_BLOCK = 4096  # classes a program holds at once; larger shards loop over blocks

if triton is not None:
    import triton.language as tl

    def _ce_stats_kernel(logits_ptr, target_ptr, max_ptr, sum_ptr, picked_ptr, n_vocab, vocab_start,
                         BLOCK: tl.constexpr):
        """One row: local max, sum of exp(logit - max) (online), and the target's logit if it lives here."""
        row = tl.program_id(0)
        base = logits_ptr + row.to(tl.int64) * n_vocab
        cols = tl.arange(0, BLOCK)
        m = tl.max(tl.load(base + cols, mask=cols < n_vocab, other=float("-inf")), axis=0)
        s = tl.sum(tl.exp(tl.load(base + cols, mask=cols < n_vocab, other=float("-inf")) - m), axis=0)
        for v0 in range(BLOCK, n_vocab, BLOCK):
            x = tl.load(base + v0 + cols, mask=v0 + cols < n_vocab, other=float("-inf"))
            new_m = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), axis=0)
            m = new_m
        t = tl.load(target_ptr + row) - vocab_start
        inside = (t >= 0) & (t < n_vocab)
        picked = tl.load(base + tl.where(inside, t, 0))
        tl.store(max_ptr + row, m)
        tl.store(sum_ptr + row, s)
        tl.store(picked_ptr + row, tl.where(inside, picked, 0.0))

    def _ce_grad_kernel(logits_ptr, lse_ptr, target_ptr, weight_ptr, d_ptr, n_vocab, vocab_start,
                        BLOCK: tl.constexpr):
        """One row: d = (softmax - onehot) * row weight (0 for ignored rows), in the matmul dtype."""
        row = tl.program_id(0)
        lse = tl.load(lse_ptr + row)
        w = tl.load(weight_ptr + row)
        t = tl.load(target_ptr + row) - vocab_start
        cols = tl.arange(0, BLOCK)
        for v0 in range(0, n_vocab, BLOCK):
            c = v0 + cols
            x = tl.load(logits_ptr + row.to(tl.int64) * n_vocab + c, mask=c < n_vocab, other=0.0)
            d = (tl.exp(x - lse) - tl.where(c == t, 1.0, 0.0)) * w
            tl.store(d_ptr + row.to(tl.int64) * n_vocab + c, d.to(d_ptr.dtype.element_ty), mask=c < n_vocab)


def _stats(logits, target, vocab_start, triton_path):
    """Per row: (local max, local sum of exp(l - max), the target's logit or 0 where it lives elsewhere)."""
    if triton_path:
        rows, v = logits.shape
        m, s, picked = (torch.empty(rows, dtype=torch.float32, device=logits.device) for _ in range(3))
        kernel(_ce_stats_kernel)[(rows,)](logits, target, m, s, picked, v, vocab_start, BLOCK=block(v, VOCAB_BLOCK))
        return m, s, picked
    m = logits.max(-1).values
    s = (logits - m.unsqueeze(-1)).exp_().sum(-1)  # one chunk-sized temporary beside the logits
    local = target - vocab_start
    inside = (local >= 0) & (local < logits.shape[-1])
    picked = logits.gather(-1, local.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1) * inside
    return m, s, picked


def _softmax_grad(logits, lse, target, row_weight, vocab_start, dtype, triton_path):
    """softmax - onehot, rows scaled by row_weight, in dtype; reuses the logits' memory where dtype is fp32."""
    if triton_path:
        d = logits if dtype == torch.float32 else torch.empty(logits.shape, dtype=dtype, device=logits.device)
        kernel(_ce_grad_kernel)[(logits.shape[0],)](logits, lse, target, row_weight, d, logits.shape[1],
                                                    vocab_start, BLOCK=block(logits.shape[1], VOCAB_BLOCK))
        return d
    d = logits.sub_(lse.unsqueeze(-1)).exp_()
    local = target - vocab_start
    inside = (local >= 0) & (local < d.shape[-1])
    rows = torch.arange(d.shape[0], device=d.device)[inside]
    d[rows, local[inside]] -= 1.0
    return d.mul_(row_weight.unsqueeze(-1)).to(dtype)


def _chunk_loss(x_c, weight, t_c, vocab_start, ignore_index, group, triton_path):
    """(per-row loss with ignored rows 0, their lse, the fp32 logits) of one chunk."""
    logits = (x_c @ weight.t()).float()
    m, s, picked = _stats(logits, t_c, vocab_start, triton_path)
    if group is not None:  # one MAX of the maxima, one SUM of the rescaled sums and the target logits
        gm = m.clone()
        dist.all_reduce(gm, op=dist.ReduceOp.MAX, group=group)
        both = torch.stack([s * torch.exp(m - gm), picked])
        dist.all_reduce(both, group=group)
        m, (s, picked) = gm, both
    lse = m + s.log()
    counted = (t_c != ignore_index).float()
    return (lse - picked) * counted, lse, logits, counted


@torch.library.custom_op("autopar::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, vocab_start: int,
                         ignore_index: int, chunk: int, group_name: str, need_grad: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of the rows' cross-entropy of x @ weight^T, d loss/dx, d loss/dweight). x: [tokens, hidden]; weight:
    this rank's [vocab/tp, hidden] rows, starting at class vocab_start; group_name: the tp group ("" for none)."""
    group = dist.distributed_c10d._resolve_process_group(group_name) if group_name else None
    triton_path = use_triton(x, weight)
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    grad_x = torch.empty_like(x) if need_grad else x.new_empty(0)
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if need_grad else x.new_empty(0)
    for start in range(0, x.shape[0], chunk):
        x_c, t_c = x[start:start + chunk], target[start:start + chunk]
        rows, lse, logits, counted = _chunk_loss(x_c, weight, t_c, vocab_start, ignore_index, group, triton_path)
        total += rows.sum()
        if need_grad:
            d = _softmax_grad(logits, lse, t_c, counted, vocab_start, x.dtype, triton_path)
            torch.mm(d, weight, out=grad_x[start:start + chunk])
            if grad_w.dtype == d.dtype:
                grad_w.addmm_(d.t(), x_c)  # no [vocab/tp x hidden] product beside the accumulator
            else:
                grad_w += (d.t() @ x_c).float()
            del d  # the chunk's logits (d is written over them): gone before the next chunk's matmul
        del logits
    return total, grad_x, grad_w.to(weight.dtype) if need_grad else grad_w


@linear_cross_entropy.register_fake
def _(x, weight, target, vocab_start, ignore_index, chunk, group_name, need_grad):
    grads = (torch.empty_like(x), torch.empty_like(weight)) if need_grad else (x.new_empty(0), x.new_empty(0))
    return (x.new_empty((), dtype=torch.float32),) + grads


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])


def _backward(ctx, grad, _gx, _gw):
    grad_x, grad_w = ctx.saved_tensors
    return (grad * grad_x).to(grad_x.dtype), (grad * grad_w).to(grad_w.dtype), None, None, None, None, None, None


linear_cross_entropy.register_autograd(_backward, setup_context=_setup)


def fused_linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, vocab_start: int = 0,
                               ignore_index: int = -100, chunk: int = 0, group=None) -> torch.Tensor:
    """The loss summed over counted rows (what generated code calls): computes the gradients in forward only when
    autograd will ask for them. chunk 0 picks `ce_chunk_rows`; group: the tp ProcessGroup or its name ("" or None
    for none)."""
    from autopar.kernels import ce_chunk_rows

    need = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    chunk = chunk or ce_chunk_rows(x.shape[0], weight.shape[0], x.shape[1])
    name = group if isinstance(group, str) else (group.group_name if group is not None else "")  # a ProcessGroup
    return linear_cross_entropy(x, weight, target, vocab_start, ignore_index, chunk, name, need)[0]
