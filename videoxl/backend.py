"""One backend interface for the runtime loop: the backend owns the KV cache (STYLE 16).

The loop hands a backend plans — token ranges, chunk visibility, gather plans, all integers —
and gets back logits and attention mass. KV tensors never cross this boundary: a backend
allocates the two tiers of a video and the decode cache where it computes (numpy arrays for
ONNX Runtime on the CPU, device memory for a GPU), writes each prefill chunk's KV in place, and
runs the bi-level gathers there.

    cache = backend.new_video_cache(dense_rows, sparse_rows)   # [sparse tier | dense tier] per layer
    backend.prefill_chunk(cache, ids, visual, vis)             # reads dense rows [0, vis.start), writes [vis.start, vis.end)
    backend.gather(cache, plan)                                # pools a finished block into the sparse tier
    decode = backend.new_decode_cache(capacity)
    backend.gather(cache, plan, into=decode)                   # builds the decode cache (rotated at 0..M-1)
    backend.score(decode, suffix_ids) / backend.decode(decode, ids)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from videoxl.config import VideoXLConfig
from videoxl.layout import ChunkVisibility


@dataclass(frozen=True)
class GatherPlan:
    """One BilevelKVGather over a video cache's source rows [sparse tier | dense tier].

    Row r of the source is sparse row r for r < sparse_rows and dense row (position) r - sparse_rows
    after that. Output row m goes to row `out_start + m` of the destination (the sparse tier, or a
    decode cache) and is rotated at target_position[m].
    """

    gather_index: np.ndarray  # (M, S) int64 source rows
    gather_weight: np.ndarray  # (M, S) float32
    target_position: np.ndarray  # (M,) int64
    out_start: int

    @property
    def rows(self) -> int:
        return int(self.gather_index.shape[0])


class VideoCache(ABC):
    """A video's two KV tiers, held by the backend that made it: per layer [sparse | dense] rows."""

    dense_rows: int
    sparse_rows: int

    @property
    def source_position(self) -> np.ndarray:
        """(sparse_rows + dense_rows,) int64: sparse keys are kept before RoPE (0), dense keys at their position."""
        return np.concatenate([np.zeros(self.sparse_rows, np.int64), np.arange(self.dense_rows, dtype=np.int64)])

    @property
    def live(self) -> bool:
        """False once the backend reused this cache's memory for another video (it keeps one at a time)."""
        return True

    @abstractmethod
    def arrays(self) -> dict[str, np.ndarray]:
        """Host copies of both tiers, 'key.{layer}' / 'value.{layer}' (sparse_rows + dense_rows, Hkv, D)."""

    @abstractmethod
    def load(self, arrays: dict[str, np.ndarray]) -> None:
        """Fill both tiers from `arrays()` output (a prepared video restored from disk)."""


class DecodeCache(ABC):
    """A question's decode cache: `capacity` rows per layer, `length` of them valid."""

    capacity: int
    length: int


class Backend(ABC):
    """Runs the exported graphs (or engines) and owns their KV memory; see the module docstring."""

    name: str
    config: VideoXLConfig
    float_dtype: np.dtype

    def check_frames(self, frames: int) -> None:
        """Raise before any work when a video exceeds what the artifacts were built for."""

    def check_prefill(self, *, rule: str, chunk_groups: int, window_chunks: int) -> None:
        """Raise before any work when this backend cannot prefill that way (e.g. the evaluation rule
        with the dense tier in host memory); every prefill is accepted by default."""

    @abstractmethod
    def encode_frames(self, pixels: np.ndarray) -> np.ndarray:
        """(4G, 3, S, S) float32 -> (G, 144, H) visual embeddings."""

    @abstractmethod
    def new_video_cache(self, *, dense_rows: int, sparse_rows: int) -> VideoCache:
        """Allocate one video's dense tier (every prompt row before the question) and sparse tier."""

    @abstractmethod
    def prefill_chunk(
        self, cache: VideoCache, input_ids: np.ndarray, visual_embeds: np.ndarray, vis: ChunkVisibility
    ) -> np.ndarray:
        """One chunk (or the prefix) against dense rows [0, vis.start); writes rows [vis.start, vis.end).

        Returns the logits (1, V) of the chunk's last position.
        """

    @abstractmethod
    def gather(self, cache: VideoCache, plan: GatherPlan, *, into: DecodeCache | None = None) -> None:
        """BilevelKVGather on every layer: into the sparse tier of `cache` (into=None) or a decode cache.

        Into a decode cache, the plan's rows become rows [out_start, out_start + M) and `length` ends there.
        """

    @abstractmethod
    def new_decode_cache(self, capacity: int) -> DecodeCache:
        """An empty decode cache of `capacity` rows per layer."""

    @abstractmethod
    def score(self, cache: DecodeCache, input_ids: np.ndarray) -> np.ndarray:
        """(cache.length,) float32: attention mass the tokens give each row, over layers, heads and tokens.

        The tokens' own KV is not kept.
        """

    @abstractmethod
    def decode(self, cache: DecodeCache, input_ids: np.ndarray) -> np.ndarray:
        """Tokens at positions length.. against the cache; appends their KV, returns the last logits (1, V)."""
