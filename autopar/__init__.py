"""autopar: a declarative auto-parallel compiler for PyTorch training.

    compiled = autopar.compile(model, mesh, sample_inputs=(tokens, targets))   # under torchrun
    plan = autopar.make_plan("llama3-8b", devices=64, hardware="h100-80gb-sxm", batch=64, seq=8192)
"""

from autopar.errors import AutoparError

__all__ = ["AutoparError", "Plan", "compile", "make_plan"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """The rest on first use: `autopar.compile` imports the runtime (FSDP2, pipelining: ~1 s), so that planning
    alone does not pay for it, and `make_plan` and `Plan` import torch, so that the `autopar` command
    (cli/command.py) can set up the process before torch is imported."""
    if name == "compile":
        from autopar.api import compile

        return compile
    if name == "make_plan":
        from autopar.planning import make_plan

        return make_plan
    if name == "Plan":
        from autopar.plan import Plan

        return Plan
    raise AttributeError(f"module 'autopar' has no attribute {name!r}")
