"""The PyTorch reference behind the runtime's Backend interface (`--backend torch`).

It lets the same runtime loop drive the reference model, so the loop itself is checked
against `ReferenceInference`, and gives the eager-PyTorch baseline for benchmarks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from videoxl.export.llm import apply_rope
from videoxl.export.model import VideoXLModel
from videoxl.export.reference import ChunkedAttention, DenseCache, MixedCache, MixedCacheAttention
from videoxl.layout import ChunkVisibility
from videoxl.runtime.backend import Backend, DecodeOutput, PrefillOutput
from videoxl.text import SpecialTokens, load_tokenizer


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, checkpoint: str | Path, *, dtype: str = "fp32", model: VideoXLModel | None = None) -> None:
        self.model = model or VideoXLModel.from_pretrained(checkpoint, dtype=dtype)
        self.config = self.model.cfg
        self.image_token_id = SpecialTokens.from_tokenizer(load_tokenizer(checkpoint)).vision_pad
        self.float_dtype = np.dtype(np.float16 if self.model.dtype == torch.float16 else np.float32)
        self.scale = self.config.head_dim**-0.5

    def _np(self, t: torch.Tensor) -> np.ndarray:
        return t.float().numpy().astype(self.float_dtype)

    def _t(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.model.dtype)

    @torch.no_grad()
    def encode_frames(self, pixels: np.ndarray) -> np.ndarray:
        return self._np(self.model.encode_frames(torch.from_numpy(pixels)))

    @torch.no_grad()
    def prefill_chunk(self, input_ids, visual_embeds, vis: ChunkVisibility, past_keys, past_values) -> PrefillOutput:
        keys = [self._t(k) for k in past_keys]
        rotated = [apply_rope(k, torch.arange(k.shape[0]), self.config.rope_theta) for k in keys]
        cache = DenseCache(keys, rotated, [self._t(v) for v in past_values])
        ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
        embeds = self.model.embed(ids, self._t(visual_embeds), image_token_id=self.image_token_id)
        positions = torch.arange(vis.start, vis.end)
        hidden = self.model.forward_hidden(embeds, positions, ChunkedAttention(cache, vis, self.scale))
        logits = self.model.logits(hidden[-1:]).numpy()
        new = slice(vis.start, vis.end)
        return PrefillOutput(logits, [self._np(k[new]) for k in cache.keys], [self._np(v[new]) for v in cache.values])

    @torch.no_grad()
    def decode(self, input_ids, past_keys, past_values) -> DecodeOutput:
        past = past_keys[0].shape[0]
        cache = MixedCache([self._t(k) for k in past_keys], [self._t(v) for v in past_values])
        attention = MixedCacheAttention(cache, self.scale, grow=True, collect_mass=True)
        ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
        hidden = self.model.forward_hidden(self.model.model.embed_tokens(ids), torch.arange(past, past + len(ids)), attention)
        logits = self.model.logits(hidden[-1:]).numpy()
        return DecodeOutput(
            logits, attention.mass.float().numpy(),
            [self._np(k[past:]) for k in cache.keys], [self._np(v[past:]) for v in cache.values],
        )

    @torch.no_grad()
    def gather_kv(self, keys, values, gather_index, gather_weight):
        index, weight = torch.from_numpy(gather_index), torch.from_numpy(gather_weight)[..., None, None]
        pooled_k = (self._t(keys).float()[index] * weight).sum(1)
        pooled_v = (self._t(values).float()[index] * weight).sum(1)
        rotated = apply_rope(pooled_k, torch.arange(len(index)), self.config.rope_theta)
        return self._np(rotated), self._np(pooled_v)
