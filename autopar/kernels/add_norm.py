"""Fused residual add + LayerNorm or RMSNorm: h = x + residual; out = norm(h); returns (out, h).

The pre-norm transformer's `x = x + f(x); y = norm(x)` reads and writes h three times unfused (add, statistics,
normalise); fused, x and the residual are read once and out and h written once, and backward keeps h and two
fp32 numbers per row (mean and 1/std; Ba et al. 2016 for LayerNorm, Zhang & Sennrich 2019 for RMSNorm). With no
residual it is the norm alone: the written-out RMSNorm (pow, mean, add, rsqrt, mul, mul) becomes one kernel.
Backward: dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)) with dxhat = dout * weight (the mean(dxhat)
term only for LayerNorm), plus the gradient that reaches h directly; weight and bias gradients are summed over rows
in per-program partials.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from autopar.kernels.dispatch import block, kernel, rows2d, triton, use_triton

if triton is not None:
    import triton.language as tl

    def _add_norm_fwd(x_ptr, r_ptr, w_ptr, b_ptr, out_ptr, h_ptr, stats_ptr, n_cols, eps,
                      HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, RMS: tl.constexpr,
                      BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        h = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            h += tl.load(r_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            h = h.to(h_ptr.dtype.element_ty)  # rounded to the input dtype, as eager's add
            tl.store(h_ptr + row * n_cols + cols, h, mask=mask)
            h = h.to(tl.float32)
        if RMS:
            mean = 0.0
            xc = h
        else:
            mean = tl.sum(h, axis=0) / n_cols
            xc = tl.where(mask, h - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
        y = xc * rstd
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(stats_ptr + row * 2, mean)
        tl.store(stats_ptr + row * 2 + 1, rstd)

    def _add_norm_bwd(g_ptr, gh_ptr, h_ptr, w_ptr, stats_ptr, dx_ptr, dw_ptr, db_ptr, n_rows, n_cols,
                      HAS_GH: tl.constexpr, HAS_W: tl.constexpr, RMS: tl.constexpr, BLOCK: tl.constexpr):
        """Each program takes rows pid, pid + G, ... and writes its partial weight/bias gradient sums."""
        pid, n_prog = tl.program_id(0), tl.num_programs(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) if HAS_W else 1.0
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        db = tl.zeros([BLOCK], dtype=tl.float32)
        for row in range(pid, n_rows, n_prog):
            g = tl.load(g_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            h = tl.load(h_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(stats_ptr + row * 2)
            rstd = tl.load(stats_ptr + row * 2 + 1)
            xhat = tl.where(mask, (h - mean) * rstd, 0.0)
            dxhat = g * w
            c = tl.sum(dxhat * xhat, axis=0) / n_cols
            if RMS:
                dx = (dxhat - xhat * c) * rstd
            else:
                dx = (dxhat - tl.sum(dxhat, axis=0) / n_cols - xhat * c) * rstd
            if HAS_GH:
                dx += tl.load(gh_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + row * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dw += g * xhat
            db += g
        tl.store(dw_ptr + pid * n_cols + cols, dw, mask=mask)
        tl.store(db_ptr + pid * n_cols + cols, db, mask=mask)


def _norm(h: torch.Tensor, weight, bias, eps: float, rms: bool) -> torch.Tensor:
    """The reference norm, written as autopar's and transformers' models write it."""
    if not rms:
        return F.layer_norm(h, h.shape[-1:], weight, bias, eps)
    out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return out * weight if weight is not None else out


def _fwd_triton(x, residual, weight, bias, eps, rms):
    x2 = rows2d(x)
    rows, n = x2.shape
    out = torch.empty_like(x2)
    h = torch.empty_like(x2) if residual is not None else x.new_empty(0)
    stats = torch.empty(rows, 2, dtype=torch.float32, device=x.device)
    kernel(_add_norm_fwd)[(rows,)](
        x2, rows2d(residual) if residual is not None else x2, weight if weight is not None else x2,
        bias if bias is not None else x2, out, h if residual is not None else x2, stats, n, eps,
        HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None, RMS=rms,
        BLOCK=block(n, 1 << 16))
    return out.view(x.shape), (h.view(x.shape) if residual is not None else h), stats


@torch.library.custom_op("autopar::add_norm", mutates_args=())
def add_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
             bias: torch.Tensor | None, eps: float, rms: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual, per-row statistics); with residual None the second output is empty and
    the norm reads x. rms selects RMSNorm (no centring, no bias) over LayerNorm."""
    if use_triton(x):
        return _fwd_triton(x, residual, weight, bias, eps, rms)
    h = x + residual if residual is not None else x
    out = _norm(h, weight, bias, eps, rms)
    return out, (h if residual is not None else x.new_empty(0)), x.new_empty(0, dtype=torch.float32)


@torch.library.custom_op("autopar::add_norm_backward", mutates_args=())
def add_norm_backward(grad: torch.Tensor, grad_h: torch.Tensor | None, h: torch.Tensor, weight: torch.Tensor | None,
                      bias: torch.Tensor | None, stats: torch.Tensor, eps: float, rms: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d h, d weight, d bias); empty tensors stand for absent weight/bias."""
    if stats.numel():  # the forward ran the Triton kernel
        return _bwd_triton(grad, grad_h, h, weight, bias, stats, rms)
    return _bwd_reference(grad, grad_h, h, weight, bias, eps, rms)


def _bwd_reference(grad, grad_h, h, weight, bias, eps, rms):
    """The same backward in torch, in fp32 (autograd is off inside a custom op's implementation)."""
    hf, g = h.float(), grad.float()
    mean = hf.new_zeros(()) if rms else hf.mean(-1, keepdim=True)
    rstd = torch.rsqrt((hf - mean).pow(2).mean(-1, keepdim=True) + eps)
    xhat = (hf - mean) * rstd
    dxhat = g * weight.float() if weight is not None else g
    dx = dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True)
    if not rms:
        dx = dx - dxhat.mean(-1, keepdim=True)
    dx = dx * rstd + (grad_h.float() if grad_h is not None else 0)
    rows = g.reshape(-1, g.shape[-1])
    gw = (rows * xhat.reshape(rows.shape)).sum(0).to(weight.dtype) if weight is not None else h.new_empty(0)
    gb = rows.sum(0).to(bias.dtype) if bias is not None else h.new_empty(0)
    return dx.to(h.dtype), gw, gb


def _bwd_triton(grad, grad_h, h, weight, bias, stats, rms):
    g2, h2 = rows2d(grad), rows2d(h)
    rows, n = h2.shape
    n_prog = max(1, min(rows, 128))
    dx = torch.empty_like(h2)
    dw = torch.empty(n_prog, n, dtype=torch.float32, device=h.device)
    db = torch.empty_like(dw)
    kernel(_add_norm_bwd)[(n_prog,)](
        g2, rows2d(grad_h) if grad_h is not None else g2, h2, weight if weight is not None else h2, stats,
        dx, dw, db, rows, n, HAS_GH=grad_h is not None, HAS_W=weight is not None, RMS=rms,
        BLOCK=block(n, 1 << 16))
    gw = dw.sum(0).to(weight.dtype) if weight is not None else h.new_empty(0)
    gb = db.sum(0).to(bias.dtype) if bias is not None else h.new_empty(0)
    return dx.view(h.shape), gw, gb


@add_norm.register_fake
def _(x, residual, weight, bias, eps, rms):
    rows = x.numel() // x.shape[-1]
    return (torch.empty_like(x), torch.empty_like(x) if residual is not None else x.new_empty(0),
            x.new_empty(rows, 2, dtype=torch.float32))


@add_norm_backward.register_fake
def _(grad, grad_h, h, weight, bias, stats, eps, rms):
    return (torch.empty_like(h), torch.empty_like(weight) if weight is not None else h.new_empty(0),
            torch.empty_like(bias) if bias is not None else h.new_empty(0))


def _setup(ctx, inputs, output):
    x, residual, weight, bias, ctx.eps, ctx.rms = inputs
    ctx.has_res = residual is not None
    ctx.save_for_backward(output[1] if ctx.has_res else x, weight, bias, output[2])


def _backward(ctx, grad, grad_h, _grad_stats):
    h, weight, bias, stats = ctx.saved_tensors
    if grad is None:
        grad = torch.zeros_like(h)
    dh, dw, db = add_norm_backward(grad, grad_h if ctx.has_res else None, h, weight, bias, stats, ctx.eps, ctx.rms)
    return dh, (dh if ctx.has_res else None), (dw if weight is not None else None), \
        (db if bias is not None else None), None, None


add_norm.register_autograd(_backward, setup_context=_setup)
