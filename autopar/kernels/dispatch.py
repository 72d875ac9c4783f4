"""How a fused op picks its implementation, and the lazy Triton hook every kernel file shares.

CUDA tensors take the Triton kernel; CPU tensors take the op's torch reference path; with TRITON_INTERPRET=1 the
Triton kernels run on CPU tensors through Triton's interpreter (how the tests check them without a GPU). triton is
imported only by `autopar.kernels` (which codegen imports when it fuses), never by the planner, so `autopar plan`
runs where triton is not installed.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import torch

try:  # triton ships for Linux only; elsewhere every op runs its reference path
    import triton
except ImportError:  # pragma: no cover - exercised on macOS/Windows
    triton = None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """The Triton path serves CUDA tensors, and CPU tensors under the interpreter; otherwise the reference runs."""
    if triton is None:
        return False
    if all(t.is_cuda for t in tensors):
        return True
    if interpreting():
        _check_interpreter()
        return True
    return False


@functools.cache
def _check_interpreter() -> None:
    """triton decorates its own library (tl.sum, tl.sigmoid, ...) when imported: the interpreter can run them only
    if TRITON_INTERPRET=1 was already set then."""
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(triton.language.sigmoid, InterpretedFunction):
        raise RuntimeError("TRITON_INTERPRET=1 was set after triton was imported, so Triton's interpreter cannot run "
                           "its library functions; set it in the environment before starting Python "
                           "(TRITON_INTERPRET=1 python ...)")


@functools.cache
def _jit(fn: Callable, interpret: bool):
    return triton.jit(fn)  # triton decides interpreter vs compiler when decorating, so decorate per mode


def kernel(fn: Callable):
    """The Triton kernel for a plain kernel function, made when first launched (so setting TRITON_INTERPRET after
    import still takes effect)."""
    return _jit(fn, interpreting())


def block(n: int, cap: int = 4096) -> int:
    """Smallest power of two >= n (Triton blocks are powers of two), at most cap."""
    return min(cap, triton.next_power_of_2(max(n, 1)))


def rows2d(x: torch.Tensor) -> torch.Tensor:
    """A contiguous [rows, last dim] view of x."""
    return x.contiguous().view(-1, x.shape[-1])
