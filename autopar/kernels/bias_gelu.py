"""Fused bias + GELU: y = gelu(x + bias), tanh or erf form, in one pass over x.

Unfused, the matmul's bias add writes [rows x n] and GELU reads and writes it again; fused, x is read once and y
written once (Megatron-LM's `bias_gelu_impl` fuses the same chain). Backward saves only x and bias, as eager
saves the pre-activation. GELU: Hendrycks & Gimpel 2016, erf form 0.5*z*(1 + erf(z/sqrt 2)); tanh form
0.5*z*(1 + tanh(sqrt(2/pi)*(z + 0.044715 z^3))).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from autopar.kernels.dispatch import kernel, rows2d, triton, use_triton

if triton is not None:
    import triton.language as tl

    def _bias_gelu_kernel(x_ptr, b_ptr, g_ptr, out_ptr, n_elem, n_cols,
                          TANH: tl.constexpr, BACKWARD: tl.constexpr, BLOCK: tl.constexpr):
        """Forward: out = gelu(x + b). Backward: out = g * gelu'(x + b). Math in fp32."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elem
        z = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z += tl.load(b_ptr + offs % n_cols, mask=mask, other=0.0).to(tl.float32)
        if TANH:
            k = 0.7978845608028654  # sqrt(2/pi)
            u = k * (z + 0.044715 * z * z * z)
            t = 2.0 * tl.sigmoid(2.0 * u) - 1.0  # tanh(u)
            cdf = 0.5 * (1.0 + t)
            pdf_term = 0.5 * z * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * z * z)
        else:
            cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
            pdf_term = z * tl.exp(-0.5 * z * z) * 0.3989422804014327  # z * phi(z)
        if BACKWARD:
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            out = g * (cdf + pdf_term)
        else:
            out = z * cdf
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, bias: torch.Tensor, grad: torch.Tensor | None, approximate: str) -> torch.Tensor:
    x2 = rows2d(x)
    out = torch.empty_like(x2)
    g2 = rows2d(grad) if grad is not None else x2
    n, block = x2.numel(), 1024
    kernel(_bias_gelu_kernel)[(triton.cdiv(n, block),)](
        x2, bias.contiguous(), g2, out, n, x2.shape[1],
        TANH=approximate == "tanh", BACKWARD=grad is not None, BLOCK=block)
    return out.view(x.shape)


def reference(x: torch.Tensor, bias: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    return F.gelu(x + bias, approximate=approximate)


@torch.library.custom_op("autopar::bias_gelu", mutates_args=())
def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
    """gelu(x + bias) over the last dim's bias; approximate is "none" (erf) or "tanh"."""
    if use_triton(x, bias):
        return _launch(x, bias, None, approximate)
    return reference(x, bias, approximate)


@torch.library.custom_op("autopar::bias_gelu_backward", mutates_args=())
def bias_gelu_backward(grad: torch.Tensor, x: torch.Tensor, bias: torch.Tensor,
                       approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(grad, x, bias):
        gx = _launch(x, bias, grad, approximate)
    else:
        gx = torch.ops.aten.gelu_backward(grad, x + bias, approximate=approximate)
    return gx, gx.reshape(-1, gx.shape[-1]).sum(0, dtype=torch.float32).to(bias.dtype)


@bias_gelu.register_fake
def _(x, bias, approximate):
    return torch.empty_like(x)


@bias_gelu_backward.register_fake
def _(grad, x, bias, approximate):
    return torch.empty_like(x), torch.empty_like(bias)


def _setup(ctx, inputs, output):
    x, bias, ctx.approximate = inputs
    ctx.save_for_backward(x, bias)


def _backward(ctx, grad):
    x, bias = ctx.saved_tensors
    gx, gb = bias_gelu_backward(grad, x, bias, ctx.approximate)
    return gx, gb, None


bias_gelu.register_autograd(_backward, setup_context=_setup)
