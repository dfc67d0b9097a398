"""One backend interface for the runtime loop: vision, prefill chunk, decode, KV gather.

Tensors cross the interface as numpy arrays in token-major layout (tokens, kv_heads, head_dim).
A backend may keep device copies behind them (TensorRT); ONNX Runtime on CPU uses them as is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from videoxl.config import VideoXLConfig
from videoxl.layout import ChunkVisibility


@dataclass
class PrefillOutput:
    logits: np.ndarray  # (1, V) float32, last position
    keys: list[np.ndarray]  # per layer (Q, Hkv, D), before RoPE
    values: list[np.ndarray]


@dataclass
class DecodeOutput:
    logits: np.ndarray  # (1, V) float32, last position
    attention_mass: np.ndarray  # (P + T,) summed over layers, heads and queries
    keys: list[np.ndarray]  # per layer (T, Hkv, D), rotated at their positions
    values: list[np.ndarray]


class Backend(ABC):
    name: str
    config: VideoXLConfig
    float_dtype: np.dtype

    def check_frames(self, frames: int) -> None:
        """Raise before any work when a video exceeds what the artifacts were built for."""

    @abstractmethod
    def encode_frames(self, pixels: np.ndarray) -> np.ndarray:
        """(4G, 3, S, S) float32 -> (G, 144, H) visual embeddings."""

    @abstractmethod
    def prefill_chunk(
        self,
        input_ids: np.ndarray,
        visual_embeds: np.ndarray,
        vis: ChunkVisibility,
        past_keys: list[np.ndarray],
        past_values: list[np.ndarray],
    ) -> PrefillOutput:
        """One chunk (or the prefix) against the whole past (keys before RoPE)."""

    @abstractmethod
    def decode(
        self, input_ids: np.ndarray, past_keys: list[np.ndarray], past_values: list[np.ndarray]
    ) -> DecodeOutput:
        """A few tokens at positions P.. against the mixed cache (rotated keys)."""

    @abstractmethod
    def gather_kv(
        self, keys: np.ndarray, values: np.ndarray, gather_index: np.ndarray, gather_weight: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """BilevelKVGather for one layer: pooled/gathered rows, keys rotated at 0..M-1."""

    def gather_kv_layers(
        self, keys: list[np.ndarray], values: list[np.ndarray], gather_index: np.ndarray, gather_weight: np.ndarray
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Every layer's mixed cache; device backends overlap the layers' copies with compute."""
        pairs = [self.gather_kv(k, v, gather_index, gather_weight) for k, v in zip(keys, values)]
        return [k for k, _ in pairs], [v for _, v in pairs]
