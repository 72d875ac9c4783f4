"""Small models that once trained silently wrong or crashed under autopar (issue 18), as a user wrote them.

Each takes (tokens, targets) of shape [batch, seq] and returns the mean cross-entropy; `vocab` and `seq` say what
tests/parity_worker.py feeds them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Base(nn.Module):
    vocab, seq = 32, 8

    def __init__(self, d: int = 16):
        super().__init__()
        self.emb = nn.Embedding(self.vocab, d)
        self.a = nn.Linear(d, d)
        self.head = nn.Linear(d, self.vocab)

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head(h).flatten(0, 1), targets.flatten())


class ComplexRotation(_Base):
    """A linear layer's output features rotated as complex pairs (view_as_complex * polar, view_as_real)."""

    def __init__(self, d: int = 16):
        super().__init__(d)
        self.b = nn.Linear(d, d)
        self.register_buffer("angle", torch.linspace(0.0, 3.0, d // 2))

    def forward(self, tokens, targets):
        h = self.a(self.emb(tokens))
        rotated = torch.view_as_complex(h.reshape(*h.shape[:-1], -1, 2)) * torch.polar(
            torch.ones_like(self.angle), self.angle)
        h = torch.view_as_real(rotated).flatten(-2)
        return self.loss(self.b(h), targets)


class RfftMix(_Base):
    """Features mixed by |rfft| between two linear layers."""

    def __init__(self, d: int = 16):
        super().__init__(d)
        self.b = nn.Linear(d // 2 + 1, d)

    def forward(self, tokens, targets):
        h = self.a(self.emb(tokens))
        h = torch.fft.rfft(h, dim=-1).abs()
        return self.loss(self.b(h), targets)


class InplaceAfterCollective(_Base):
    """In-place ops on an activation (`h.mul_(0.5).add_(1.0)` on a clone)."""

    def forward(self, tokens, targets):
        h = self.a(self.emb(tokens))
        h = h.clone()
        h.mul_(0.5).add_(1.0)
        h[..., :2].mul_(2.0)  # in place through a view
        return self.loss(h, targets)


class SplitReshape(_Base):
    """A reshape of one output of a split, saved for backward: the planning graph's walk back through views
    passes a `operator.getitem` node (a Python builtin call target)."""

    def __init__(self, d: int = 16):
        super().__init__(d)
        self.a = nn.Linear(d, 2 * d)
        self.b = nn.Linear(d, d)

    def forward(self, tokens, targets):
        u, v = self.a(self.emb(tokens)).chunk(2, dim=-1)
        u = u.reshape(u.shape[0], -1, u.shape[-1])
        return self.loss(self.b(u * v) + u.sin(), targets)


class BuiltinTargets(_Base):
    """Arithmetic on tensors; `builtin_targets` makes its captured graph call `operator.add` / `operator.mul` /
    `operator.neg` instead of the aten ops, as graphs from some exporters (and fx symbolic tracing) do."""

    def forward(self, tokens, targets):
        h = self.a(self.emb(tokens))
        h = h * torch.sigmoid(h) + (-h) * 0.25
        u, v = h.chunk(2, dim=-1)
        h = torch.cat([u.reshape(u.shape[0], -1, u.shape[-1]) * v, v], dim=-1)
        return self.loss(h, targets)


_AS_BUILTIN = {torch.ops.aten.add.Tensor: "add", torch.ops.aten.mul.Tensor: "mul", torch.ops.aten.neg.default: "neg"}


def builtin_targets() -> BuiltinTargets:
    """A BuiltinTargets model whose capture (in this process) swaps its aten arithmetic for Python operators."""
    import operator

    import autopar.api

    original = getattr(autopar.api.capture, "__wrapped__", autopar.api.capture)

    def capture(model, sample_inputs):
        captured = original(model, sample_inputs)
        if isinstance(model, BuiltinTargets):
            for node in captured.graph.nodes:
                if node.op == "call_function" and node.target in _AS_BUILTIN:
                    node.target = getattr(operator, _AS_BUILTIN[node.target])
        return captured

    capture.__wrapped__ = original
    autopar.api.capture = capture
    return BuiltinTargets()
