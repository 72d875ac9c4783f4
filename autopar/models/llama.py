"""Llama 2/3 style decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU).

Plain PyTorch, no autopar imports. Two choices serve the planner rather than speed:
- RMSNorm is written out (pow, mean, rsqrt, mul) so the traced graph holds ordinary pointwise/reduction ops the
  sharding rules already know, instead of a fused norm kernel.
- RoPE uses the real-valued rotate-half form (Su et al. 2021, RoFormer eq. 34) with cos/sin tables as
  non-persistent buffers: no complex dtypes in the graph, and on device="meta" the tables are shapes only.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    layers: int  # number of transformer blocks
    hidden: int  # model width d_model
    heads: int  # query heads; hidden must divide evenly
    vocab: int  # token vocabulary size
    seq: int  # max positions (rows of the RoPE tables)
    intermediate: int  # SwiGLU hidden width (w1/w3 output, w2 input)
    kv_heads: int | None = None  # key/value heads for GQA; None means = heads (plain multi-head attention)
    rope_theta: float = 500000.0  # RoPE base frequency (Llama 3 uses 500000)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # lm_head shares embed's weight

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}")
        if self.heads % self.n_kv_heads:
            raise ValueError(f"heads={self.heads} is not divisible by kv_heads={self.n_kv_heads}")
        if (self.hidden // self.heads) % 2:
            raise ValueError(f"head dim hidden/heads={self.hidden // self.heads} must be even for RoPE")

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(seq: int, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [seq, head_dim], each half repeated (rotate-half layout), on the current device.

    Angles are computed in float32 (bf16 cannot resolve position*freq at long seq) and only the result is cast.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [b, heads, s, hd]; cos/sin: [s, hd]. Rotates each (i, i + hd/2) pair by its position's angle."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads = cfg.heads, cfg.n_kv_heads
        hd = cfg.hidden // cfg.heads
        self.q = nn.Linear(cfg.hidden, cfg.heads * hd, bias=False)
        self.k = nn.Linear(cfg.hidden, self.kv_heads * hd, bias=False)
        self.v = nn.Linear(cfg.hidden, self.kv_heads * hd, bias=False)
        self.o = nn.Linear(cfg.heads * hd, cfg.hidden, bias=False)

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        """[b, kv_heads, s, hd] -> [b, heads, s, hd]; each kv head serves heads/kv_heads query heads (GQA)."""
        rep = self.heads // self.kv_heads
        if rep == 1:
            return x
        b, kvh, s, hd = x.shape
        return x[:, :, None].expand(b, kvh, rep, s, hd).reshape(b, kvh * rep, s, hd)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        hd = h // self.heads
        q = self.q(x).view(b, s, self.heads, hd).transpose(1, 2)
        k = self.k(x).view(b, s, self.kv_heads, hd).transpose(1, 2)
        v = self.v(x).view(b, s, self.kv_heads, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, self._repeat_kv(k), self._repeat_kv(v), is_causal=True, dropout_p=0.0)
        return self.o(y.transpose(1, 2).reshape(b, s, h))


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.w2 = nn.Linear(cfg.intermediate, cfg.hidden, bias=False)
        self.w3 = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


class Llama(nn.Module):
    """forward(tokens, targets=None): scalar mean cross-entropy loss if targets is given, else logits."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.hidden)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = RMSNorm(config.hidden, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden, config.vocab, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """normal(0, 0.02) weights, unit norms, fresh RoPE tables on the weights' device.

        Re-run after materializing a meta-built model (e.g. `to_empty`), since non-persistent buffers are not loaded.
        """
        if not self.embed.weight.is_meta:  # meta tensors hold no values; skipping keeps a 70B meta build fast
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, mean=0.0, std=0.02)
                elif isinstance(m, RMSNorm):
                    nn.init.ones_(m.weight)
        cfg = self.config
        weight = self.embed.weight  # tables follow the weights' device and dtype, so forward needs no cast
        with torch.device(weight.device):
            cos, sin = rope_tables(cfg.seq, cfg.hidden // cfg.heads, cfg.rope_theta, weight.dtype)
        self.rope_cos, self.rope_sin = cos, sin

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        s = tokens.shape[1]
        x = self.embed(tokens)
        cos, sin = self.rope_cos[:s], self.rope_sin[:s]
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, self.config.vocab), targets.view(-1))
