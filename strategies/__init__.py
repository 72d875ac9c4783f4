"""The search space, declared: one module per op family; importing this package registers every rule.

To add an op: write a single-axis rule (see base.py) in the module of its family, or add it to a table there."""

from autopar.strategies import (factory, indexing, matmul, nn_ops, pointwise, reductions,  # noqa: F401  (registers)
                                 scans, views)
from autopar.strategies.base import (RULES, OpInfo, OpRule, Strategy, Strategy1D, expand, grad_partial_axes,
                                     op_name, packet_of, rule_for, tensor_inputs, tensor_values)

__all__ = ["RULES", "OpInfo", "OpRule", "Strategy", "Strategy1D", "expand", "grad_partial_axes", "op_name", "packet_of",
           "rule_for", "tensor_inputs", "tensor_values"]
