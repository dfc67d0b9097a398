"""The LLM graphs written by hand: prefill-chunk, decode, score, plus the one-node kv-gather graph.

Their inputs and outputs are `videoxl.graphs` (the graph contract); layouts are token-major
(tokens, heads, head_dim), one sequence. Keys are rotated once, when computed, and cached rotated:
no graph rotates or concatenates a past. Linear layers are `MatMul` (+ `Add` for a bias) with the
weight stored transposed, (in, out), under the checkpoint's name plus ".T": the form weight
quantizers (ONNX Runtime's MatMulNBits, ModelOpt) and TensorRT's weight-only GEMMs take. With
`--weights int8|int4` that weight is int8/int4 values + scales -> DequantizeLinear -> MatMul
(`videoxl.weight_format`, `export/quantize.py`).

prefill_chunk:  the chunk at positions past_len + i, attention by videoxl::ChunkSparseAttention
decode:         T tokens at positions past_len + t against a capacity buffer, standard Attention
score:          the question's queries and keys (from prefill_chunk) -> attention mass per past row; no weights
kv_gather:      videoxl::BilevelKVGather over one layer's source KV
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from videoxl.config import VideoXLConfig
from videoxl.export.llm import rope_inv_freq
from videoxl.export.model import VideoXLModel
from videoxl.export.onnx_graph import ONNX_FLOAT, ExternalData, GraphBuilder, value_info
from videoxl.export.onnx_ops import (
    attention,
    bilevel_kv_gather,
    chunk_sparse_attention,
    custom_opset_imports,
    function_protos,
    gqa_attention,
    gqa_probs,
    rope,
    rope_tables,
)
from videoxl.export.quantize import dequantize_attrs, quantized_tensors
from videoxl.graphs import DECODE, KV_GATHER, PREFILL_CHUNK, SCORE, GraphContract, kv_names
from videoxl.weight_format import WeightFormat

ONNX_ELEM = {"int64": TensorProto.INT64, "float32": TensorProto.FLOAT}


class LLMGraphWriter:
    def __init__(
        self, model: VideoXLModel, dtype: str, external: ExternalData | None = None, *,
        weights: WeightFormat = WeightFormat(), state: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """``state`` (default: the model's state dict) is where weights are read, one tensor at a time
        when a graph uses it: a ``checkpoint.LazyStateDict`` streams an 8B model's LLM from its shards."""
        self.model, self.cfg, self.dtype, self.external = model, model.cfg, dtype, external
        self.elem = ONNX_FLOAT[dtype]
        self.weights = weights
        # scales are stored in the export dtype (bf16: float32 values bf16 holds exactly, see quantize_weight)
        self._scale_dtype = {"fp16": np.dtype(np.float16), "bf16": "bf16"}.get(dtype, np.dtype(np.float32))
        self.state = model.state_dict() if state is None else state

    # --- building blocks ------------------------------------------------------------------
    def _weight(self, b: GraphBuilder, name: str) -> str:
        if not b.has_initializer(name):
            b.initializer(name, self._cast(self.state[name].detach().float().numpy()), self.elem)
        return name

    def _cast(self, array: np.ndarray) -> np.ndarray:
        return array.astype(np.float16) if self.dtype == "fp16" else array.astype(np.float32, copy=False)

    def _linear(self, b: GraphBuilder, x: str, prefix: str, bias: bool) -> str:
        """x (n, in) @ W.T (in, out) [+ b]: MatMul with a constant (in, out) weight, quantizer-friendly."""
        y = b.op("MatMul", x, self._linear_weight(b, prefix))
        return b.op("Add", y, self._weight(b, f"{prefix}.bias")) if bias else y

    def _linear_weight(self, b: GraphBuilder, prefix: str) -> str:
        """The (in, out) weight: a float initializer, or int8/int4 values + scales -> DequantizeLinear.

        The scales are in the export dtype, so DequantizeLinear yields the graph's float type.
        """
        name = f"{prefix}.weight.T"
        bits = self.weights.bits_of(prefix)
        if bits is None:
            if not b.has_initializer(name):
                b.initializer(name, self._cast(self._transposed(prefix)), self.elem)
            return name
        q_name, s_name = f"{name}.q", f"{name}.scale"
        # Each name on its own: with external data a scale under 1 KiB stays inline in the graph
        # that quantized it, so a later graph reuses the shared values but needs the scale again.
        has_values, has_scale = b.has_initializer(q_name), b.has_initializer(s_name)
        if not (has_values and has_scale):
            (_, payload, dims, elem), (_, scale) = quantized_tensors(
                name, self._transposed(prefix), bits, self.weights.block_size, self._scale_dtype
            )
            if not has_values:
                b.raw_initializer(q_name, payload, dims, elem)
            if not has_scale:
                b.initializer(s_name, scale, self.elem)
        return b.op("DequantizeLinear", q_name, s_name, **dequantize_attrs(bits, self.weights.block_size))

    def _transposed(self, prefix: str) -> np.ndarray:
        # transposed by torch in the checkpoint dtype: numpy's strided .T copy takes seconds per 7B matrix
        return self.state[f"{prefix}.weight"].detach().t().contiguous().float().numpy()

    def _rms_norm(self, b: GraphBuilder, x: str, weight: str) -> str:
        xf = b.op("Cast", x, to=TensorProto.FLOAT)
        mean_square = b.op("ReduceMean", b.op("Mul", xf, xf), b.const([-1]), keepdims=1)
        inv = b.op("Reciprocal", b.op("Sqrt", b.op("Add", mean_square, b.const(self.cfg.rms_norm_eps, np.float32))))
        return b.op("Mul", self._weight(b, weight), b.op("CastLike", b.op("Mul", xf, inv), x))

    def _inv_freq(self, b: GraphBuilder) -> str:
        return b.initializer("rope_inv_freq", rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta).numpy())

    def _layers(self, b: GraphBuilder, x: str, cos: str, sin: str, attend) -> str:
        """Decoder layers; attend(layer, q_rot, k_rot, v) -> (n, Hq, D)."""
        cfg = self.cfg
        for i in range(cfg.num_hidden_layers):
            x = b.op("Identity", x, outputs=[f"hidden.{i}"])  # a layer boundary (videoxl.graphs): where ranges are cut
            p = f"model.layers.{i}"
            h = self._rms_norm(b, x, f"{p}.input_layernorm.weight")
            q = b.op("Reshape", self._linear(b, h, f"{p}.self_attn.q_proj", True), b.const([-1, cfg.num_attention_heads, cfg.head_dim]))
            k = b.op("Reshape", self._linear(b, h, f"{p}.self_attn.k_proj", True), b.const([-1, cfg.num_key_value_heads, cfg.head_dim]))
            v = b.op("Reshape", self._linear(b, h, f"{p}.self_attn.v_proj", True), b.const([-1, cfg.num_key_value_heads, cfg.head_dim]))
            out = attend(i, rope(b, q, cos, sin), rope(b, k, cos, sin), v)
            x = b.op("Add", x, self._linear(b, b.op("Reshape", out, b.const([-1, cfg.hidden_size])), f"{p}.self_attn.o_proj", False))
            h = self._rms_norm(b, x, f"{p}.post_attention_layernorm.weight")
            gate = self._linear(b, h, f"{p}.mlp.gate_proj", False)
            mlp = b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), self._linear(b, h, f"{p}.mlp.up_proj", False))
            x = b.op("Add", x, self._linear(b, mlp, f"{p}.mlp.down_proj", False))
        return x

    def _last_logits(self, b: GraphBuilder, x: str) -> None:
        last = b.op("Slice", x, b.const([-1]), b.const([np.iinfo(np.int64).max]), b.const([0]))
        logits = self._linear(b, self._rms_norm(b, last, "model.norm.weight"), "lm_head", False)
        b.op("Cast", logits, to=TensorProto.FLOAT, outputs=["logits"])

    def _io(self, contract: GraphContract) -> tuple[list, list]:
        """value_infos of a graph's inputs and outputs, straight from the contract."""
        layers = self.cfg.num_hidden_layers

        def infos(specs) -> list:
            out = []
            for spec in specs:
                elem = self.elem if spec.dtype == "float" else ONNX_ELEM[spec.dtype]
                out += [value_info(name, elem, spec.shape(self.cfg)) for name in spec.names(layers)]
            return out

        return infos(contract.inputs), infos(contract.outputs)

    def _model(self, b: GraphBuilder, contract: GraphContract) -> onnx.ModelProto:
        inputs, outputs = self._io(contract)
        graph = helper.make_graph(b.nodes, f"videoxl_{contract.name}", inputs, outputs, initializer=b.initializers)
        model = helper.make_model(graph, opset_imports=custom_opset_imports(), functions=function_protos())
        model.producer_name = "videoxl"
        return model

    def _positions(self, b: GraphBuilder, ids: str) -> str:
        """past_len + arange(len(ids)): the new tokens' absolute positions."""
        return b.op("Add", b.arange(b.const(0), b.dim(ids, 0)), b.scalar("past_len"))

    def _store_present(self, b: GraphBuilder, layer: int, k_rot: str, v: str) -> None:
        present_key, present_value = kv_names("present", layer)
        b.op("Identity", k_rot, outputs=[present_key])
        b.op("Identity", v, outputs=[present_value])

    def _cache_prologue(self, b: GraphBuilder) -> tuple[str, str, str, str]:
        """What decode needs first: token embeddings, the (T, P + T) mask over [past buffer ++ new
        keys] (past rows < past_len, new keys causally), and RoPE at positions past_len + t."""
        x = b.op("Gather", self._weight(b, "model.embed_tokens.weight"), "input_ids", axis=0)
        past_pos = b.arange(b.const(0), b.dim(kv_names("past", 0)[0], 0))
        query_pos = self._positions(b, "input_ids")
        key_pos = b.op("Concat", past_pos, query_pos, axis=0)
        causal = b.op("LessOrEqual", b.op("Unsqueeze", key_pos, b.const([0])), b.op("Unsqueeze", query_pos, b.const([1])))
        new = b.op("Expand", b.const([True], np.bool_), b.op("Shape", "input_ids"))
        valid = b.op("Concat", b.op("Less", past_pos, "past_len"), new, axis=0)
        visible = b.op("And", causal, b.op("Unsqueeze", valid, b.const([0])))
        cos, sin = rope_tables(b, query_pos, self._inv_freq(b))
        return x, visible, cos, sin

    def _splice_visual(self, b: GraphBuilder, embeds: str, ids: str, image_token_id: int) -> str:
        """Placeholder rows take the visual embeddings in order (no NonZero: TensorRT for RTX lacks it).

            slot  = CumSum(ids == image) - 1           visual row of each placeholder
            index = Where(ids == image, slot, Nv)       row Nv = an appended zero row
            x     = Where(ids == image, [visual; 0][index], embeds)
        """
        is_image = b.op("Equal", ids, b.const(image_token_id))
        slot = b.op("Sub", b.op("CumSum", b.op("Cast", is_image, to=TensorProto.INT64), b.const(0)), b.const(1))
        index = b.op("Where", is_image, slot, b.dim("visual_embeds", 0))
        zero_row = b.op("CastLike", b.const(np.zeros((1, self.cfg.hidden_size), np.float32), np.float32), embeds)
        table = b.op("Concat", "visual_embeds", zero_row, axis=0)
        gathered = b.op("Gather", table, index, axis=0)
        return b.op("Where", b.op("Unsqueeze", is_image, b.const([1])), gathered, embeds)

    # --- graphs ---------------------------------------------------------------------------
    def prefill_chunk(self, image_token_id: int) -> onnx.ModelProto:
        cfg, b = self.cfg, GraphBuilder(external=self.external)
        ids = "input_ids"
        embeds = b.op("Gather", self._weight(b, "model.embed_tokens.weight"), ids, axis=0)
        x = self._splice_visual(b, embeds, ids, image_token_id)
        cos, sin = rope_tables(b, self._positions(b, ids), self._inv_freq(b))

        def attend(i: int, q_rot: str, k_rot: str, v: str) -> str:
            self._store_present(b, i, k_rot, v)
            b.op("Identity", q_rot, outputs=[f"query.{i}"])  # what block scoring reads (score)
            return chunk_sparse_attention(
                b, q_rot, k_rot, v, *kv_names("past", i), "past_len", "visible_past_index", "timestamp_query_index",
                scale=cfg.head_dim**-0.5,
            )

        self._last_logits(b, self._layers(b, x, cos, sin, attend))
        return self._model(b, PREFILL_CHUNK)

    def decode(self) -> onnx.ModelProto:
        cfg, b = self.cfg, GraphBuilder(external=self.external)
        x, visible, cos, sin = self._cache_prologue(b)

        def attend(i: int, q_rot: str, k_rot: str, v: str) -> str:
            self._store_present(b, i, k_rot, v)
            past_key, past_value = kv_names("past", i)
            keys, values = b.op("Concat", past_key, k_rot, axis=0), b.op("Concat", past_value, v, axis=0)
            return attention(b, q_rot, keys, values, visible, scale=cfg.head_dim**-0.5)

        self._last_logits(b, self._layers(b, x, cos, sin, attend))
        return self._model(b, DECODE)

    def score(self) -> onnx.ModelProto:
        """The question's attention mass on the scoring cache, from its per-layer queries and keys: no
        weights. Query t sees past rows [0, past_len) and the question's keys 0..t (as in decode)."""
        cfg, b = self.cfg, GraphBuilder()
        scale = b.const(cfg.head_dim**-0.5, np.float32)
        past_pos = b.arange(b.const(0), b.dim(kv_names("past", 0)[0], 0))
        own = b.arange(b.const(0), b.dim("query.0", 0))
        # key positions: past rows at their row index, the question's keys after every valid row
        query_pos = b.op("Add", own, b.scalar("past_len"))
        key_pos = b.op("Concat", past_pos, query_pos, axis=0)
        causal = b.op("LessOrEqual", b.op("Unsqueeze", key_pos, b.const([0])), b.op("Unsqueeze", query_pos, b.const([1])))
        new = b.op("Expand", b.const([True], np.bool_), b.op("Shape", own))
        valid = b.op("Concat", b.op("Less", past_pos, "past_len"), new, axis=0)
        visible = b.op("And", causal, b.op("Unsqueeze", valid, b.const([0])))
        num_past = b.op("Shape", kv_names("past", 0)[0], start=0, end=1)
        total = None
        for i in range(cfg.num_hidden_layers):
            query = f"query.{i}"
            if total is not None:
                # The layers are independent: without an order TensorRT keeps most layers' fp32
                # probabilities live at once (16.4 GB at --max-frames 1024 against 0.79 GB for one
                # layer; bench/RESULTS.md, "Real size"). query + 0 x (running mass)[0] orders layer i
                # after layer i-1, exactly (the mass is finite), so one layer's working set is reused.
                after = b.op("Mul", b.op("Slice", total, b.const([0]), b.const([1])), b.const(0.0, np.float32))
                query = b.op("Add", query, b.op("Cast", after, to=self.elem))
            keys = b.op("Concat", kv_names("past", i)[0], f"key.{i}", axis=0)
            probs = gqa_probs(b, query, keys, visible, scale)  # (Hkv, G, T, P + T)
            mass = b.op("Slice", b.op("ReduceSum", probs, b.const([0, 1, 2]), keepdims=0), b.const([0]), num_past)
            last = i + 1 == cfg.num_hidden_layers
            if total is None:
                total = b.op("Identity", mass, outputs=["attention_mass"] if last else 1)
            else:
                total = b.op("Add", total, mass, outputs=["attention_mass"] if last else 1)
        return self._model(b, SCORE)

    def kv_gather(self) -> onnx.ModelProto:
        cfg, b = self.cfg, GraphBuilder()
        bilevel_kv_gather(b, *KV_GATHER.input_names(1), rope_theta=cfg.rope_theta, outputs=KV_GATHER.output_names(1))
        return self._model(b, KV_GATHER)


def export_config_check(cfg: VideoXLConfig) -> None:
    """Raise for configs the hand-written graphs do not cover."""
    if cfg.head_dim % 2:
        raise ValueError(f"head_dim {cfg.head_dim} must be even for RoPE")

