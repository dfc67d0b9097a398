"""TEST FIXTURE: a tiny stand-in for the exporter's artifact directory.

Writes ``vision.onnx``, ``prefill_chunk.onnx``, ``decode.onnx``, ``kv_gather.onnx``,
``config.json`` and ``export_manifest.json`` for a toy config, so that the engine builder can be
tested before (and independently of) the real exporter. The graphs are not Video-XL-2: only
their interface follows the artifact contract (input names, symbolic dimension names from
``videoxl.engines.profiles.DIMENSIONS``, the two ``videoxl``-domain custom ops with model-local
function bodies that implement ``videoxl.ops`` in standard ONNX).

    prefill_chunk.onnx:
        hidden (chunk_tokens, hidden) --MatMul--> q, k_new, v_new
        past_key/past_value (past_tokens, Hkv, D) ++ k_new/v_new --> key/value
        videoxl::ChunkSparseAttention(q, key, value, prefix_len, window_start,
                                      past_timestamp_index, query_is_timestamp) --MatMul--> out
    kv_gather.onnx:
        videoxl::BilevelKVGather(key, value, gather_index, gather_weight) --> mixed_key/value
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from videoxl import ops
from videoxl.config import VideoXLConfig

OPSET = 18
FLOAT_TYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}


def tiny_config() -> VideoXLConfig:
    return VideoXLConfig(
        vision_hidden_size=32, vision_intermediate_size=64, vision_num_heads=2, vision_num_layers=2,
        vision_select_layer=-1, image_size=28, patch_size=14, compressor_grid=8,
        compressor_groupnorm_groups=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=64, max_frames=64,
    )  # tokens_per_group = (8 // 2) ** 2 = 16, head_dim = 8


# --- the two custom ops: standard-ONNX function bodies following videoxl.ops -------------------
def _ref_attr(name: str, ref: str, kind: int) -> onnx.AttributeProto:
    attr = onnx.AttributeProto()
    attr.name, attr.ref_attr_name, attr.type = name, ref, kind
    return attr


def _const_i64(name: str, values: list[int], scalar: bool = False) -> onnx.NodeProto:
    array = np.asarray(values[0] if scalar else values, dtype=np.int64)
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array))


def chunk_sparse_attention_function() -> onnx.FunctionProto:
    """Dense masked attention with the contract's visibility rule, float32 inside."""
    c = ops.CHUNK_SPARSE_ATTENTION
    scale = helper.make_node("Constant", [], ["scale"])
    scale.attribute.append(_ref_attr("value_float", "scale", onnx.AttributeProto.FLOAT))
    nodes = [
        _const_i64("zero", [0], scalar=True), _const_i64("one", [1], scalar=True),
        _const_i64("minus_one", [-1]), _const_i64("ax1", [1]), scale,
        helper.make_node("Constant", [], ["neg"], value_float=-1e30),
        helper.make_node("Cast", ["query"], ["qf"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["key"], ["kf"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["value"], ["vf"], to=TensorProto.FLOAT),
        helper.make_node("Shape", ["query"], ["Qn"], start=0, end=1),
        helper.make_node("Shape", ["key"], ["Kn"], start=0, end=1),
        helper.make_node("Shape", ["key"], ["Hkv"], start=1, end=2),
        helper.make_node("Shape", ["key"], ["D"], start=2, end=3),
        helper.make_node("Sub", ["Kn", "Qn"], ["past"]),
        helper.make_node("Squeeze", ["Qn"], ["Qs"]),
        helper.make_node("Squeeze", ["Kn"], ["Ks"]),
        helper.make_node("Range", ["zero", "Qs", "one"], ["qidx"]),
        helper.make_node("Add", ["qidx", "past"], ["qpos"]),  # (Q,) absolute query positions
        helper.make_node("Range", ["zero", "Ks", "one"], ["kpos"]),  # (K,)
        helper.make_node("Unsqueeze", ["qpos", "ax1"], ["qpos_col"]),
        helper.make_node("LessOrEqual", ["kpos", "qpos_col"], ["causal"]),  # (Q, K)
        helper.make_node("Less", ["kpos", "prefix_len"], ["in_prefix"]),
        helper.make_node("GreaterOrEqual", ["kpos", "window_start"], ["in_window"]),
        helper.make_node("Unsqueeze", ["kpos", "ax1"], ["kpos_col"]),
        helper.make_node("Equal", ["kpos_col", "past_timestamp_index"], ["ts_eq"]),  # (K, T)
        helper.make_node("Cast", ["ts_eq"], ["ts_eqf"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["ts_eqf", "ax1"], ["ts_count"], keepdims=0),
        helper.make_node("Constant", [], ["fzero"], value_float=0.0),
        helper.make_node("Greater", ["ts_count", "fzero"], ["is_past_ts"]),
        helper.make_node("Or", ["in_prefix", "in_window"], ["base0"]),
        helper.make_node("Or", ["base0", "is_past_ts"], ["base"]),  # (K,)
        helper.make_node("Unsqueeze", ["query_is_timestamp", "ax1"], ["qts_col"]),
        helper.make_node("Or", ["qts_col", "base"], ["sees"]),
        helper.make_node("And", ["causal", "sees"], ["visible"]),  # (Q, K)
        # GQA: (Q, Hq, D) -> (Hkv, G, Q, D) against keys (Hkv, 1, D, K)
        helper.make_node("Concat", ["Qn", "Hkv", "minus_one", "D"], ["q4_shape"], axis=0),
        helper.make_node("Reshape", ["qf", "q4_shape"], ["q4"]),
        helper.make_node("Transpose", ["q4"], ["qt"], perm=[1, 2, 0, 3]),
        helper.make_node("Transpose", ["kf"], ["kt"], perm=[1, 2, 0]),
        helper.make_node("Unsqueeze", ["kt", "ax1"], ["kt4"]),
        helper.make_node("MatMul", ["qt", "kt4"], ["logits"]),
        helper.make_node("Mul", ["logits", "scale"], ["scaled"]),
        helper.make_node("Where", ["visible", "scaled", "neg"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("Transpose", ["vf"], ["vt"], perm=[1, 0, 2]),
        helper.make_node("Unsqueeze", ["vt", "ax1"], ["vt4"]),
        helper.make_node("MatMul", ["probs", "vt4"], ["ctx"]),  # (Hkv, G, Q, D)
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[2, 0, 1, 3]),
        helper.make_node("Shape", ["query"], ["q_shape"]),
        helper.make_node("Reshape", ["ctx_t", "q_shape"], ["ctx3"]),
        helper.make_node("CastLike", ["ctx3", "query"], ["output"]),
    ]
    return helper.make_function(
        ops.DOMAIN, c.name, c.input_names, c.output_names, nodes,
        [helper.make_opsetid("", OPSET)], attributes=list(c.attributes),
    )


def bilevel_kv_gather_function() -> onnx.FunctionProto:
    """Weighted gather of source rows, then rotate-half RoPE of keys at positions 0..M-1."""
    c = ops.BILEVEL_KV_GATHER
    theta = helper.make_node("Constant", [], ["theta"])
    theta.attribute.append(_ref_attr("value_float", "rope_theta", onnx.AttributeProto.FLOAT))
    nodes = [
        _const_i64("zero", [0], scalar=True), _const_i64("one", [1], scalar=True),
        _const_i64("two", [2], scalar=True), _const_i64("ax1", [1]), _const_i64("ax2", [2]),
        _const_i64("ax23", [2, 3]), theta,
        helper.make_node("Cast", ["key"], ["kf"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["value"], ["vf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["gather_weight", "ax23"], ["w4"]),  # (M, S, 1, 1)
        helper.make_node("Gather", ["kf", "gather_index"], ["kg"], axis=0),  # (M, S, Hkv, D)
        helper.make_node("Gather", ["vf", "gather_index"], ["vg"], axis=0),
        helper.make_node("Mul", ["kg", "w4"], ["kw"]),
        helper.make_node("Mul", ["vg", "w4"], ["vw"]),
        helper.make_node("ReduceSum", ["kw", "ax1"], ["kp"], keepdims=0),  # (M, Hkv, D)
        helper.make_node("ReduceSum", ["vw", "ax1"], ["vp"], keepdims=0),
        helper.make_node("Shape", ["gather_index"], ["Mn"], start=0, end=1),
        helper.make_node("Squeeze", ["Mn"], ["Ms"]),
        helper.make_node("Shape", ["key"], ["Dn"], start=2, end=3),
        helper.make_node("Squeeze", ["Dn"], ["Ds"]),
        helper.make_node("Div", ["Dn", "two"], ["half"]),
        helper.make_node("Range", ["zero", "Ms", "one"], ["pos_i"]),
        helper.make_node("Cast", ["pos_i"], ["pos"], to=TensorProto.FLOAT),
        helper.make_node("Range", ["zero", "Ds", "two"], ["even_i"]),
        helper.make_node("Cast", ["even_i"], ["even"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["Ds"], ["Df"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["even", "Df"], ["expo"]),
        helper.make_node("Neg", ["expo"], ["neg_expo"]),
        helper.make_node("Pow", ["theta", "neg_expo"], ["inv_freq"]),  # (D/2,)
        helper.make_node("Unsqueeze", ["pos", "ax1"], ["pos_col"]),
        helper.make_node("Mul", ["pos_col", "inv_freq"], ["freqs"]),  # (M, D/2)
        helper.make_node("Concat", ["freqs", "freqs"], ["emb"], axis=-1),  # (M, D)
        helper.make_node("Cos", ["emb"], ["cos2"]),
        helper.make_node("Sin", ["emb"], ["sin2"]),
        helper.make_node("Unsqueeze", ["cos2", "ax1"], ["cos"]),  # (M, 1, D)
        helper.make_node("Unsqueeze", ["sin2", "ax1"], ["sin"]),
        helper.make_node("Slice", ["kp", "zero_1", "half", "ax2"], ["x1"]),
        helper.make_node("Slice", ["kp", "half", "Dn", "ax2"], ["x2"]),
        helper.make_node("Neg", ["x2"], ["neg_x2"]),
        helper.make_node("Concat", ["neg_x2", "x1"], ["rot"], axis=2),
        helper.make_node("Mul", ["kp", "cos"], ["k_cos"]),
        helper.make_node("Mul", ["rot", "sin"], ["r_sin"]),
        helper.make_node("Add", ["k_cos", "r_sin"], ["k_rope"]),
        helper.make_node("CastLike", ["k_rope", "key"], ["mixed_key"]),
        helper.make_node("CastLike", ["vp", "value"], ["mixed_value"]),
    ]
    nodes.insert(0, _const_i64("zero_1", [0]))
    return helper.make_function(
        ops.DOMAIN, c.name, c.input_names, c.output_names, nodes,
        [helper.make_opsetid("", OPSET)], attributes=list(c.attributes),
    )


# --- the four graphs --------------------------------------------------------------------------
def _model(graph: onnx.GraphProto, functions: list[onnx.FunctionProto]) -> onnx.ModelProto:
    opsets = [helper.make_opsetid("", OPSET)]
    if functions:
        opsets.append(helper.make_opsetid(ops.DOMAIN, ops.OPSET_VERSION))
    model = helper.make_model(graph, opset_imports=opsets, functions=functions, producer_name="videoxl-test-fixture")
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def _weight(name: str, shape: tuple[int, ...], dtype: int, rng: np.random.Generator) -> onnx.TensorProto:
    values = (rng.standard_normal(shape) * 0.2).astype(np.float32)
    if dtype == TensorProto.BFLOAT16:
        bits = (values.view(np.uint32) >> 16).astype(np.uint16)  # truncation is fine for a fixture
        return helper.make_tensor(name, TensorProto.BFLOAT16, shape, bits.tobytes(), raw=True)
    return numpy_helper.from_array(values.astype(onnx.helper.tensor_dtype_to_np_dtype(dtype)), name)


def prefill_chunk_model(cfg: VideoXLConfig, dtype: int, rng: np.random.Generator) -> onnx.ModelProto:
    hq, hkv, d, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    inputs = [
        helper.make_tensor_value_info("hidden", dtype, ["chunk_tokens", h]),
        helper.make_tensor_value_info("past_key", dtype, ["past_tokens", hkv, d]),
        helper.make_tensor_value_info("past_value", dtype, ["past_tokens", hkv, d]),
        helper.make_tensor_value_info("prefix_len", TensorProto.INT64, [1]),
        helper.make_tensor_value_info("window_start", TensorProto.INT64, [1]),
        helper.make_tensor_value_info("past_timestamp_index", TensorProto.INT64, ["timestamp_tokens"]),
        helper.make_tensor_value_info("query_is_timestamp", TensorProto.BOOL, ["chunk_tokens"]),
    ]
    outputs = [
        helper.make_tensor_value_info("out", dtype, ["chunk_tokens", h]),
        helper.make_tensor_value_info("new_key", dtype, ["chunk_tokens", hkv, d]),
        helper.make_tensor_value_info("new_value", dtype, ["chunk_tokens", hkv, d]),
    ]
    inits = [
        _weight("wq", (h, hq * d), dtype, rng), _weight("wk", (h, hkv * d), dtype, rng),
        _weight("wv", (h, hkv * d), dtype, rng), _weight("wo", (hq * d, h), dtype, rng),
        numpy_helper.from_array(np.array([0, hq, d], np.int64), "q_shape"),
        numpy_helper.from_array(np.array([0, hkv, d], np.int64), "kv_shape"),
        numpy_helper.from_array(np.array([0, hq * d], np.int64), "o_shape"),
    ]
    attn = helper.make_node(
        ops.CHUNK_SPARSE_ATTENTION.name,
        ["q", "key", "value", "prefix_len", "window_start", "past_timestamp_index", "query_is_timestamp"],
        ["attn"], domain=ops.DOMAIN, name="chunk_attention_0", scale=float(d) ** -0.5,
    )
    nodes = [
        helper.make_node("MatMul", ["hidden", "wq"], ["q2"]),
        helper.make_node("Reshape", ["q2", "q_shape"], ["q"]),
        helper.make_node("MatMul", ["hidden", "wk"], ["k2"]),
        helper.make_node("Reshape", ["k2", "kv_shape"], ["new_key"]),
        helper.make_node("MatMul", ["hidden", "wv"], ["v2"]),
        helper.make_node("Reshape", ["v2", "kv_shape"], ["new_value"]),
        helper.make_node("Concat", ["past_key", "new_key"], ["key"], axis=0),
        helper.make_node("Concat", ["past_value", "new_value"], ["value"], axis=0),
        attn,
        helper.make_node("Reshape", ["attn", "o_shape"], ["attn2"]),
        helper.make_node("MatMul", ["attn2", "wo"], ["out"]),
    ]
    graph = helper.make_graph(nodes, "prefill_chunk", inputs, outputs, inits)
    return _model(graph, [chunk_sparse_attention_function()])


def kv_gather_model(cfg: VideoXLConfig, dtype: int) -> onnx.ModelProto:
    hkv, d, s = cfg.num_key_value_heads, cfg.head_dim, cfg.kv_pool_stride
    inputs = [
        helper.make_tensor_value_info("key", dtype, ["source_tokens", hkv, d]),
        helper.make_tensor_value_info("value", dtype, ["source_tokens", hkv, d]),
        helper.make_tensor_value_info("gather_index", TensorProto.INT64, ["gather_rows", s]),
        helper.make_tensor_value_info("gather_weight", TensorProto.FLOAT, ["gather_rows", s]),
    ]
    outputs = [
        helper.make_tensor_value_info("mixed_key", dtype, ["gather_rows", hkv, d]),
        helper.make_tensor_value_info("mixed_value", dtype, ["gather_rows", hkv, d]),
    ]
    node = helper.make_node(
        ops.BILEVEL_KV_GATHER.name, [i.name for i in inputs], [o.name for o in outputs],
        domain=ops.DOMAIN, name="kv_gather_0", rope_theta=float(cfg.rope_theta),
    )
    graph = helper.make_graph([node], "kv_gather", inputs, outputs)
    return _model(graph, [bilevel_kv_gather_function()])


def decode_model(cfg: VideoXLConfig, dtype: int, rng: np.random.Generator) -> onnx.ModelProto:
    hkv, d, h = cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    inputs = [
        helper.make_tensor_value_info("hidden", dtype, ["decode_tokens", h]),
        helper.make_tensor_value_info("cache_key", dtype, ["cache_tokens", hkv, d]),
        helper.make_tensor_value_info("cache_value", dtype, ["cache_tokens", hkv, d]),
    ]
    outputs = [helper.make_tensor_value_info("logits", dtype, ["decode_tokens", cfg.vocab_size])]
    inits = [_weight("lm_head", (h, cfg.vocab_size), dtype, rng), numpy_helper.from_array(np.array([0, 1, 2], np.int64), "all_axes")]
    nodes = [
        helper.make_node("Mul", ["cache_key", "cache_value"], ["kv"]),
        helper.make_node("ReduceMean", ["kv", "all_axes"], ["kv_mean"], keepdims=0),
        helper.make_node("MatMul", ["hidden", "lm_head"], ["raw"]),
        helper.make_node("Add", ["raw", "kv_mean"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "decode", inputs, outputs, inits)
    return _model(graph, [])


def vision_model(cfg: VideoXLConfig, dtype: int, rng: np.random.Generator) -> onnx.ModelProto:
    t, h, per_group = cfg.frames_per_group, cfg.hidden_size, cfg.tokens_per_group
    inputs = [helper.make_tensor_value_info("frames", dtype, ["frames", 3, cfg.image_size, cfg.image_size])]
    outputs = [helper.make_tensor_value_info("embeddings", dtype, ["groups", per_group, h])]
    inits = [
        _weight("proj", (t * 3, per_group * h), dtype, rng),
        numpy_helper.from_array(np.array([2, 3], np.int64), "hw_axes"),
        numpy_helper.from_array(np.array([-1, t * 3], np.int64), "group_shape"),
        numpy_helper.from_array(np.array([-1, per_group, h], np.int64), "out_shape"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["frames", "hw_axes"], ["pooled"], keepdims=0),  # (F, 3)
        helper.make_node("Reshape", ["pooled", "group_shape"], ["grouped"]),  # (G, 12)
        helper.make_node("MatMul", ["grouped", "proj"], ["flat"]),
        helper.make_node("Reshape", ["flat", "out_shape"], ["embeddings"]),
    ]
    graph = helper.make_graph(nodes, "vision", inputs, outputs, inits)
    return _model(graph, [])


def write_artifacts(out_dir: Path, *, precision: str = "fp16", seed: int = 0) -> Path:
    """Write the four graphs, config.json and export_manifest.json into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config()
    dtype = FLOAT_TYPES[precision]
    rng = np.random.default_rng(seed)
    models = {
        "vision.onnx": vision_model(cfg, dtype, rng),
        "prefill_chunk.onnx": prefill_chunk_model(cfg, dtype, rng),
        "decode.onnx": decode_model(cfg, dtype, rng),
        "kv_gather.onnx": kv_gather_model(cfg, dtype),
    }
    for name, model in models.items():
        onnx.save(model, str(out_dir / name))
    cfg.save(out_dir / "config.json")
    manifest = {"dtype": precision, "graphs": sorted(models), "producer": "videoxl test fixture"}
    (out_dir / "export_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir
