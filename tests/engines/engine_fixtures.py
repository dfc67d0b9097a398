"""TEST FIXTURE: a tiny stand-in for the exporter's artifact directory (graph contract v3).

Writes ``vision.onnx``, ``prefill_chunk.onnx``, ``decode.onnx``, ``score.onnx``,
``kv_gather.onnx``, ``config.json`` and ``export_manifest.json`` for a toy config, so that the
engine builder is tested independently of the real exporter (and of torch). The graphs are not
Video-XL-2: their inputs and outputs are written from the graph contract (``videoxl.graphs``),
the two ``videoxl``-domain custom ops carry the exporter's own model-local function bodies
(``videoxl.export.onnx_ops``, which needs no torch) and a ``plugin_version`` attribute (the ONNX
parser looks a plugin up by it, "1" when absent; the v2 plugins are version 2), and the plugin-free attention is the
exporter's standard ONNX ``Attention``, so the builder sees what a real export gives it.

    prefill_chunk.onnx, per layer i (positions past_len + j):
        x --MatMul--> query.i, present_key.i, present_value.i
        videoxl::ChunkSparseAttention(q, present_key.i, present_value.i, past_key.i, past_value.i,
                                      past_len, visible_past_index, timestamp_query_index) --MatMul--> x
    decode.onnx, per layer i:   Attention(q, past_key.i ++ k, past_value.i ++ v, rows < past_len, causal)
    score.onnx:                 the exporter's own weightless body (onnx_ops.attention_mass_body)
    kv_gather.onnx:             videoxl::BilevelKVGather(key, value, gather_index, gather_weight,
                                                         source_position, target_position)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from videoxl import graphs, ops
from videoxl.config import VideoXLConfig
from videoxl.export.onnx_graph import GraphBuilder
from videoxl.embedding import EMBEDDING_TABLE
from videoxl.export.onnx_ops import OPSET, attention, attention_mass_body, custom_opset_imports, function_protos

FLOAT_TYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
_FIXED_TYPES = {"int64": TensorProto.INT64, "float32": TensorProto.FLOAT}
VISION_PAD = 63  # the toy vocabulary's last id stands for <|vision_pad|>


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


# --- graph I/O straight from the contract -------------------------------------------------------
def contract_io(contract: graphs.GraphContract, cfg: VideoXLConfig, dtype: int) -> tuple[list, list]:
    """value_infos of a graph's inputs and outputs as the contract defines them (names, dims, dtypes)."""

    def infos(specs) -> list:
        elem = lambda spec: dtype if spec.dtype == "float" else _FIXED_TYPES[spec.dtype]  # noqa: E731
        return [
            helper.make_tensor_value_info(name, elem(spec), spec.shape(cfg))
            for spec in specs
            for name in spec.names(cfg.num_hidden_layers)
        ]

    return infos(contract.inputs), infos(contract.outputs)


def _model(graph: onnx.GraphProto, functions: list[onnx.FunctionProto]) -> onnx.ModelProto:
    opsets = custom_opset_imports() if functions else [helper.make_opsetid("", OPSET)]
    model = helper.make_model(graph, opset_imports=opsets, functions=functions, producer_name="videoxl-test-fixture")
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def _weight(b: GraphBuilder, name: str, shape: tuple[int, ...], dtype: int, rng: np.random.Generator) -> str:
    values = (rng.standard_normal(shape) * 0.2).astype(np.float32)
    if dtype == TensorProto.BFLOAT16:
        return b.initializer(name, values, TensorProto.BFLOAT16)
    return b.initializer(name, values.astype(helper.tensor_dtype_to_np_dtype(dtype)))


def _contract_model(b: GraphBuilder, contract: graphs.GraphContract, cfg: VideoXLConfig, dtype: int, functions) -> onnx.ModelProto:
    inputs, outputs = contract_io(contract, cfg, dtype)
    graph = helper.make_graph(b.nodes, contract.name, inputs, outputs, initializer=b.initializers)
    return _model(graph, functions)


def _toy_llm(b: GraphBuilder, cfg: VideoXLConfig, dtype: int, rng: np.random.Generator, x: str, attend) -> str:
    """Per layer: q/k/v projections, attend(layer, q, k, v) -> (n, Hq, D), output projection, residual."""
    hq, hkv, d, h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    for i in range(cfg.num_hidden_layers):
        q = b.op("Reshape", b.op("MatMul", x, _weight(b, f"wq.{i}", (h, hq * d), dtype, rng)), b.const([0, hq, d]))
        k = b.op("Reshape", b.op("MatMul", x, _weight(b, f"wk.{i}", (h, hkv * d), dtype, rng)), b.const([0, hkv, d]))
        v = b.op("Reshape", b.op("MatMul", x, _weight(b, f"wv.{i}", (h, hkv * d), dtype, rng)), b.const([0, hkv, d]))
        out = b.op("Reshape", attend(i, q, k, v), b.const([0, hq * d]))
        x = b.op("Add", x, b.op("MatMul", out, _weight(b, f"wo.{i}", (hq * d, h), dtype, rng)))
    return x


def _embed(b: GraphBuilder, cfg: VideoXLConfig, dtype: int, rng: np.random.Generator) -> tuple[str, str]:
    """Token embeddings plus a position term (positions past_len + j); returns (x, positions)."""
    positions = b.op("Add", b.arange(b.const(0), b.dim("input_ids", 0)), b.scalar("past_len"))
    embeds = b.op("Gather", _weight(b, EMBEDDING_TABLE, (cfg.vocab_size, cfg.hidden_size), dtype, rng), "input_ids", axis=0)
    pos = b.op("Unsqueeze", b.op("Cast", positions, to=dtype), b.const([1]))
    return b.op("Add", embeds, b.op("Mul", pos, _weight(b, "pos_scale", (cfg.hidden_size,), dtype, rng))), positions


def _last_logits(b: GraphBuilder, cfg: VideoXLConfig, dtype: int, x: str, rng: np.random.Generator) -> None:
    last = b.op("Slice", x, b.const([-1]), b.const([2**62]), b.const([0]))
    logits = b.op("MatMul", last, _weight(b, "lm_head", (cfg.hidden_size, cfg.vocab_size), dtype, rng))
    b.op("Cast", logits, to=TensorProto.FLOAT, outputs=["logits"])


def _present(b: GraphBuilder, layer: int, k: str, v: str) -> None:
    present_key, present_value = graphs.kv_names("present", layer)
    b.op("Identity", k, outputs=[present_key])
    b.op("Identity", v, outputs=[present_value])


def _cache_visible(b: GraphBuilder, positions: str) -> str:
    """(T, P + T) bool over [past buffer ++ new keys]: past rows < past_len, new keys causally."""
    past_pos = b.arange(b.const(0), b.dim(graphs.kv_names("past", 0)[0], 0))
    key_pos = b.op("Concat", past_pos, positions, axis=0)
    causal = b.op("LessOrEqual", b.op("Unsqueeze", key_pos, b.const([0])), b.op("Unsqueeze", positions, b.const([1])))
    valid = b.op("Concat", b.op("Less", past_pos, "past_len"), b.op("Expand", b.const([True], np.bool_), b.op("Shape", positions)), axis=0)
    return b.op("And", causal, b.op("Unsqueeze", valid, b.const([0])))


# --- the LLM graphs (contract v3 interface; toy bodies) -----------------------------------------
def prefill_chunk_model(cfg: VideoXLConfig, dtype: int, rng: np.random.Generator) -> onnx.ModelProto:
    """Embeds + summed visual embeds + a position term; per layer q/k/v and ChunkSparseAttention."""
    b = GraphBuilder()
    x, _ = _embed(b, cfg, dtype, rng)
    x = b.op("Add", x, b.op("ReduceSum", "visual_embeds", b.const([0]), keepdims=1))  # 0 visual rows -> zeros

    def attend(i: int, q: str, k: str, v: str) -> str:
        _present(b, i, k, v)
        b.op("Identity", q, outputs=[f"query.{i}"])
        return b.op(
            ops.CHUNK_SPARSE_ATTENTION.name, q, k, v, *graphs.kv_names("past", i), "past_len", "visible_past_index",
            "timestamp_query_index", domain=ops.DOMAIN, name=f"chunk_attention.{i}", scale=float(cfg.head_dim) ** -0.5,
            plugin_version=ops.PLUGIN_VERSION,
        )

    _last_logits(b, cfg, dtype, _toy_llm(b, cfg, dtype, rng, x, attend), rng)
    return _contract_model(b, graphs.PREFILL_CHUNK, cfg, dtype, [chunk_sparse_attention_function()])


def decode_model(cfg: VideoXLConfig, dtype: int, rng: np.random.Generator) -> onnx.ModelProto:
    """Standard ops only: new tokens against the capacity buffer through the standard Attention op."""
    b = GraphBuilder()
    x, positions = _embed(b, cfg, dtype, rng)
    visible = _cache_visible(b, positions)

    def attend(i: int, q: str, k: str, v: str) -> str:
        _present(b, i, k, v)
        past_key, past_value = graphs.kv_names("past", i)
        keys, values = b.op("Concat", past_key, k, axis=0), b.op("Concat", past_value, v, axis=0)
        return attention(b, q, keys, values, visible, scale=cfg.head_dim**-0.5)

    _last_logits(b, cfg, dtype, _toy_llm(b, cfg, dtype, rng, x, attend), rng)
    return _contract_model(b, graphs.DECODE, cfg, dtype, [])


def score_model(cfg: VideoXLConfig, dtype: int) -> onnx.ModelProto:
    """No weights: the question's queries and keys -> attention mass per past row, the exporter's body."""
    b = GraphBuilder()
    attention_mass_body(b, cfg.num_hidden_layers, cfg.head_dim**-0.5)
    return _contract_model(b, graphs.SCORE, cfg, dtype, [])


def kv_gather_model(cfg: VideoXLConfig, dtype: int) -> onnx.ModelProto:
    b = GraphBuilder()
    b.op(
        ops.BILEVEL_KV_GATHER.name, *graphs.KV_GATHER.input_names(1), outputs=graphs.KV_GATHER.output_names(1),
        domain=ops.DOMAIN, name="kv_gather", rope_theta=float(cfg.rope_theta), plugin_version=ops.PLUGIN_VERSION,
    )
    return _contract_model(b, graphs.KV_GATHER, cfg, dtype, [bilevel_kv_gather_function()])


def vision_model(cfg: VideoXLConfig, dtype: int, rng: np.random.Generator) -> onnx.ModelProto:
    """pixel_values (4*groups, 3, S, S) float32 -> visual_embeds (groups, tokens_per_group, H).

    The frame axis is named ``4*groups``, as torch.export writes it for the real vision graph.
    """
    t, h, per_group, size = cfg.frames_per_group, cfg.hidden_size, cfg.tokens_per_group, cfg.image_size
    b = GraphBuilder()
    pooled = b.op("Cast", b.op("ReduceMean", "pixel_values", b.const([2, 3]), keepdims=0), to=dtype)  # (F, 3)
    grouped = b.op("Reshape", pooled, b.const([-1, t * 3]))  # (G, 12)
    flat = b.op("MatMul", grouped, _weight(b, "proj", (t * 3, per_group * h), dtype, rng))
    b.op("Reshape", flat, b.const([-1, per_group, h]), outputs=["visual_embeds"])
    inputs = [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [f"{t}*groups", 3, size, size])]
    outputs = [helper.make_tensor_value_info("visual_embeds", dtype, ["groups", per_group, h])]
    return _model(helper.make_graph(b.nodes, "vision", inputs, outputs, initializer=b.initializers), [])


def write_artifacts(out_dir: Path, *, precision: str = "fp16", seed: int = 0) -> Path:
    """Write the five graphs, config.json and export_manifest.json (with the graph contract) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config()
    dtype = FLOAT_TYPES[precision]
    rng = np.random.default_rng(seed)
    models = {
        "vision": vision_model(cfg, dtype, rng),
        "prefill_chunk": prefill_chunk_model(cfg, dtype, rng),
        "decode": decode_model(cfg, dtype, rng),
        "score": score_model(cfg, dtype),
        "kv_gather": kv_gather_model(cfg, dtype),
    }
    assert sorted(models) == sorted(graphs.GRAPHS), "the fixture writes every graph of the contract"
    for name, model in models.items():
        onnx.save(model, str(out_dir / graphs.GRAPHS[name].file))
    cfg.save(out_dir / "config.json")
    manifest = {
        "dtype": precision, "graphs": sorted(models), "producer": "videoxl test fixture",
        "graph_contract": graphs.manifest_entry(cfg),
        "special_tokens": {"vision_pad": VISION_PAD},  # its embedding row goes beside the engines
    }
    (out_dir / "export_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out_dir
