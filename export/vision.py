"""Frames -> LLM tokens: SigLIP tower, Dynamic Token Synthesis (DTS) compressor, projector.

    frames (N, 3, 384, 384)
     -> SiglipTower (26 of 27 layers, pre-post-LN)          (N, 729, C)
     -> bilinear 27x27 -> 24x24, pad N to 4k, RAW reshape     (G, C, 4, 24, 24)
     -> TokenCompressor (DTS, checkpoint name `sae`)          (G, C, 24, 24)
     -> Projector, then 2x2 average pool                      (G, 144, H)

Parameter names follow the checkpoint so that `state_dict()` keys equal the file's keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from videoxl.config import VideoXLConfig


# --- SigLIP-SO400M/14@384 -----------------------------------------------------------------


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: VideoXLConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.vision_hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.vision_grid**2, cfg.vision_hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (N, 3, S, S) -> (N, 729, C)
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))
        return patches.flatten(2).transpose(1, 2) + self.position_embedding.weight


class SiglipAttention(nn.Module):
    def __init__(self, cfg: VideoXLConfig) -> None:
        super().__init__()
        width = cfg.vision_hidden_size
        self.num_heads = cfg.vision_num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, C)
        n, t, c = x.shape
        heads = lambda y: y.view(n, t, self.num_heads, c // self.num_heads).transpose(1, 2)  # noqa: E731
        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        scores = (q @ k.transpose(-1, -2)) * (c // self.num_heads) ** -0.5
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return self.out_proj((probs @ v).transpose(1, 2).reshape(n, t, c))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: VideoXLConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.vision_hidden_size, cfg.vision_intermediate_size)
        self.fc2 = nn.Linear(cfg.vision_intermediate_size, cfg.vision_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: VideoXLConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.vision_hidden_size, eps=cfg.vision_layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.vision_hidden_size, eps=cfg.vision_layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: VideoXLConfig) -> None:
        super().__init__()
        # Only the layers up to the selected feature layer are built (26 of 27).
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.vision_layers_used))


class SiglipVisionModel(nn.Module):
    def __init__(self, cfg: VideoXLConfig) -> None:
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # (N, 3, S, S) -> (N, 729, C)
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            x = layer(x)
        return x  # output of the selected layer, before post_layernorm


class SiglipTower(nn.Module):
    """Checkpoint path: model.vision_tower.vision_tower.vision_model.*"""

    def __init__(self, cfg: VideoXLConfig) -> None:
        super().__init__()
        self.vision_tower = nn.Module()
        self.vision_tower.vision_model = SiglipVisionModel(cfg)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vision_tower.vision_model(pixels)


# --- DTS compressor ("SiglipAE", checkpoint name `sae`) -------------------------------------


class AttnBlock3D(nn.Module):
    """Single-head spatial attention over the 24x24 positions of every (group, t) slice."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv3d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (G, C, T, H, W)
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        g, c, t, hh, ww = q.shape
        q = q.permute(0, 2, 3, 4, 1).reshape(g * t, hh * ww, c)
        k = k.permute(0, 2, 1, 3, 4).reshape(g * t, c, hh * ww)
        v = v.permute(0, 2, 1, 3, 4).reshape(g * t, c, hh * ww)
        weights = torch.softmax((q @ k).float() * c**-0.5, dim=2).to(v.dtype)  # (GT, HW_q, HW_k)
        out = (v @ weights.transpose(1, 2)).reshape(g, t, c, hh, ww).permute(0, 2, 1, 3, 4)
        return x + self.proj_out(out)


class RelativePosition(nn.Module):
    def __init__(self, channels: int, max_relative_position: int) -> None:
        super().__init__()
        self.max_relative_position = max_relative_position
        self.embeddings_table = nn.Parameter(torch.zeros(2 * max_relative_position + 1, channels))

    def forward(self, length: int) -> torch.Tensor:
        """(T, T, C) with entry [i, j] = table[clamp(j - i) + max]."""
        steps = torch.arange(length, device=self.embeddings_table.device)
        distance = (steps[None, :] - steps[:, None]).clamp(-self.max_relative_position, self.max_relative_position)
        return self.embeddings_table[distance + self.max_relative_position]


class TemporalAttention(nn.Module):
    """Single-head attention along T at every spatial position, with relative positions.

    Trained-code quirk, kept on purpose: the relative key term uses the *key-side* index of
    the query, logits[i, j] += sum_c q[c, j] * Tk[clamp(i - j) + 64, c].
    """

    def __init__(self, channels: int, groups: int, max_relative_position: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.relative_position_k = RelativePosition(channels, max_relative_position)
        self.relative_position_v = RelativePosition(channels, max_relative_position)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (G, C, T, H, W)
        g, c, t, hh, ww = x.shape
        seq = x.permute(0, 3, 4, 1, 2).reshape(g * hh * ww, c, t)  # (G*HW, C, T)
        q, k, v = self.qkv(self.norm(seq)).chunk(3, dim=1)
        scale = c**-0.25
        q, k = q * scale, k * scale
        rel_k = self.relative_position_k(t)  # (T, T, C): [i, j] -> Tk[clamp(j - i)]
        rel_v = self.relative_position_v(t)
        logits = torch.einsum("nci,ncj->nij", q, k)
        logits = logits + torch.einsum("nct,tsc->nst", q, rel_k)  # the quirk: [s, t] = q[t] . Tk[clamp(s - t)]
        weights = torch.softmax(logits.float(), dim=-1).to(v.dtype)
        out = torch.einsum("nij,ncj->nci", weights, v) + torch.einsum("nij,ijc->nci", weights, rel_v)
        out = self.proj_out(out)
        return x + out.reshape(g, hh, ww, c, t).permute(0, 3, 4, 1, 2)


class SamePadConv3d(nn.Module):
    """Replicate-pad T by (1, 0), H and W by (1, 1), then a stride-(2,1,1) 3x3x3 conv: T halves."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, stride=(2, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (1, 1, 1, 1, 1, 0), mode="replicate"))


class TokenCompressor(nn.Module):
    """DTS: (G, C, 4, 24, 24) -> (G, C, 24, 24). Checkpoint path: model.sae.*"""

    def __init__(self, cfg: VideoXLConfig) -> None:
        super().__init__()
        c, groups = cfg.vision_hidden_size, cfg.compressor_groupnorm_groups
        self.temporal_encoding = nn.Parameter(torch.zeros(cfg.frames_per_group, c))
        stage = lambda: [  # noqa: E731
            AttnBlock3D(c, groups),
            TemporalAttention(c, groups, cfg.compressor_max_relative_position),
            SamePadConv3d(c),
        ]
        self.encoder = nn.Sequential(*stage(), *stage())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.temporal_encoding.transpose(0, 1)[None, :, :, None, None]  # te[t, c] at (c, t)
        return self.encoder(x).squeeze(2)


# --- projector ------------------------------------------------------------------------------


class Projector(nn.Sequential):
    """mlp2x_gelu: Linear(C, H) - GELU(erf) - Linear(H, H). Checkpoint path: model.mm_projector.*"""

    def __init__(self, cfg: VideoXLConfig) -> None:
        super().__init__(
            nn.Linear(cfg.vision_hidden_size, cfg.hidden_size), nn.GELU(), nn.Linear(cfg.hidden_size, cfg.hidden_size)
        )


# --- the whole visual path ------------------------------------------------------------------


def resize_grid(features: torch.Tensor, grid: int, out_grid: int) -> torch.Tensor:
    """(N, grid^2, C) -> (N, C, out_grid, out_grid), bilinear, half-pixel, no antialias, fp32."""
    n, _, c = features.shape
    maps = features.transpose(1, 2).reshape(n, c, grid, grid).float()
    return F.interpolate(maps, size=(out_grid, out_grid), mode="bilinear", align_corners=False).to(features.dtype)


def pad_to_groups(maps: torch.Tensor, frames_per_group: int) -> torch.Tensor:
    """Repeat the last frame's map until the frame count is a multiple of 4."""
    missing = (-maps.shape[0]) % frames_per_group
    if missing:
        maps = torch.cat([maps, maps[-1:].expand(missing, *maps.shape[1:])])
    return maps


def group_frames(maps: torch.Tensor, frames_per_group: int) -> torch.Tensor:
    """RAW reshape (G*4, C, h, w) -> (G, C, 4, h, w), no transpose: the compressor was trained on it."""
    n, c, h, w = maps.shape
    return maps.reshape(n // frames_per_group, c, frames_per_group, h, w)


def pool_tokens(tokens: torch.Tensor, grid: int, stride: int) -> torch.Tensor:
    """(G, grid^2, H) -> (G, (grid/stride)^2, H): 2x2 average pool on the token grid."""
    g, _, hidden = tokens.shape
    maps = tokens.transpose(1, 2).reshape(g, hidden, grid, grid)
    return F.avg_pool2d(maps, stride).flatten(2).transpose(1, 2)
