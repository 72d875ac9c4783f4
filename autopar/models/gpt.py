"""GPT-2/GPT-3 style decoder (pre-LN, learned positions, GELU MLP).

Plain PyTorch on purpose: no autopar imports, so the traced graph is exactly what a user would write. Attention
keeps q, k and v as separate Linears because the sharding planner splits each weight along its own output dim; a
fused qkv weight would have to be split into three interleaved column blocks, which one sharding cannot express.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    layers: int  # number of transformer blocks
    hidden: int  # model width d_model
    heads: int  # attention heads; hidden must divide evenly
    vocab: int  # token vocabulary size (rows of wte)
    seq: int  # max positions (rows of wpe)
    mlp_ratio: int = 4  # MLP width = mlp_ratio * hidden
    dropout: float = 0.0  # residual/embedding dropout; attention dropout is always 0
    tie_embeddings: bool = True  # lm_head shares wte's weight (GPT-2/3)
    bias: bool = True  # biases on Linear and LayerNorm
    attention: str = "sdpa"  # "eager": softmax(QK^T/sqrt(d))V with attention dropout, the layer Korthikanti et al.
    # (2022) count activations for; "sdpa": F.scaled_dot_product_attention, which never stores the s x s scores

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}")
        if self.attention not in ("sdpa", "eager"):
            raise ValueError(f"attention={self.attention!r} is not one of sdpa, eager")


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.heads, self.eager = cfg.heads, cfg.attention == "eager"
        self.attn_drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 and self.eager else nn.Identity()
        self.q = nn.Linear(cfg.hidden, cfg.hidden, bias=cfg.bias)
        self.k = nn.Linear(cfg.hidden, cfg.hidden, bias=cfg.bias)
        self.v = nn.Linear(cfg.hidden, cfg.hidden, bias=cfg.bias)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        hd = h // self.heads
        q = self.q(x).view(b, s, self.heads, hd).transpose(1, 2)
        k = self.k(x).view(b, s, self.heads, hd).transpose(1, 2)
        v = self.v(x).view(b, s, self.heads, hd).transpose(1, 2)
        if self.eager:
            scores = (q @ k.transpose(-2, -1)) * hd**-0.5
            causal = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
            y = self.attn_drop(scores.masked_fill(causal, float("-inf")).softmax(-1)) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.0)
        return self.drop(self.proj(y.transpose(1, 2).reshape(b, s, h)))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.hidden, cfg.mlp_ratio * cfg.hidden, bias=cfg.bias)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.hidden, cfg.hidden, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.hidden, bias=cfg.bias)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.hidden, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """forward(tokens, targets=None): scalar mean cross-entropy loss if targets is given, else logits."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab, config.hidden)
        self.wpe = nn.Embedding(config.seq, config.hidden)
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(config.hidden, bias=config.bias)
        self.lm_head = nn.Linear(config.hidden, config.vocab, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """normal(0, 0.02) weights, zero biases, unit LayerNorm (GPT-2); re-run after materializing a meta model."""
        if self.wte.weight.is_meta:  # meta tensors hold no values; skipping keeps a 175B meta build fast
            return
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, (nn.Linear, nn.LayerNorm)) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        s = tokens.shape[1]
        pos = torch.arange(s, device=tokens.device)
        x = self.drop(self.wte(tokens) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, self.config.vocab), targets.view(-1))
