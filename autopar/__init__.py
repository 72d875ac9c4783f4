"""autopar: a declarative auto-parallel compiler for PyTorch training.

    compiled = autopar.compile(model, mesh, sample_inputs=(tokens, targets))   # under torchrun
    plan = autopar.make_plan("llama3-8b", devices=64, hardware="h100-80gb-sxm", batch=64, seq=8192)
"""

from autopar.errors import AutoparError
from autopar.plan import Plan
from autopar.planning import make_plan

__all__ = ["AutoparError", "Plan", "compile", "make_plan"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """`autopar.compile` imports the runtime (FSDP2, pipelining: ~1 s) on first use, so that planning alone,
    e.g. `autopar plan`, does not pay for it."""
    if name == "compile":
        from autopar.api import compile

        return compile
    raise AttributeError(f"module 'autopar' has no attribute {name!r}")
