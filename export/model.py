"""Video-XL-2 in PyTorch: VisionTower -> TokenCompressor (DTS) -> Projector -> Qwen2.5 LLM."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from videoxl.config import VideoXLConfig
from videoxl.export.checkpoint import load_into
from videoxl.export.llm import Attention, Qwen2Model
from videoxl.export.vision import (
    Projector,
    SiglipTower,
    TokenCompressor,
    group_frames,
    pad_to_groups,
    pool_tokens,
    resize_grid,
)

# The submodules of `model.*` that turn frames into LLM embeddings (the vision graph).
VISUAL_MODULES = ("vision_tower", "sae", "mm_projector")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class VideoXLBackbone(Qwen2Model):
    """`model.*` in the checkpoint: the LLM body plus the visual modules."""

    def __init__(self, cfg: VideoXLConfig) -> None:
        super().__init__(cfg)
        self.vision_tower = SiglipTower(cfg)
        self.sae = TokenCompressor(cfg)
        self.mm_projector = Projector(cfg)


class VideoXLModel(nn.Module):
    def __init__(self, cfg: VideoXLConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = VideoXLBackbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path, *, dtype: str = "fp32", llm_weights: bool = True) -> "VideoXLModel":
        """The model in ``dtype``. ``llm_weights=False`` loads only the visual modules (vision tower,
        compressor, projector: ~0.9 GB in bf16); the LLM's parameters stay on the meta device, shapes
        only, for an exporter that streams them from the checkpoint (``checkpoint.LazyStateDict``)."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} not one of {sorted(DTYPES)}")
        cfg = VideoXLConfig.from_checkpoint(checkpoint_dir)
        # Build on the meta device in the target dtype, then allocate once: an 8B model never
        # exists in fp32 on the way to bf16.
        previous = torch.get_default_dtype()
        torch.set_default_dtype(DTYPES[dtype])
        try:
            with torch.device("meta"):
                model = cls(cfg)
        finally:
            torch.set_default_dtype(previous)
        if llm_weights:
            model = model.to_empty(device="cpu")
            load_into(model, checkpoint_dir)
        else:
            backbone = model.model
            for name in VISUAL_MODULES:
                setattr(backbone, name, getattr(backbone, name).to_empty(device="cpu"))
            load_into(model, checkpoint_dir, only=tuple(f"model.{name}." for name in VISUAL_MODULES))
        return model.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    # --- vision ---------------------------------------------------------------------------
    def vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, 384, 384) -> (N, 729, C): SigLIP output of the selected layer."""
        return self.model.vision_tower(pixels.to(self.dtype))

    def encode_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, 384, 384) normalised frames -> (G, 144, H) LLM embeddings, G = ceil(N / 4)."""
        return encode_frames(self.cfg, self.model.vision_tower, self.model.sae, self.model.mm_projector, pixels)

    # --- language -------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, visual_embeds: torch.Tensor | None = None, *, image_token_id: int) -> torch.Tensor:
        """(L,) ids -> (L, H); placeholder positions take the visual embeddings in order."""
        embeds = self.model.embed_tokens(input_ids)
        slots = input_ids == image_token_id
        visual = torch.zeros(0, embeds.shape[-1]) if visual_embeds is None else visual_embeds.reshape(-1, embeds.shape[-1])
        if int(slots.sum()) != visual.shape[0]:
            raise ValueError(f"{int(slots.sum())} image placeholders but {visual.shape[0]} visual embeddings")
        if visual.shape[0]:
            embeds = embeds.clone()
            embeds[slots] = visual.to(embeds.dtype)
        return embeds

    def forward_hidden(self, embeds: torch.Tensor, positions: torch.Tensor, attention: Attention) -> torch.Tensor:
        return self.model(embeds, positions, attention)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


def encode_frames(cfg: VideoXLConfig, tower: nn.Module, sae: nn.Module, projector: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, 384, 384) normalised frames -> (G, 144, H); the visual modules only (the vision graph's body)."""
    dtype = next(projector.parameters()).dtype
    features = tower(pixels.to(dtype))  # (N, 729, C)
    maps = resize_grid(features, cfg.vision_grid, cfg.compressor_grid)  # (N, C, 24, 24)
    groups = group_frames(pad_to_groups(maps, cfg.frames_per_group), cfg.frames_per_group)
    compressed = sae(groups)  # (G, C, 24, 24)
    tokens = projector(compressed.flatten(2).transpose(1, 2))  # (G, 576, H)
    return pool_tokens(tokens, cfg.compressor_grid, cfg.pool_stride)  # (G, 144, H)
