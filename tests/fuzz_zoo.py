"""The differential fuzzer's op zoo: small patterns, [batch, seq, d] -> [batch, seq, d], composed into models.

Every op-rule family (matmul-like, pointwise, reductions, scans, views, nn ops, indexing, factories), the fallback
path (ops with no rule), complex dtypes, in-place ops, random ops, masking, parameters used twice, tied weights and
buffers each appear in at least one pattern. A model is an embedding, `blocks` identical blocks (so pipeline stages
and repeated-layer detection apply) each running its patterns with a residual, and a head; its loss is the
cross-entropy, plus an auxiliary loss for some seeds (several losses summed). `tests/parity_worker.py` runs them.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch import nn

D, SEQ, VOCAB = 16, 8, 32
PATTERNS: dict[str, type] = {}


def pattern(name: str, *, random_ops: bool = False):
    def wrap(cls):
        cls.random_ops = random_ops
        PATTERNS[name] = cls
        return cls
    return wrap


class _P(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.d = d

    def lin(self, n_in: int | None = None, n_out: int | None = None, bias: bool = True) -> nn.Linear:
        return nn.Linear(n_in or self.d, n_out or self.d, bias=bias)


# ---- matmul-like
@pattern("linear_gelu")
class LinearGelu(_P):
    def __init__(self, d):
        super().__init__(d); self.up, self.down = self.lin(d, 2 * d), self.lin(2 * d, d)

    def forward(self, h):
        return self.down(F.gelu(self.up(h)))


@pattern("swiglu")
class SwiGLU(_P):
    def __init__(self, d):
        super().__init__(d); self.w1, self.w3, self.w2 = self.lin(bias=False), self.lin(bias=False), self.lin()

    def forward(self, h):
        return self.w2(F.silu(self.w1(h)) * self.w3(h))


@pattern("tanh_mlp")
class TanhMLP(_P):
    def __init__(self, d):
        super().__init__(d); self.a = self.lin()

    def forward(self, h):
        return torch.tanh(self.a(h))


@pattern("einsum")
class Einsum(_P):
    def __init__(self, d):
        super().__init__(d); self.w = nn.Parameter(torch.randn(d, d) / math.sqrt(d))

    def forward(self, h):
        return torch.einsum("bsd,de->bse", h, self.w)


@pattern("bmm")
class Bmm(_P):
    def __init__(self, d):
        super().__init__(d); self.w = nn.Parameter(torch.randn(d, d) / math.sqrt(d))

    def forward(self, h):
        return torch.bmm(h, self.w.expand(h.shape[0], -1, -1))


@pattern("mm_flat")
class MmFlat(_P):
    def __init__(self, d):
        super().__init__(d); self.w = nn.Parameter(torch.randn(d, d) / math.sqrt(d))

    def forward(self, h):
        return (h.reshape(-1, self.d) @ self.w).reshape(h.shape)


@pattern("addmm")
class Addmm(_P):
    def __init__(self, d):
        super().__init__(d); self.w = nn.Parameter(torch.randn(d, d) / math.sqrt(d)); self.b = nn.Parameter(
            torch.randn(d) * 0.1)

    def forward(self, h):
        return torch.addmm(self.b, h.reshape(-1, self.d), self.w).view(h.shape)


@pattern("seq_mix")
class SeqMix(_P):
    """A matmul over the sequence dim (transpose in and out)."""

    def __init__(self, d):
        super().__init__(d); self.w = nn.Parameter(torch.randn(SEQ, SEQ) / math.sqrt(SEQ))

    def forward(self, h):
        return torch.matmul(h.transpose(1, 2), self.w).transpose(1, 2)


# ---- nn ops
@pattern("layer_norm")
class LayerNorm(_P):
    def __init__(self, d):
        super().__init__(d); self.n = nn.LayerNorm(d)

    def forward(self, h):
        return self.n(h)


@pattern("rms_norm")
class RMSNorm(_P):
    def __init__(self, d):
        super().__init__(d); self.w = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))

    def forward(self, h):
        return F.rms_norm(h, (self.d,), self.w)


@pattern("sdpa")
class Attention(_P):
    def __init__(self, d):
        super().__init__(d); self.qkv, self.o = self.lin(d, 3 * d), self.lin()

    def forward(self, h):
        b, s, _ = h.shape
        q, k, v = (t.view(b, s, 4, -1).transpose(1, 2) for t in self.qkv(h).split(self.d, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, s, self.d))


@pattern("manual_attention")
class ManualAttention(_P):
    """Scores by matmul, a causal mask buffer by masked_fill, softmax, matmul."""

    def __init__(self, d):
        super().__init__(d); self.q, self.k, self.v = self.lin(), self.lin(), self.lin()
        self.register_buffer("mask", torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1))

    def forward(self, h):
        scores = self.q(h) @ self.k(h).transpose(-1, -2) / math.sqrt(self.d)
        return torch.softmax(scores.masked_fill(self.mask, float("-inf")), dim=-1) @ self.v(h)


@pattern("position_embedding")
class PositionEmbedding(_P):
    """arange (a factory) into an embedding table."""

    def __init__(self, d):
        super().__init__(d); self.pos = nn.Embedding(SEQ, d)

    def forward(self, h):
        return h + self.pos(torch.arange(h.shape[1]))


# ---- pointwise
@pattern("relu_square")
class ReluSquare(_P):
    def forward(self, h):
        return F.relu(h).pow(2) - 0.5 * h


@pattern("exp_log")
class ExpLog(_P):
    def forward(self, h):
        return torch.log1p(torch.exp(-h.abs())) + torch.sqrt(h * h + 1.0) - torch.rsqrt(h * h + 1.0)


@pattern("sin_cos")
class SinCos(_P):
    def forward(self, h):
        return torch.sin(h) * torch.cos(0.5 * h) + torch.sigmoid(h) / (1.0 + h.abs())


@pattern("where")
class Where(_P):
    def forward(self, h):
        return torch.where(h > 0, h, 0.1 * h)


@pattern("clamp_max")
class ClampMax(_P):
    def forward(self, h):
        return torch.clamp(h, -1.0, 1.0) + torch.maximum(h, 0.5 * h) - torch.minimum(h, -h)


@pattern("masked_fill")
class MaskedFill(_P):
    def __init__(self, d):
        super().__init__(d); self.register_buffer("mask", torch.rand(SEQ, d) > 0.7)

    def forward(self, h):
        return h.masked_fill(self.mask, 0.0) + h.masked_fill(h < -1.0, -1.0)


# ---- reductions
@pattern("softmax_features")
class SoftmaxFeatures(_P):
    def forward(self, h):
        return torch.softmax(h, dim=-1) * h


@pattern("log_softmax_seq")
class LogSoftmaxSeq(_P):
    def forward(self, h):
        return torch.log_softmax(h, dim=1)


@pattern("sum_mean")
class SumMean(_P):
    def forward(self, h):
        return h - h.mean(-1, keepdim=True) + h.sum(1, keepdim=True) / h.shape[1]


@pattern("amax_norm")
class AmaxNorm(_P):
    def forward(self, h):
        return h / (h.abs().amax(-1, keepdim=True) + 1.0)


@pattern("var_std")
class VarStd(_P):
    def forward(self, h):
        return (h - h.mean(1, keepdim=True)) / (h.var(1, keepdim=True) + 1.0).sqrt() + h.std(-1, keepdim=True)


# ---- scans
@pattern("cumsum")
class Cumsum(_P):
    def forward(self, h):
        return h.cumsum(1) / torch.arange(1, h.shape[1] + 1).view(1, -1, 1)


@pattern("cumprod")
class Cumprod(_P):
    def forward(self, h):
        return torch.sigmoid(h).cumprod(-1)


@pattern("diff")
class Diff(_P):
    def forward(self, h):
        return torch.diff(h, dim=1, prepend=h[:, :1])


# ---- views, split, cat
@pattern("permute_view")
class PermuteView(_P):
    def __init__(self, d):
        super().__init__(d); self.a = self.lin()

    def forward(self, h):
        b, s, d = h.shape
        x = self.a(h).view(b, s, 4, d // 4).permute(0, 2, 1, 3) * 2.0
        return x.permute(0, 2, 1, 3).reshape(b, s, d)


@pattern("split_cat")
class SplitCat(_P):
    def forward(self, h):
        a, b = h.split(self.d // 2, dim=-1)
        return torch.cat([b * torch.sigmoid(a), a], dim=-1)


@pattern("chunk_stack")
class ChunkStack(_P):
    def forward(self, h):
        parts = torch.stack(h.chunk(2, dim=1), dim=0)
        return torch.cat([parts.sum(0), parts[1] - parts[0]], dim=1)


@pattern("unbind_select")
class UnbindSelect(_P):
    def forward(self, h):
        first, *_ = h.unbind(1)
        return h + first.unsqueeze(1) * 0.5 + h[:, :, 0:1] - h.select(-1, 1).unsqueeze(-1)


@pattern("narrow")
class Narrow(_P):
    def forward(self, h):
        return torch.cat([h.narrow(1, 1, h.shape[1] - 1), h.narrow(1, 0, 1)], dim=1)


@pattern("expand_unsqueeze")
class ExpandUnsqueeze(_P):
    def __init__(self, d):
        super().__init__(d); self.g = nn.Parameter(torch.randn(d) * 0.1 + 1.0)

    def forward(self, h):
        return h * self.g.unsqueeze(0).unsqueeze(0).expand(h.shape[0], h.shape[1], -1)


# ---- indexing
@pattern("gather")
class Gather(_P):
    def __init__(self, d):
        super().__init__(d); self.register_buffer("idx", torch.randint(0, d, (1, 1, d)))

    def forward(self, h):
        return torch.gather(h, -1, self.idx.expand(h.shape[0], h.shape[1], -1))


@pattern("scatter_add")
class ScatterAdd(_P):
    def __init__(self, d):
        super().__init__(d); self.register_buffer("idx", torch.randint(0, d, (1, 1, d)))

    def forward(self, h):
        return torch.zeros_like(h).scatter_add(-1, self.idx.expand(h.shape[0], h.shape[1], -1), h)


@pattern("advanced_index")
class AdvancedIndex(_P):
    def __init__(self, d):
        super().__init__(d); self.register_buffer("perm", torch.randperm(SEQ))

    def forward(self, h):
        return h[:, self.perm] + h


# ---- parameters used twice, tied weights, buffers
@pattern("param_twice")
class ParamTwice(_P):
    def __init__(self, d):
        super().__init__(d); self.a = self.lin()

    def forward(self, h):
        return self.a(torch.tanh(self.a(h)))


@pattern("tied_pair")
class TiedPair(_P):
    def __init__(self, d):
        super().__init__(d); self.a, self.b = self.lin(bias=False), self.lin(bias=False)
        self.b.weight = self.a.weight

    def forward(self, h):
        return self.b(F.silu(self.a(h)))


@pattern("buffer_scale")
class BufferScale(_P):
    def __init__(self, d):
        super().__init__(d); self.register_buffer("scale", torch.linspace(0.5, 1.5, d))

    def forward(self, h):
        return h * self.scale + torch.ones_like(h) * 0.1 + h.new_ones(h.shape[-1])


# ---- no rule: the fallback
@pattern("flip_roll")
class FlipRoll(_P):
    def forward(self, h):
        return torch.flip(h, [-1]) + torch.roll(h, 1, 1)


@pattern("sort_topk")
class SortTopk(_P):
    def forward(self, h):
        return h.sort(-1).values + torch.logsumexp(h, -1, keepdim=True)


# ---- complex dtypes
@pattern("complex_rotation")
class ComplexRotation(_P):
    def __init__(self, d):
        super().__init__(d); self.a = self.lin()
        self.register_buffer("angle", torch.linspace(0.0, 3.0, d // 2))

    def forward(self, h):
        h = self.a(h)
        c = torch.view_as_complex(h.reshape(*h.shape[:-1], -1, 2)) * torch.polar(torch.ones_like(self.angle),
                                                                                  self.angle)
        return torch.view_as_real(c).flatten(-2)


@pattern("rfft_abs")
class RfftAbs(_P):
    def __init__(self, d):
        super().__init__(d); self.a, self.b = self.lin(), self.lin(d // 2 + 1, d)

    def forward(self, h):
        return self.b(torch.fft.rfft(self.a(h), dim=-1).abs())


@pattern("spectral_filter")
class SpectralFilter(_P):
    """FNet-style filtering along the sequence: irfft(rfft(h) * learned real filter)."""

    def __init__(self, d):
        super().__init__(d); self.f = nn.Parameter(torch.randn(SEQ // 2 + 1, d) * 0.1 + 1.0)

    def forward(self, h):
        return torch.fft.irfft(torch.fft.rfft(h, dim=1) * self.f, n=h.shape[1], dim=1)


# ---- in-place ops
@pattern("inplace_chain")
class InplaceChain(_P):
    def __init__(self, d):
        super().__init__(d); self.a = self.lin()

    def forward(self, h):
        h = self.a(h).clone()
        h.mul_(0.5).add_(1.0)
        return h


@pattern("inplace_slice")
class InplaceSlice(_P):
    def forward(self, h):
        h = h.clone()
        h[..., :2] *= 2.0
        return h


@pattern("inplace_masked")
class InplaceMasked(_P):
    def forward(self, h):
        return (h * 1.0).masked_fill_(h > 1.5, 1.5).relu_()


# ---- random
@pattern("dropout", random_ops=True)
class Dropout(_P):
    def forward(self, h):
        return F.dropout(h, p=0.1, training=True)


class Block(nn.Module):
    def __init__(self, names: list[str], d: int):
        super().__init__()
        self.parts = nn.ModuleList(PATTERNS[n](d) for n in names)
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in names)

    def forward(self, h):
        for part, norm in zip(self.parts, self.norms):
            h = h + part(norm(h))
        return h


class ZooModel(nn.Module):
    vocab, seq = VOCAB, SEQ

    def __init__(self, names: list[str], blocks: int = 2, tied: bool = False, aux_loss: bool = False, d: int = D):
        super().__init__()
        self.names = names
        self.emb = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList(Block(names, d) for _ in range(blocks))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)
        if tied:
            self.head.weight = self.emb.weight
        self.aux_loss = aux_loss

    def forward(self, tokens, targets):
        h = self.emb(tokens)
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)
        loss = F.cross_entropy(self.head(h).flatten(0, 1), targets.flatten())
        if self.aux_loss:  # several losses summed
            loss = loss + 0.01 * h.pow(2).mean()
        return loss


def zoo_model(names: list[str], blocks: int = 2, tied: bool = False, aux_loss: bool = False) -> ZooModel:
    return ZooModel(list(names), blocks, tied, aux_loss)


# Plan kinds on 4 ranks, as `autopar.compile` pins: data, tensor, both, ZeRO-1, ZeRO-3, checkpointing, pipeline.
PLAN_KINDS = {
    "dp": {"dp": 4},
    "tp": {"tp": 4},
    "dp_x_tp": {"dp": 2, "tp": 2},
    "zero1": {"dp": 4, "zero": 1},
    "zero3": {"dp": 2, "tp": 2, "zero": 3},
    "ac": {"dp": 2, "tp": 2, "ac": "full"},
    "ac_selective": {"dp": 4, "ac": "selective"},
    "pp": {"pp": 2, "dp": 2},
}


def allowed(names: list[str], kind: str) -> bool:
    """Random ops draw per micro-batch under a pipeline: such plans are refused (autopar/codegen/random_ops.py)."""
    return not (kind == "pp" and any(PATTERNS[n].random_ops for n in names))


def covering_cases(per_model: int, seed: int = 0) -> list[dict]:
    """Every pattern at least once per plan kind: the patterns shuffled, in models of `per_model` each."""
    rng = random.Random(seed)
    cases = []
    for kind, fix in PLAN_KINDS.items():
        names = [n for n in PATTERNS if allowed([n], kind)]
        rng.shuffle(names)
        for i in range(0, len(names), per_model):
            group = names[i: i + per_model]
            cases.append(_case(f"{kind}-{i // per_model}", group, fix, tied=rng.random() < 0.3,
                               aux_loss=rng.random() < 0.3, seed=rng.randrange(1000)))
    return cases


def random_cases(n: int, seed: int, per_model: tuple[int, int] = (2, 5)) -> list[dict]:
    """n (model, plan) pairs drawn from `seed`: random patterns, options and plan kind."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        kind = rng.choice(list(PLAN_KINDS))
        pool = [p for p in PATTERNS if allowed([p], kind)]
        names = rng.sample(pool, rng.randint(*per_model))
        cases.append(_case(f"s{seed}-{i}-{kind}", names, PLAN_KINDS[kind], tied=rng.random() < 0.3,
                           aux_loss=rng.random() < 0.3, seed=rng.randrange(1000)))
    return cases


def _case(case_id: str, names: list[str], fix: dict, *, tied: bool, aux_loss: bool, seed: int) -> dict:
    return {"id": case_id, "factory": "tests.fuzz_zoo:zoo_model", "fix": fix, "seed": seed, "steps": 2, "batch": 4,
            "kwargs": {"names": names, "tied": tied, "aux_loss": aux_loss}, "patterns": names}
