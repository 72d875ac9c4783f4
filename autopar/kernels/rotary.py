"""Fused rotary position embedding (Su et al. 2021, RoFormer eq. 34, rotate-half layout) on q or k:
out = x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2]).

Unfused this is seven ops (two slices, neg, cat, two muls, add) and four [.., d] temporaries; fused, x is read once
and out written once. cos and sin broadcast against x (autopar's [s, d] tables, transformers' [b, 1, s, d]) and are
read through their broadcast strides, never materialised. Backward is the inverse rotation:
dx = g * cos + rotate_half^T(g * sin), where rotate_half^T(y) = cat(y[..., d/2:], -y[..., :d/2]).
"""

from __future__ import annotations

import torch

from autopar.kernels.dispatch import block, kernel, triton, use_triton

if triton is not None:
    import triton.language as tl

    def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, d1, d2, half, c0, c1, c2, c3,
                       BACKWARD: tl.constexpr, BLOCK: tl.constexpr):
        """One program per row of x viewed as [d0, d1, d2, d]; cos/sin strides (c0..c3) may be 0 (broadcast)."""
        row = tl.program_id(0)
        i2 = row % d2
        i1 = (row // d2) % d1
        i0 = row // (d2 * d1)
        cols = tl.arange(0, BLOCK)
        mask = cols < half
        base = row * 2 * half
        trig = i0 * c0 + i1 * c1 + i2 * c2
        x1 = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + base + half + cols, mask=mask, other=0.0).to(tl.float32)
        cos1 = tl.load(cos_ptr + trig + cols * c3, mask=mask, other=0.0).to(tl.float32)
        cos2 = tl.load(cos_ptr + trig + (cols + half) * c3, mask=mask, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_ptr + trig + cols * c3, mask=mask, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + trig + (cols + half) * c3, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            y1 = x1 * cos1 + x2 * sin2
            y2 = x2 * cos2 - x1 * sin1
        else:
            y1 = x1 * cos1 - x2 * sin1
            y2 = x2 * cos2 + x1 * sin2
        tl.store(out_ptr + base + cols, y1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + base + half + cols, y2.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    x4 = x.contiguous().view((1,) * (4 - x.dim()) + tuple(x.shape))
    cos4, sin4 = cos.expand(x4.shape), sin.expand(x4.shape)
    if cos4.stride() != sin4.stride():
        cos4, sin4 = cos4.contiguous(), sin4.contiguous()
    out = torch.empty_like(x4)
    half = x4.shape[-1] // 2
    kernel(_rotary_kernel)[(x4.numel() // x4.shape[-1],)](
        x4, cos4, sin4, out, x4.shape[1], x4.shape[2], half, *cos4.stride(), BACKWARD=backward, BLOCK=block(half))
    return out.view(x.shape)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """Forward: x * cos + cat(-x_hi, x_lo) * sin. Backward (the transpose): x * cos + cat(y_hi, -y_lo), y = x * sin."""
    half = x.shape[-1] // 2
    if not backward:
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin
    y = x * sin
    return x * cos + torch.cat([y[..., half:], -y[..., :half]], dim=-1)


def reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _rotate(x, cos, sin, backward=False)


def supported(x_dim: int, head_dim: int) -> bool:
    """The kernel's layout: up to 4 dims, an even last dim."""
    return x_dim <= 4 and head_dim % 2 == 0


@torch.library.custom_op("autopar::rotary", mutates_args=())
def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin over the last dim; cos and sin broadcast against x."""
    if use_triton(x, cos, sin) and supported(x.dim(), x.shape[-1]):
        return _launch(x, cos, sin, backward=False)
    return reference(x, cos, sin)


@torch.library.custom_op("autopar::rotary_backward", mutates_args=())
def rotary_backward(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if use_triton(grad, cos, sin) and supported(grad.dim(), grad.shape[-1]):
        return _launch(grad, cos, sin, backward=True)
    return _rotate(grad, cos, sin, backward=True)


@rotary.register_fake
def _(x, cos, sin):
    return torch.empty_like(x)


@rotary_backward.register_fake
def _(grad, cos, sin):
    return torch.empty_like(grad)


def _setup(ctx, inputs, output):
    _, cos, sin = inputs
    ctx.save_for_backward(cos, sin)


def _backward(ctx, grad):
    cos, sin = ctx.saved_tensors  # tables are constants (buffers): no gradient flows to them
    return rotary_backward(grad, cos, sin), None, None


rotary.register_autograd(_backward, setup_context=_setup)
