"""The LLM graphs written by hand: prefill-chunk and decode, plus the one-node kv-gather graph.

Layouts are token-major (tokens, heads, head_dim); every graph handles one sequence. Weight
initializers keep the checkpoint's names.

prefill_chunk:  input_ids (Q) + visual_embeds (Nv, H) + position_ids (Q) + visibility ranges
                + past_key.i / past_value.i (P, Hkv, D), keys before RoPE
             -> logits (1, V) of the last position, present_key.i / present_value.i (Q, Hkv, D)
decode:         input_ids (T) + position_ids (T) + past_key.i (P, Hkv, D) rotated + past_value.i
             -> logits (1, V) of the last position, attention_mass (P + T), present (T, Hkv, D)
kv_gather:      BilevelKVGather over one layer's source KV -> the mixed cache of that layer
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from videoxl.config import VideoXLConfig
from videoxl.export.llm import rope_inv_freq
from videoxl.export.model import VideoXLModel
from videoxl.export.onnx_graph import ONNX_FLOAT, ExternalData, GraphBuilder, value_info
from videoxl.export.onnx_ops import (
    bilevel_kv_gather,
    chunk_sparse_attention,
    custom_opset_imports,
    function_protos,
    gqa_attention,
    gqa_probs,
    rope,
    rope_tables,
)
from videoxl.ops import BILEVEL_KV_GATHER


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key.{layer}", f"past_value.{layer}"


def present_names(layer: int) -> tuple[str, str]:
    return f"present_key.{layer}", f"present_value.{layer}"


class LLMGraphWriter:
    def __init__(self, model: VideoXLModel, dtype: str, external: ExternalData | None = None) -> None:
        self.model, self.cfg, self.dtype, self.external = model, model.cfg, dtype, external
        self.elem = ONNX_FLOAT[dtype]
        self.state = model.state_dict()  # tensors are converted one at a time, when a graph uses them

    # --- building blocks ------------------------------------------------------------------
    def _weight(self, b: GraphBuilder, name: str) -> str:
        if not b.has_initializer(name):
            b.initializer(name, self._cast(self.state[name].detach().float().numpy()), self.elem)
        return name

    def _cast(self, array: np.ndarray) -> np.ndarray:
        return array.astype(np.float16) if self.dtype == "fp16" else array.astype(np.float32)

    def _linear(self, b: GraphBuilder, x: str, prefix: str, bias: bool) -> str:
        inputs = [x, self._weight(b, f"{prefix}.weight")] + ([self._weight(b, f"{prefix}.bias")] if bias else [])
        return b.op("Gemm", *inputs, transB=1)

    def _rms_norm(self, b: GraphBuilder, x: str, weight: str) -> str:
        xf = b.op("Cast", x, to=TensorProto.FLOAT)
        mean_square = b.op("ReduceMean", b.op("Mul", xf, xf), b.const([-1]), keepdims=1)
        inv = b.op("Reciprocal", b.op("Sqrt", b.op("Add", mean_square, b.const(self.cfg.rms_norm_eps, np.float32))))
        return b.op("Mul", self._weight(b, weight), b.op("CastLike", b.op("Mul", xf, inv), x))

    def _inv_freq(self, b: GraphBuilder) -> str:
        return b.initializer("rope_inv_freq", rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta).numpy())

    def _layers(self, b: GraphBuilder, x: str, cos: str, sin: str, attention) -> str:
        """Decoder layers; attention(layer, q_rot, k, k_rot, v) -> (n, Hq, D)."""
        cfg = self.cfg
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}"
            h = self._rms_norm(b, x, f"{p}.input_layernorm.weight")
            q = b.op("Reshape", self._linear(b, h, f"{p}.self_attn.q_proj", True), b.const([-1, cfg.num_attention_heads, cfg.head_dim]))
            k = b.op("Reshape", self._linear(b, h, f"{p}.self_attn.k_proj", True), b.const([-1, cfg.num_key_value_heads, cfg.head_dim]))
            v = b.op("Reshape", self._linear(b, h, f"{p}.self_attn.v_proj", True), b.const([-1, cfg.num_key_value_heads, cfg.head_dim]))
            out = attention(i, rope(b, q, cos, sin), k, rope(b, k, cos, sin), v)
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

    def _kv_io(self, past_dim: str, new_dim: str) -> tuple[list, list]:
        cfg, inputs, outputs = self.cfg, [], []
        for i in range(cfg.num_hidden_layers):
            for name in past_names(i):
                inputs.append(value_info(name, self.elem, [past_dim, cfg.num_key_value_heads, cfg.head_dim]))
            for name in present_names(i):
                outputs.append(value_info(name, self.elem, [new_dim, cfg.num_key_value_heads, cfg.head_dim]))
        return inputs, outputs

    def _model(self, b: GraphBuilder, name: str, inputs: list, outputs: list) -> onnx.ModelProto:
        graph = helper.make_graph(b.nodes, name, inputs, outputs, initializer=b.initializers)
        model = helper.make_model(graph, opset_imports=custom_opset_imports(), functions=function_protos())
        model.producer_name = "videoxl"
        return model

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
        inv_freq = self._inv_freq(b)
        cos, sin = rope_tables(b, "position_ids", inv_freq)
        past_cos, past_sin = rope_tables(b, b.arange(b.const(0), b.dim("past_key.0", 0)), inv_freq)

        def attention(i: int, q_rot: str, k: str, k_rot: str, v: str) -> str:
            past_key, past_value = past_names(i)
            present_key, present_value = present_names(i)
            b.op("Identity", k, outputs=[present_key])
            b.op("Identity", v, outputs=[present_value])
            keys = b.op("Concat", rope(b, past_key, past_cos, past_sin), k_rot, axis=0)
            values = b.op("Concat", past_value, v, axis=0)
            return chunk_sparse_attention(
                b, q_rot, keys, values, "prefix_len", "window_start", "past_timestamp_index", "timestamp_query_index",
                scale=cfg.head_dim**-0.5,
            )

        self._last_logits(b, self._layers(b, x, cos, sin, attention))
        kv_in, kv_out = self._kv_io("past_tokens", "chunk_tokens")
        inputs = [
            value_info("input_ids", TensorProto.INT64, ["chunk_tokens"]),
            value_info("visual_embeds", self.elem, ["visual_tokens", cfg.hidden_size]),
            value_info("position_ids", TensorProto.INT64, ["chunk_tokens"]),
            value_info("timestamp_query_index", TensorProto.INT64, ["timestamp_queries"]),
            value_info("prefix_len", TensorProto.INT64, [1]),
            value_info("window_start", TensorProto.INT64, [1]),
            value_info("past_timestamp_index", TensorProto.INT64, ["past_timestamps"]),
            *kv_in,
        ]
        outputs = [value_info("logits", TensorProto.FLOAT, [1, cfg.vocab_size]), *kv_out]
        return self._model(b, "videoxl_prefill_chunk", inputs, outputs)

    def decode(self) -> onnx.ModelProto:
        cfg, b = self.cfg, GraphBuilder(external=self.external)
        x = b.op("Gather", self._weight(b, "model.embed_tokens.weight"), "input_ids", axis=0)
        cos, sin = rope_tables(b, "position_ids", self._inv_freq(b))
        num_new, num_past = b.dim("input_ids", 0), b.dim("past_key.0", 0)
        query_pos = b.op("Add", b.arange(b.const(0), num_new), num_past)
        key_pos = b.arange(b.const(0), b.op("Add", num_past, num_new))
        visible = b.op("LessOrEqual", b.op("Unsqueeze", key_pos, b.const([0])), b.op("Unsqueeze", query_pos, b.const([1])))
        scale = b.const(cfg.head_dim**-0.5, np.float32)
        masses: list[str] = []

        def attention(i: int, q_rot: str, k: str, k_rot: str, v: str) -> str:
            past_key, past_value = past_names(i)
            present_key, present_value = present_names(i)
            b.op("Identity", k_rot, outputs=[present_key])
            b.op("Identity", v, outputs=[present_value])
            keys = b.op("Concat", past_key, k_rot, axis=0)
            values = b.op("Concat", past_value, v, axis=0)
            probs = gqa_probs(b, q_rot, keys, visible, scale)
            masses.append(b.op("ReduceSum", probs, b.const([0, 1, 2]), keepdims=0))
            return gqa_attention(b, q_rot, keys, values, visible, scale, probs=probs)

        self._last_logits(b, self._layers(b, x, cos, sin, attention))
        b.op("Sum", *masses, outputs=["attention_mass"])
        kv_in, kv_out = self._kv_io("past_tokens", "new_tokens")
        inputs = [
            value_info("input_ids", TensorProto.INT64, ["new_tokens"]),
            value_info("position_ids", TensorProto.INT64, ["new_tokens"]),
            *kv_in,
        ]
        outputs = [
            value_info("logits", TensorProto.FLOAT, [1, cfg.vocab_size]),
            value_info("attention_mass", TensorProto.FLOAT, ["all_tokens"]),
            *kv_out,
        ]
        return self._model(b, "videoxl_decode", inputs, outputs)

    def kv_gather(self) -> onnx.ModelProto:
        cfg, b = self.cfg, GraphBuilder()
        key, value, index, weight = BILEVEL_KV_GATHER.input_names
        mixed_key, mixed_value = BILEVEL_KV_GATHER.output_names
        bilevel_kv_gather(b, key, value, index, weight, rope_theta=cfg.rope_theta, outputs=[mixed_key, mixed_value])
        kv = [cfg.num_key_value_heads, cfg.head_dim]
        inputs = [
            value_info(key, self.elem, ["source_tokens", *kv]),
            value_info(value, self.elem, ["source_tokens", *kv]),
            value_info(index, TensorProto.INT64, ["mixed_tokens", "pool"]),
            value_info(weight, TensorProto.FLOAT, ["mixed_tokens", "pool"]),
        ]
        outputs = [value_info(mixed_key, self.elem, ["mixed_tokens", *kv]), value_info(mixed_value, self.elem, ["mixed_tokens", *kv])]
        return self._model(b, "videoxl_kv_gather", inputs, outputs)


def export_config_check(cfg: VideoXLConfig) -> None:
    """Raise for configs the hand-written graphs do not cover."""
    if cfg.head_dim % 2:
        raise ValueError(f"head_dim {cfg.head_dim} must be even for RoPE")

