"""Qwen2.5 decoder with explicit position ids and a pluggable attention.

Each layer projects q/k/v, rotates q and k at the given positions, and hands them to an
`Attention` callable that owns the KV cache. The cache holds keys *before* RoPE (so bi-level
decoding can pool and re-rotate them); the callable also gets the rotated chunk keys.
Checkpoint names: model.embed_tokens, model.layers.{i}.*, model.norm, lm_head.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from videoxl.config import VideoXLConfig


class Attention(Protocol):
    def __call__(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_rotated: torch.Tensor
    ) -> torch.Tensor:
        """query (Q, Hq, D) rotated; key (Q, Hkv, D) before RoPE; value; key_rotated -> (Q, Hq, D)."""


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) positions -> cos, sin of shape (N, 1, D), float32, Hugging Face Qwen2 convention."""
    freqs = positions.float()[:, None] * rope_inv_freq(head_dim, theta)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos()[:, None, :], emb.sin()[:, None, :]


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE of x (N, H, D) at positions (N,), computed in float32.

    In every precision: the official fp16/bf16 load casts its cos/sin tables to the model
    dtype (one more rounding per entry, coarse at large positions); ours stay float32 and
    only the rotated result is rounded to x's dtype.
    """
    cos, sin = rope_cos_sin(positions, x.shape[-1], theta)
    xf = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, cfg: VideoXLConfig) -> None:
        super().__init__()
        self.cfg = cfg
        kv_width = cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_width, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_width, bias=True)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, layer: int, x: torch.Tensor, positions: torch.Tensor, attention: Attention) -> torch.Tensor:
        cfg = self.cfg
        q = self.q_proj(x).view(-1, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(x).view(-1, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(x).view(-1, cfg.num_key_value_heads, cfg.head_dim)
        q_rot = apply_rope(q, positions, cfg.rope_theta)
        k_rot = apply_rope(k, positions, cfg.rope_theta)
        out = attention(layer, q_rot, k, v, k_rot)
        return self.o_proj(out.reshape(x.shape[0], cfg.hidden_size))


class MLP(nn.Module):
    def __init__(self, cfg: VideoXLConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: VideoXLConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, layer: int, x: torch.Tensor, positions: torch.Tensor, attention: Attention) -> torch.Tensor:
        x = x + self.self_attn(layer, self.input_layernorm(x), positions, attention)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, cfg: VideoXLConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, attention: Attention) -> torch.Tensor:
        """(L, H) embeddings at (L,) positions -> (L, H) final hidden states."""
        x = embeds
        for index, layer in enumerate(self.layers):
            x = layer(index, x, positions, attention)
        return self.norm(x)
