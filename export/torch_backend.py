"""PyTorch behind the runtime's Backend interface (`--backend torch`), on any torch device.

The KV cache lives in torch tensors on the model's device, allocated once per video and per
question and laid out as the other backends lay it out ([sparse | dense] rows per layer, keys
rotated where they are written); every op follows `videoxl.ops` contract v2. Two ways to run
the three custom pieces (chunk attention, the bi-level gather, block scoring):

    kernels on   our CUDA kernels through `videoxl.plugins.kernels` (the C launchers the TensorRT
                 plugins call): the default on a CUDA device when the library loads; on the CPU
                 only against a host build of the kernels (the tests' emulation)
    kernels off  plain torch (fp32 softmax on the CPU: the reference numerics; SDPA on CUDA)

Dense layers are PyTorch in the model's dtype (bf16/fp16 on a GPU). Decode steps read a
capacity bucket of the cache plus a valid length held in a device tensor, so on CUDA each
(tokens, bucket) step is captured once as a CUDA graph and replayed for every later step of
that bucket (`DecodeStep`); nothing is allocated per token after the capture.

On the CPU this backend checks the runtime loop against `ReferenceInference` (which keeps the
official pre-RoPE cache) and gives the eager baseline for benchmarks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from videoxl.backend import Backend, DecodeCache, GatherPlan, VideoCache
from videoxl.export.llm import apply_rope, rope_inv_freq
from videoxl.export.model import VideoXLModel
from videoxl.export.reference import attend
from videoxl.layout import ChunkVisibility
from videoxl.runtime.trt_backend import DECODE_BUCKET_ROWS, capacity_bucket
from videoxl.text import SpecialTokens, load_tokenizer

log = logging.getLogger(__name__)

MAX_SCORE_BLOCKS = 8192  # VIDEOXL_MAX_SCORE_BLOCKS in plugins/block_score/block_score.h

# A layer's attention inside `TorchBackend.forward`: (layer, query rotated, key rotated, value) -> (Q, Hq, D).
LayerAttention = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def masked_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA on token-major tensors: query (Q, Hq, D), key/value (K, Hkv, D), visible (Q, K) bool -> (Q, Hq, D)."""
    q, k, v = (x.transpose(0, 1)[None] for x in (query, key, value))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=True)[0].transpose(0, 1)


def chunk_sparse_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
    past_len: int, visible_past_index: torch.Tensor, timestamp_query_index: torch.Tensor, scale: float,
) -> torch.Tensor:
    """`videoxl::ChunkSparseAttention` (contract v2) in torch: the past is read through index lists.

    The visible past is gathered (a copy: this is the "gather + attention" baseline the kernel
    avoids). On the CPU the softmax runs in float32 (`attend`, the reference numerics); on CUDA
    SDPA runs it with a boolean mask.
    """
    q_len = query.shape[0]
    own = torch.arange(q_len, device=query.device)

    def run(queries: torch.Tensor, rows: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        keys, values = torch.cat([past_key[rows], key]), torch.cat([past_value[rows], value])
        visible = torch.cat([torch.ones(len(query_pos), len(rows), dtype=torch.bool, device=query.device),
                             own[None, :] <= query_pos[:, None]], dim=1)
        if query.is_cuda:
            return masked_sdpa(queries, keys, values, visible, scale)
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
    """Per-layer K and V buffers of `rows` rows on the backend's device, allocated once."""

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
class DecodeStep:
    """One (new tokens, bucket rows) decode step of one decode cache, with its static buffers.

    `run` reads only these buffers and the cache's first `bucket` rows, and writes the new KV at
    rows past_len.. through an index computed on the device, so it can be recorded once: every
    later step of the same key updates `input_ids` and `past_len` in place and replays `graph`.
    """

    input_ids: torch.Tensor  # (T,) int64, device
    past_len: torch.Tensor  # (1,) int64, device: the valid length the step reads
    run: Callable[[], torch.Tensor]  # -> logits (1, V) float32
    graph: object | None = None  # a captured torch.cuda.CUDAGraph (or a test's stand-in)
    logits: torch.Tensor | None = None  # the graph's output buffer, rewritten by each replay


@dataclass
class TorchDecodeCache(DecodeCache):
    rows: _Rows
    capacity: int
    length: int = 0
    steps: dict[tuple[int, int], DecodeStep] = field(default_factory=dict)  # graphs die with the cache


class TorchBackend(Backend):
    """Video-XL-2 in PyTorch on `device`; our kernels for the custom ops where available (module docstring).

    kernels: True (use them, fail if the library does not load), False (plain torch), None (on
    when `device` is CUDA and the library loads). attention_kernel: the launcher's "auto",
    "simt" or "mma". cuda_graphs: replay decode steps as CUDA graphs (default: on CUDA).
    """

    name = "torch"

    def __init__(
        self, checkpoint: str | Path | None = None, *, dtype: str = "fp32", model: VideoXLModel | None = None,
        device: str = "cpu", tokenizer=None, kernels: bool | None = None, attention_kernel: str = "auto",
        cuda_graphs: bool | None = None,
    ) -> None:
        if model is None and checkpoint is None:
            raise ValueError("TorchBackend needs a checkpoint or a model")
        self.device = torch.device(device)
        self.model = (model or VideoXLModel.from_pretrained(checkpoint, dtype=dtype)).to(self.device)
        self.config = self.model.cfg
        self.image_token_id = SpecialTokens.from_tokenizer(tokenizer or load_tokenizer(checkpoint)).vision_pad
        self.float_dtype = np.dtype(np.float16 if self.model.dtype == torch.float16 else np.float32)
        self.scale = self.config.head_dim**-0.5
        self.theta = self.config.rope_theta
        self.inv_freq = rope_inv_freq(self.config.head_dim, self.theta).to(self.device)  # made once, on the device
        self.kernels = self._load_kernels(kernels)
        self.attention_kernel = attention_kernel
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {self.device}")
        self.graph_factory: Callable[[], object] | None = torch.cuda.CUDAGraph if self.cuda_graphs else None
        self._graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self.decode_counts = {"plain": 0, "captured": 0, "replayed": 0}
        log.info("torch backend on %s (%s), kernels %s, decode graphs %s", self.device, self.model.dtype,
                 "on" if self.kernels else "off", "on" if self.graph_factory else "off")

    def _load_kernels(self, wanted: bool | None):
        """videoxl.plugins.kernels with its library loaded, or None for the plain torch path."""
        if wanted is False or (wanted is None and self.device.type != "cuda"):
            return None
        from videoxl.plugins import kernels

        try:
            kernels.load_library()
        except Exception as err:  # a missing nvcc or a failed build: the plain path still runs
            if wanted:
                raise
            log.warning("kernel library unavailable (%s): plain torch attention, gather and scoring", err)
            return None
        return kernels

    def _t(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device, self.model.dtype)

    def _ids(self, ids) -> torch.Tensor:
        return torch.from_numpy(np.asarray(ids, dtype=np.int64)).to(self.device)

    # --- the LLM with a pluggable attention ------------------------------------------------------
    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, attention: LayerAttention) -> torch.Tensor:
        """(L, H) embeddings at (L,) device positions -> (L, H) final hidden states.

        The decoder layers of `export.llm`, with RoPE computed once per call from this backend's
        device tables (equal to `apply_rope`), so a decode step stays on the device and records
        into a CUDA graph.
        """
        cfg, body = self.config, self.model.model
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
        half = cfg.head_dim // 2

        def rotate(x: torch.Tensor) -> torch.Tensor:
            xf = x.float()
            return (xf * cos + torch.cat([-xf[..., half:], xf[..., :half]], dim=-1) * sin).to(x.dtype)

        x = embeds
        for index, layer in enumerate(body.layers):
            attn, h = layer.self_attn, layer.input_layernorm(x)
            q = rotate(attn.q_proj(h).view(-1, cfg.num_attention_heads, cfg.head_dim))
            k = rotate(attn.k_proj(h).view(-1, cfg.num_key_value_heads, cfg.head_dim))
            v = attn.v_proj(h).view(-1, cfg.num_key_value_heads, cfg.head_dim)
            x = x + attn.o_proj(attention(index, q, k, v).reshape(x.shape[0], cfg.hidden_size))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return body.norm(x)

    # --- Backend interface ---------------------------------------------------------------------
    @torch.no_grad()
    def encode_frames(self, pixels: np.ndarray) -> np.ndarray:
        return self.model.encode_frames(torch.from_numpy(pixels).to(self.device)).float().cpu().numpy().astype(self.float_dtype)

    def new_video_cache(self, *, dense_rows: int, sparse_rows: int) -> TorchVideoCache:
        return TorchVideoCache(self, dense_rows, sparse_rows)

    def new_decode_cache(self, capacity: int) -> TorchDecodeCache:
        return TorchDecodeCache(_Rows(self, capacity), capacity)

    @torch.no_grad()
    def prefill_chunk(self, cache: TorchVideoCache, input_ids, visual_embeds, vis: ChunkVisibility) -> np.ndarray:
        if vis.end > cache.dense_rows:
            raise ValueError(f"chunk rows [{vis.start}, {vis.end}) outside the dense tier of {cache.dense_rows} rows")
        base, rows, cfg = cache.sparse_rows, cache.rows, self.config
        visible = self._ids(vis.visible_past_index)
        ts_queries = self._ids(vis.timestamp_query_index)
        if self.kernels is not None:  # index lists, past_len and workspace made once per chunk, read by every layer
            past_len = self._ids([vis.start])
            workspace = torch.empty(max(1, self.kernels.chunk_attention_workspace_bytes(
                num_queries=vis.end - vis.start, past_capacity=cache.dense_rows, num_visible=len(visible),
                num_timestamp_queries=len(ts_queries), num_q_heads=cfg.num_attention_heads,
                num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, dtype=str(self.model.dtype).split(".")[-1],
            )), dtype=torch.uint8, device=self.device)

        def attention(layer: int, query, key, value) -> torch.Tensor:
            past_k, past_v = rows.keys[layer][base:], rows.values[layer][base:]
            if self.kernels is not None:
                out = self.kernels.chunk_attention_torch(
                    query, key, value, past_k, past_v, past_len=past_len, visible_past_index=visible,
                    timestamp_query_index=ts_queries, scale=self.scale, workspace=workspace, variant=self.attention_kernel,
                )
            else:
                out = chunk_sparse_attention(query, key, value, past_k, past_v, vis.start, visible, ts_queries, self.scale)
            past_k[vis.start : vis.end], past_v[vis.start : vis.end] = key, value
            return out

        ids = self._ids(input_ids)
        embeds = self.model.embed(ids, self._t(visual_embeds), image_token_id=self.image_token_id)
        hidden = self.forward(embeds, torch.arange(vis.start, vis.end, device=self.device), attention)
        return self.model.logits(hidden[-1:]).cpu().numpy()

    @torch.no_grad()
    def gather(self, cache: TorchVideoCache, plan: GatherPlan, *, into: TorchDecodeCache | None = None) -> None:
        target = cache.rows if into is None else into.rows
        limit = cache.sparse_rows if into is None else into.capacity
        if plan.out_start + plan.rows > limit:
            raise ValueError(f"gather rows [{plan.out_start}, {plan.out_start + plan.rows}) past the destination's {limit} rows")
        out = slice(plan.out_start, plan.out_start + plan.rows)
        if self.kernels is not None:  # the plan goes up once; every layer's launch reads it
            index, weight, target_position = (torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
                                              for a in (plan.gather_index, plan.gather_weight, plan.target_position))
        for layer in range(self.config.num_hidden_layers):
            if self.kernels is not None:  # writes the destination rows in place
                self.kernels.bilevel_kv_gather_torch(
                    cache.rows.keys[layer], cache.rows.values[layer], index, weight, cache.positions, target_position,
                    rope_theta=self.theta, out=(target.keys[layer][out], target.values[layer][out]),
                )
            else:
                key, value = bilevel_kv_gather(cache.rows.keys[layer], cache.rows.values[layer], plan, cache.positions, self.theta)
                target.keys[layer][out], target.values[layer][out] = key, value
        if into is not None:
            into.length = out.stop

    @torch.no_grad()
    def score(self, cache: TorchDecodeCache, input_ids) -> np.ndarray:
        ids, past = self._ids(input_ids), cache.length
        # float64 sums in plain torch (the reference's); the kernel accumulates float32 with atomics
        mass = torch.zeros(past, dtype=torch.float32 if self.kernels is not None else torch.float64, device=self.device)
        row_bounds = torch.stack([torch.arange(past), torch.arange(1, past + 1)], 1).to(self.device)

        def attention(layer: int, query, key, value) -> torch.Tensor:
            keys = torch.cat([cache.rows.keys[layer][:past], key])
            values = torch.cat([cache.rows.values[layer][:past], value])
            own = torch.arange(len(ids), device=self.device)
            visible = torch.cat([torch.ones(len(ids), past, dtype=torch.bool, device=self.device), own[None] <= own[:, None]], 1)
            if self.kernels is None:
                out, probs = attend(query, keys, values, visible, self.scale)
                mass.add_(probs.sum(dim=(0, 1))[:past].double())
                return out
            # One launch per layer (per slice of the kernel's block limit): the question's keys are
            # the causal tail, so query q sees the past and its own keys 0..q, as the score graph
            # does; one-row "blocks" give the per-row mass this interface returns.
            for start in range(0, past, MAX_SCORE_BLOCKS):
                stop = min(past, start + MAX_SCORE_BLOCKS)
                self.kernels.block_scores_torch(query, keys, row_bounds[start:stop], scale=self.scale,
                                                scores=mass[start:stop], causal_tail=len(ids))
            return masked_sdpa(query, keys, values, visible, self.scale)  # the kernel has the mass: no probabilities

        self.forward(self.model.model.embed_tokens(ids), torch.arange(past, past + len(ids), device=self.device), attention)
        return mass.float().cpu().numpy()

    @torch.no_grad()
    def decode(self, cache: TorchDecodeCache, input_ids) -> np.ndarray:
        """One step: the (tokens, bucket) step of this cache, replayed as a CUDA graph after its first use."""
        ids = np.asarray(input_ids, dtype=np.int64)
        past, t = cache.length, len(ids)
        if past + t > cache.capacity:
            raise RuntimeError(f"decode cache full: {past} + {t} > capacity {cache.capacity}")
        bucket = capacity_bucket(past + t, granule=DECODE_BUCKET_ROWS, capacity=cache.capacity)
        key = (t, bucket)
        step = cache.steps.get(key) or cache.steps.setdefault(key, self._decode_step(cache, t, bucket))
        step.input_ids.copy_(torch.from_numpy(ids))
        step.past_len.fill_(past)
        if step.graph is not None:
            step.graph.replay()
            logits = step.logits
            self.decode_counts["replayed"] += 1
        else:
            logits = step.run()  # the first use runs plainly: it is also the warm-up a capture needs
            self.decode_counts["plain"] += 1
            if self.graph_factory is not None and t == 1:  # the question's tokens run once per cache: not worth a graph
                self._capture(step)
        cache.length = past + t
        return logits.cpu().numpy()

    def _capture(self, step: DecodeStep) -> None:
        graph = self.graph_factory()
        if isinstance(graph, torch.cuda.CUDAGraph):
            torch.cuda.synchronize(self.device)
            with torch.cuda.graph(graph, pool=self._graph_pool):
                step.logits = step.run()
        else:  # a test's stand-in records the callable itself
            step.logits = graph.capture(step.run)
        step.graph = graph
        self.decode_counts["captured"] += 1

    def _decode_step(self, cache: TorchDecodeCache, t: int, bucket: int) -> DecodeStep:
        """Static buffers and the callable of one (t, bucket) step; see `DecodeStep`."""
        cfg, device = self.config, self.device
        input_ids = torch.zeros(t, dtype=torch.int64, device=device)
        past_len = torch.zeros(1, dtype=torch.int64, device=device)
        own = torch.arange(t, device=device)
        all_queries = own.clone()  # every new token sees the whole valid past [0, past_len)
        no_rows = torch.zeros(0, dtype=torch.int64, device=device)
        cache_rows = torch.arange(bucket, device=device)
        causal = own[None, :] <= own[:, None]
        keys = [k[:bucket] for k in cache.rows.keys]  # views: fixed addresses, what a graph records
        values = [v[:bucket] for v in cache.rows.values]
        if self.kernels is not None:
            workspace = torch.empty(max(1, self.kernels.chunk_attention_workspace_bytes(
                num_queries=t, past_capacity=bucket, num_visible=0, num_timestamp_queries=t,
                num_q_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                dtype=str(self.model.dtype).split(".")[-1],
            )), dtype=torch.uint8, device=device)

        def run() -> torch.Tensor:
            positions = past_len + own  # (T,) on the device: the graph reads the valid length when it runs

            def attention(layer: int, query, key, value) -> torch.Tensor:
                if self.kernels is not None:
                    out = self.kernels.chunk_attention_torch(
                        query, key, value, keys[layer], values[layer], past_len=past_len, visible_past_index=no_rows,
                        timestamp_query_index=all_queries, scale=self.scale, workspace=workspace, variant=self.attention_kernel,
                    )
                else:
                    visible = torch.cat([(cache_rows < past_len)[None].expand(t, bucket), causal], dim=1)
                    out = attend(query, torch.cat([keys[layer], key]), torch.cat([values[layer], value]), visible, self.scale)[0]
                keys[layer].index_copy_(0, positions, key)
                values[layer].index_copy_(0, positions, value)
                return out

            hidden = self.forward(self.model.model.embed_tokens(input_ids), positions, attention)
            return self.model.logits(hidden[-1:])

        return DecodeStep(input_ids, past_len, run)
