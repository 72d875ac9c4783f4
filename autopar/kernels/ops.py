"""Register every fused op (`torch.ops.autopar.*`): import this before running a fused program."""

from autopar.kernels import add_norm, bias_gelu, linear_cross_entropy, rotary, swiglu  # noqa: F401

__all__ = ["add_norm", "bias_gelu", "linear_cross_entropy", "rotary", "swiglu"]
