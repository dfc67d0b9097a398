"""TEST FIXTURE: a tiny stand-in for the exporter's artifact directory.

Writes ``vision.onnx``, ``prefill_chunk.onnx``, ``decode.onnx``, ``kv_gather.onnx``,
``config.json`` and ``export_manifest.json`` for a toy config, so that the engine builder is
tested independently of the real exporter (and of torch). The graphs are not Video-XL-2: only
their interface follows ``videoxl.export.onnx_export`` (input/output names, the dimension names
of ``videoxl.engines.profiles.dimension_ranges``), and the two ``videoxl``-domain custom ops carry
the exporter's own model-local function bodies (``videoxl.export.onnx_ops``, which needs no torch),
so the engine builder sees the same standard-op definitions as on a real export.

    prefill_chunk.onnx, per layer i:
        x --MatMul--> q, present_key.i, present_value.i
        past_key.i ++ present_key.i, past_value.i ++ present_value.i --> key, value
        videoxl::ChunkSparseAttention(q, key, value, prefix_len, window_start,
                                      past_timestamp_index, timestamp_query_index) --MatMul--> x
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
from videoxl.export.onnx_ops import OPSET, custom_opset_imports, function_protos

FLOAT_TYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}


def tiny_config() -> VideoXLConfig:
    return VideoXLConfig(
        vision_hidden_size=32, vision_intermediate_size=64, vision_num_heads=2, vision_num_layers=2,
        vision_select_layer=-1, image_size=28, patch_size=14, compressor_grid=8,
        compressor_groupnorm_groups=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=64, max_frames=64,
    )  # tokens_per_group = (8 // 2) ** 2 = 16, head_dim = 16 (the kernels' smallest)


# --- the two custom ops: the exporter's own model-local functions -----------------------------
def custom_functions() -> dict[str, onnx.FunctionProto]:
    """``{op name: FunctionProto}``: exactly the bodies the exporter writes (``onnx_ops``)."""
    return {f.name: f for f in function_protos()}


def chunk_sparse_attention_function() -> onnx.FunctionProto:
    return custom_functions()[ops.CHUNK_SPARSE_ATTENTION.name]


def bilevel_kv_gather_function() -> onnx.FunctionProto:
    return custom_functions()[ops.BILEVEL_KV_GATHER.name]


# --- the four graphs (interface of videoxl.export.onnx_export; toy bodies) ------------------------
def _model(graph: onnx.GraphProto, functions: list[onnx.FunctionProto]) -> onnx.ModelProto:
    opsets = custom_opset_imports() if functions else [helper.make_opsetid("", OPSET)]
    model = helper.make_model(graph, opset_imports=opsets, functions=functions, producer_name="videoxl-test-fixture")
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def _weight(name: str, shape: tuple[int, ...], dtype: int, rng: np.random.Generator) -> onnx.TensorProto:
    values = (rng.standard_normal(shape) * 0.2).astype(np.float32)
    if dtype == TensorProto.BFLOAT16:
        bits = (values.view(np.uint32) >> 16).astype(np.uint16)  # truncation is fine for a fixture
        return helper.make_tensor(name, TensorProto.BFLOAT16, shape, bits.tobytes(), raw=True)
    return numpy_helper.from_array(values.astype(helper.tensor_dtype_to_np_dtype(dtype)), name)


def _i64(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _kv_io(cfg: VideoXLConfig, dtype: int, past: str, new: str) -> tuple[list, list]:
    kv = [cfg.num_key_value_heads, cfg.head_dim]
    inputs, outputs = [], []
    for i in range(cfg.num_hidden_layers):
        inputs += [helper.make_tensor_value_info(f"past_{t}.{i}", dtype, [past, *kv]) for t in ("key", "value")]
        outputs += [helper.make_tensor_value_info(f"present_{t}.{i}", dtype, [new, *kv]) for t in ("key", "value")]
    return inputs, outputs


def _last_logits(cfg: VideoXLConfig, dtype: int, x: str, rng: np.random.Generator) -> tuple[list, list]:
    nodes = [
        helper.make_node("Slice", [x, "last_start", "last_end", "last_axis"], ["last"]),
        helper.make_node("MatMul", ["last", "lm_head"], ["raw_logits"]),
        helper.make_node("Cast", ["raw_logits"], ["logits"], to=TensorProto.FLOAT),
    ]
    inits = [_i64("last_start", [-1]), _i64("last_end", [2**62]), _i64("last_axis", [0]),
             _weight("lm_head", (cfg.hidden_size, cfg.vocab_size), dtype, rng)]
    return nodes, inits


def prefill_chunk_model(cfg: VideoXLConfig, dtype: int, rng: np.random.Generator) -> onnx.ModelProto:
    """Embeds + summed visual embeds + a position term; per layer q/k/v and ChunkSparseAttention."""
    hq, hkv, d, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    kv_in, kv_out = _kv_io(cfg, dtype, "past_tokens", "chunk_tokens")
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["chunk_tokens"]),
        helper.make_tensor_value_info("visual_embeds", dtype, ["visual_tokens", h]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["chunk_tokens"]),
        helper.make_tensor_value_info("timestamp_query_index", TensorProto.INT64, ["timestamp_queries"]),
        helper.make_tensor_value_info("prefix_len", TensorProto.INT64, [1]),
        helper.make_tensor_value_info("window_start", TensorProto.INT64, [1]),
        helper.make_tensor_value_info("past_timestamp_index", TensorProto.INT64, ["past_timestamps"]),
        *kv_in,
    ]
    inits = [
        _weight("embed", (cfg.vocab_size, h), dtype, rng), _weight("pos_scale", (h,), dtype, rng),
        _i64("q_shape", [0, hq, d]), _i64("kv_shape", [0, hkv, d]), _i64("o_shape", [0, hq * d]), _i64("axis0", [0]),
    ]
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["embeds"], axis=0),
        helper.make_node("ReduceSum", ["visual_embeds", "axis0"], ["visual_sum"], keepdims=1),  # 0 rows -> zeros
        helper.make_node("Cast", ["position_ids"], ["pos_f"], to=dtype),
        helper.make_node("Unsqueeze", ["pos_f", "ax1_pos"], ["pos_col"]),
        helper.make_node("Mul", ["pos_col", "pos_scale"], ["pos_term"]),
        helper.make_node("Add", ["embeds", "visual_sum"], ["x_a"]),
        helper.make_node("Add", ["x_a", "pos_term"], ["x0"]),
    ]
    inits.append(_i64("ax1_pos", [1]))
    x = "x0"
    for i in range(cfg.num_hidden_layers):
        inits += [_weight(f"wq.{i}", (h, hq * d), dtype, rng), _weight(f"wk.{i}", (h, hkv * d), dtype, rng),
                  _weight(f"wv.{i}", (h, hkv * d), dtype, rng), _weight(f"wo.{i}", (hq * d, h), dtype, rng)]
        nodes += [
            helper.make_node("MatMul", [x, f"wq.{i}"], [f"q2.{i}"]),
            helper.make_node("Reshape", [f"q2.{i}", "q_shape"], [f"q.{i}"]),
            helper.make_node("MatMul", [x, f"wk.{i}"], [f"k2.{i}"]),
            helper.make_node("Reshape", [f"k2.{i}", "kv_shape"], [f"present_key.{i}"]),
            helper.make_node("MatMul", [x, f"wv.{i}"], [f"v2.{i}"]),
            helper.make_node("Reshape", [f"v2.{i}", "kv_shape"], [f"present_value.{i}"]),
            helper.make_node("Concat", [f"past_key.{i}", f"present_key.{i}"], [f"key.{i}"], axis=0),
            helper.make_node("Concat", [f"past_value.{i}", f"present_value.{i}"], [f"value.{i}"], axis=0),
            helper.make_node(
                ops.CHUNK_SPARSE_ATTENTION.name,
                [f"q.{i}", f"key.{i}", f"value.{i}", "prefix_len", "window_start", "past_timestamp_index", "timestamp_query_index"],
                [f"attn.{i}"], domain=ops.DOMAIN, name=f"chunk_attention.{i}", scale=float(d) ** -0.5,
            ),
            helper.make_node("Reshape", [f"attn.{i}", "o_shape"], [f"attn2.{i}"]),
            helper.make_node("MatMul", [f"attn2.{i}", f"wo.{i}"], [f"o.{i}"]),
            helper.make_node("Add", [x, f"o.{i}"], [f"x{i + 1}"]),
        ]
        x = f"x{i + 1}"
    tail, tail_inits = _last_logits(cfg, dtype, x, rng)
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, cfg.vocab_size]), *kv_out]
    graph = helper.make_graph(nodes + tail, "prefill_chunk", inputs, outputs, inits + tail_inits)
    return _model(graph, [chunk_sparse_attention_function()])


def decode_model(cfg: VideoXLConfig, dtype: int, rng: np.random.Generator) -> onnx.ModelProto:
    """Standard ops only: token embedding, a cache-dependent term, logits and an attention mass."""
    hkv, d, h = cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    kv_in, kv_out = _kv_io(cfg, dtype, "past_tokens", "new_tokens")
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["new_tokens"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["new_tokens"]),
        *kv_in,
    ]
    inits = [_weight("embed", (cfg.vocab_size, h), dtype, rng), _weight("wk", (h, hkv * d), dtype, rng),
             _i64("kv_shape", [0, hkv, d]), _i64("hd_axes", [1, 2]), _i64("all_axes", [0, 1, 2])]
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["embeds"], axis=0),
        helper.make_node("Cast", ["position_ids"], ["pos_f"], to=dtype),
        helper.make_node("Unsqueeze", ["pos_f", "one_axis"], ["pos_col"]),
        helper.make_node("Add", ["embeds", "pos_col"], ["x"]),
        helper.make_node("MatMul", ["x", "wk"], ["k2"]),
        helper.make_node("Reshape", ["k2", "kv_shape"], ["k"]),
    ]
    inits.append(_i64("one_axis", [1]))
    cache_terms = []
    for i in range(cfg.num_hidden_layers):
        nodes += [
            helper.make_node("Identity", ["k"], [f"present_key.{i}"]),
            helper.make_node("Identity", ["k"], [f"present_value.{i}"]),
            helper.make_node("Mul", [f"past_key.{i}", f"past_value.{i}"], [f"kv.{i}"]),
            helper.make_node("ReduceMean", [f"kv.{i}", "all_axes"], [f"kv_mean.{i}"], keepdims=0),
        ]
        cache_terms.append(f"kv_mean.{i}")
    nodes += [
        helper.make_node("Sum", cache_terms, ["cache_term"]),
        helper.make_node("Add", ["x", "cache_term"], ["x_out"]),
        helper.make_node("Concat", ["past_key.0", "k"], ["all_keys"], axis=0),
        helper.make_node("ReduceSum", ["all_keys", "hd_axes"], ["mass_raw"], keepdims=0),
        helper.make_node("Cast", ["mass_raw"], ["attention_mass"], to=TensorProto.FLOAT),
    ]
    tail, tail_inits = _last_logits(cfg, dtype, "x_out", rng)
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, cfg.vocab_size]),
        helper.make_tensor_value_info("attention_mass", TensorProto.FLOAT, ["all_tokens"]),
        *kv_out,
    ]
    graph = helper.make_graph(nodes + tail, "decode", inputs, outputs, inits + tail_inits)
    return _model(graph, [])


def kv_gather_model(cfg: VideoXLConfig, dtype: int) -> onnx.ModelProto:
    kv = [cfg.num_key_value_heads, cfg.head_dim]
    inputs = [
        helper.make_tensor_value_info("key", dtype, ["source_tokens", *kv]),
        helper.make_tensor_value_info("value", dtype, ["source_tokens", *kv]),
        helper.make_tensor_value_info("gather_index", TensorProto.INT64, ["mixed_tokens", "pool"]),
        helper.make_tensor_value_info("gather_weight", TensorProto.FLOAT, ["mixed_tokens", "pool"]),
    ]
    outputs = [
        helper.make_tensor_value_info("mixed_key", dtype, ["mixed_tokens", *kv]),
        helper.make_tensor_value_info("mixed_value", dtype, ["mixed_tokens", *kv]),
    ]
    node = helper.make_node(
        ops.BILEVEL_KV_GATHER.name, [i.name for i in inputs], [o.name for o in outputs],
        domain=ops.DOMAIN, name="kv_gather", rope_theta=float(cfg.rope_theta),
    )
    graph = helper.make_graph([node], "kv_gather", inputs, outputs)
    return _model(graph, [bilevel_kv_gather_function()])


def vision_model(cfg: VideoXLConfig, dtype: int, rng: np.random.Generator) -> onnx.ModelProto:
    """pixel_values (4*groups, 3, S, S) float32 -> visual_embeds (groups, tokens_per_group, H)."""
    t, h, per_group = cfg.frames_per_group, cfg.hidden_size, cfg.tokens_per_group
    size = cfg.image_size
    inputs = [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [f"{t}*groups", 3, size, size])]
    outputs = [helper.make_tensor_value_info("visual_embeds", dtype, ["groups", per_group, h])]
    inits = [
        _weight("proj", (t * 3, per_group * h), dtype, rng), _i64("hw_axes", [2, 3]),
        _i64("group_shape", [-1, t * 3]), _i64("out_shape", [-1, per_group, h]),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["pixel_values", "hw_axes"], ["pooled"], keepdims=0),  # (F, 3)
        helper.make_node("Cast", ["pooled"], ["pooled_d"], to=dtype),
        helper.make_node("Reshape", ["pooled_d", "group_shape"], ["grouped"]),  # (G, 12)
        helper.make_node("MatMul", ["grouped", "proj"], ["flat"]),
        helper.make_node("Reshape", ["flat", "out_shape"], ["visual_embeds"]),
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
