"""Fused SwiGLU: y = silu(a) * b (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6), one pass.

Unfused, silu(a) is written out, saved for backward and read again by the product; fused, a and b are read once
and y written once, and backward saves only a and b (eager saves a, b and silu(a)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from autopar.kernels.dispatch import kernel, triton, use_triton

if triton is not None:
    import triton.language as tl

    def _swiglu_kernel(a_ptr, b_ptr, g_ptr, out_ptr, gb_ptr, n_elem, BACKWARD: tl.constexpr, BLOCK: tl.constexpr):
        """Forward: out = silu(a) * b. Backward: out = d/da, gb = d/db, both times g. Math in fp32."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elem
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(a)
        silu = a * sig
        if BACKWARD:
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            ga = g * b * sig * (1.0 + a * (1.0 - sig))
            tl.store(out_ptr + offs, ga.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(gb_ptr + offs, (g * silu).to(gb_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(out_ptr + offs, (silu * b).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(a: torch.Tensor, b: torch.Tensor, grad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = a.contiguous(), b.contiguous()
    out, gb = torch.empty_like(a), torch.empty_like(b) if grad is not None else a
    n, block = a.numel(), 1024
    kernel(_swiglu_kernel)[(triton.cdiv(n, block),)](
        a, b, grad.contiguous() if grad is not None else a, out, gb, n, BACKWARD=grad is not None, BLOCK=block)
    return out, gb


def reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.silu(a) * b


@torch.library.custom_op("autopar::swiglu", mutates_args=())
def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b for a and b of one shape."""
    if use_triton(a, b):
        return _launch(a, b, None)[0]
    return reference(a, b)


@torch.library.custom_op("autopar::swiglu_backward", mutates_args=())
def swiglu_backward(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(grad, a, b):
        return _launch(a, b, grad)
    return torch.ops.aten.silu_backward(grad * b, a), grad * F.silu(a)


@swiglu.register_fake
def _(a, b):
    return torch.empty_like(a)


@swiglu_backward.register_fake
def _(grad, a, b):
    return torch.empty_like(a), torch.empty_like(b)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    return swiglu_backward(grad, *ctx.saved_tensors)


swiglu.register_autograd(_backward, setup_context=_setup)
