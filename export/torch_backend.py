"""PyTorch behind the runtime's Backend interface (`--backend torch`), on any torch device.

The KV cache lives in torch tensors on the model's device, laid out as the other backends lay it
out ([sparse | dense] rows per layer, keys rotated where they are written), and every op follows
`videoxl.ops` contract v2 in plain torch. On the CPU it checks the runtime loop against
`ReferenceInference` (which keeps the official pre-RoPE cache) and gives the eager baseline for
benchmarks; on CUDA it is the starting point of the GPU path without TensorRT.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from videoxl.backend import Backend, DecodeCache, GatherPlan, VideoCache
from videoxl.export.llm import apply_rope
from videoxl.export.model import VideoXLModel
from videoxl.export.reference import attend
from videoxl.layout import ChunkVisibility
from videoxl.text import SpecialTokens, load_tokenizer


def chunk_sparse_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
    past_len: int, visible_past_index: torch.Tensor, timestamp_query_index: torch.Tensor, scale: float,
) -> torch.Tensor:
    """`videoxl::ChunkSparseAttention` (contract v2) in torch: the past is read through index lists."""
    q_len = query.shape[0]
    own = torch.arange(q_len, device=query.device)

    def run(queries: torch.Tensor, rows: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        keys, values = torch.cat([past_key[rows], key]), torch.cat([past_value[rows], value])
        visible = torch.cat([torch.ones(len(query_pos), len(rows), dtype=torch.bool, device=query.device),
                             own[None, :] <= query_pos[:, None]], dim=1)
        return attend(queries, keys, values, visible, scale)[0]

    out = run(query, visible_past_index, own)
    if len(timestamp_query_index):
        out = out.clone()
        out[timestamp_query_index] = run(query[timestamp_query_index], torch.arange(past_len, device=query.device), timestamp_query_index)
    return out


def bilevel_kv_gather(
    key: torch.Tensor, value: torch.Tensor, plan: GatherPlan, source_position: torch.Tensor, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`videoxl::BilevelKVGather` (contract v2): un-rotate at the source position, pool, rotate at the target."""
    index = torch.from_numpy(plan.gather_index).to(key.device)
    weight = torch.from_numpy(plan.gather_weight).to(key.device)[..., None, None]
    rows, width = index.shape
    flat = index.reshape(-1)
    unrotated = apply_rope(key[flat].float(), -source_position[flat], theta).reshape(rows, width, *key.shape[1:])
    pooled_key = (unrotated * weight).sum(1)
    pooled_value = (value[index].float() * weight).sum(1)
    target = torch.from_numpy(plan.target_position).to(key.device)
    return apply_rope(pooled_key, target, theta).to(key.dtype), pooled_value.to(value.dtype)


class _Rows:
    def __init__(self, backend: "TorchBackend", rows: int) -> None:
        cfg = backend.config
        shape = (rows, cfg.num_key_value_heads, cfg.head_dim)
        self.keys = [torch.zeros(shape, dtype=backend.model.dtype, device=backend.device) for _ in range(cfg.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=backend.model.dtype, device=backend.device) for _ in range(cfg.num_hidden_layers)]


class TorchVideoCache(VideoCache):
    def __init__(self, backend: "TorchBackend", dense_rows: int, sparse_rows: int) -> None:
        self.dense_rows, self.sparse_rows = dense_rows, sparse_rows
        self.dtype = backend.float_dtype
        self.rows = _Rows(backend, dense_rows + sparse_rows)
        self.positions = torch.from_numpy(self.source_position).to(backend.device)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for layer, (k, v) in enumerate(zip(self.rows.keys, self.rows.values)):
            out[f"key.{layer}"], out[f"value.{layer}"] = (t.float().cpu().numpy().astype(self.dtype) for t in (k, v))
        return out

    def load(self, arrays: dict[str, np.ndarray]) -> None:
        for layer, (k, v) in enumerate(zip(self.rows.keys, self.rows.values)):
            k.copy_(torch.from_numpy(arrays[f"key.{layer}"]))
            v.copy_(torch.from_numpy(arrays[f"value.{layer}"]))


@dataclass
class TorchDecodeCache(DecodeCache):
    rows: _Rows
    capacity: int
    length: int = 0


class TorchBackend(Backend):
    name = "torch"

    def __init__(
        self, checkpoint: str | Path, *, dtype: str = "fp32", model: VideoXLModel | None = None, device: str = "cpu"
    ) -> None:
        self.device = torch.device(device)
        self.model = (model or VideoXLModel.from_pretrained(checkpoint, dtype=dtype)).to(self.device)
        self.config = self.model.cfg
        self.image_token_id = SpecialTokens.from_tokenizer(load_tokenizer(checkpoint)).vision_pad
        self.float_dtype = np.dtype(np.float16 if self.model.dtype == torch.float16 else np.float32)
        self.scale = self.config.head_dim**-0.5
        self.theta = self.config.rope_theta

    def _t(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device, self.model.dtype)

    def _ids(self, ids) -> torch.Tensor:
        return torch.from_numpy(np.asarray(ids, dtype=np.int64)).to(self.device)

    @torch.no_grad()
    def encode_frames(self, pixels: np.ndarray) -> np.ndarray:
        return self.model.encode_frames(torch.from_numpy(pixels).to(self.device)).float().cpu().numpy().astype(self.float_dtype)

    def new_video_cache(self, *, dense_rows: int, sparse_rows: int) -> TorchVideoCache:
        return TorchVideoCache(self, dense_rows, sparse_rows)

    def new_decode_cache(self, capacity: int) -> TorchDecodeCache:
        return TorchDecodeCache(_Rows(self, capacity), capacity)

    @torch.no_grad()
    def prefill_chunk(self, cache: TorchVideoCache, input_ids, visual_embeds, vis: ChunkVisibility) -> np.ndarray:
        base, rows = cache.sparse_rows, cache.rows
        visible = self._ids(vis.visible_past_index)
        ts_queries = self._ids(vis.timestamp_query_index)

        def attention(layer: int, query, key, value, key_rotated) -> torch.Tensor:
            past_k, past_v = rows.keys[layer][base:], rows.values[layer][base:]
            out = chunk_sparse_attention(query, key_rotated, value, past_k, past_v, vis.start, visible, ts_queries, self.scale)
            past_k[vis.start : vis.end], past_v[vis.start : vis.end] = key_rotated, value
            return out

        ids = self._ids(input_ids)
        embeds = self.model.embed(ids, self._t(visual_embeds), image_token_id=self.image_token_id)
        hidden = self.model.forward_hidden(embeds, torch.arange(vis.start, vis.end, device=self.device), attention)
        return self.model.logits(hidden[-1:]).cpu().numpy()

    @torch.no_grad()
    def gather(self, cache: TorchVideoCache, plan: GatherPlan, *, into: TorchDecodeCache | None = None) -> None:
        target = cache.rows if into is None else into.rows
        out = slice(plan.out_start, plan.out_start + plan.rows)
        for layer in range(self.config.num_hidden_layers):
            key, value = bilevel_kv_gather(cache.rows.keys[layer], cache.rows.values[layer], plan, cache.positions, self.theta)
            target.keys[layer][out], target.values[layer][out] = key, value
        if into is not None:
            into.length = out.stop

    def _run_on_cache(self, cache: TorchDecodeCache, input_ids, *, write: bool, mass: list | None = None) -> torch.Tensor:
        ids, past = self._ids(input_ids), cache.length
        if write and past + len(ids) > cache.capacity:
            raise RuntimeError(f"decode cache full: {past} + {len(ids)} > capacity {cache.capacity}")

        def attention(layer: int, query, key, value, key_rotated) -> torch.Tensor:
            keys = torch.cat([cache.rows.keys[layer][:past], key_rotated])
            values = torch.cat([cache.rows.values[layer][:past], value])
            own = torch.arange(len(ids), device=self.device)
            visible = torch.cat([torch.ones(len(ids), past, dtype=torch.bool, device=self.device), own[None] <= own[:, None]], 1)
            out, probs = attend(query, keys, values, visible, self.scale)
            if mass is not None:
                mass.append(probs.sum(dim=(0, 1))[:past].double())
            if write:
                cache.rows.keys[layer][past : past + len(ids)], cache.rows.values[layer][past : past + len(ids)] = key_rotated, value
            return out

        hidden = self.model.forward_hidden(self.model.model.embed_tokens(ids), torch.arange(past, past + len(ids), device=self.device), attention)
        if write:
            cache.length += len(ids)
        return hidden

    @torch.no_grad()
    def score(self, cache: TorchDecodeCache, input_ids) -> np.ndarray:
        masses: list[torch.Tensor] = []
        self._run_on_cache(cache, input_ids, write=False, mass=masses)
        return torch.stack(masses).sum(0).float().cpu().numpy()

    @torch.no_grad()
    def decode(self, cache: TorchDecodeCache, input_ids) -> np.ndarray:
        hidden = self._run_on_cache(cache, input_ids, write=True)
        return self.model.logits(hidden[-1:]).cpu().numpy()
