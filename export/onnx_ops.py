"""The two `videoxl` custom ops as ONNX: nodes plus model-local functions (standard-op bodies).

ONNX Runtime (and TensorRT without plugin override) inline the bodies; TensorRT with
ENABLE_PLUGIN_OVERRIDE runs our plugins instead. The contract lives in `videoxl.ops`.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from videoxl.export.onnx_graph import OPSET, GraphBuilder
from videoxl.ops import BILEVEL_KV_GATHER, CHUNK_SPARSE_ATTENTION, DOMAIN, OPSET_VERSION, PLUGIN_VERSION


# --- shared pieces (used by the function bodies and by the LLM graphs) ----------------------


def gqa_probs(b: GraphBuilder, query: str, key: str, visible: str, scale: str) -> str:
    """query (n, Hq, D), key (m, Hkv, D), visible (n, m) bool -> probs (Hkv, G, n, m) in fp32.

        q (n,Hq,D) -> (n,Hkv,G,D) -> (Hkv,G,n,D) @ k (Hkv,1,D,m) -> scores (Hkv,G,n,m)
    """
    q_shape, k_shape = b.op("Shape", query), b.op("Shape", key)
    n = b.op("Slice", q_shape, b.const([0]), b.const([1]))
    hq = b.op("Slice", q_shape, b.const([1]), b.const([2]))
    d = b.op("Slice", q_shape, b.const([2]), b.const([3]))
    hkv = b.op("Slice", k_shape, b.const([1]), b.const([2]))
    grouped = b.op("Concat", n, hkv, b.op("Div", hq, hkv), d, axis=0)
    qf = b.op("Cast", query, to=TensorProto.FLOAT)
    kf = b.op("Cast", key, to=TensorProto.FLOAT)
    q4 = b.op("Transpose", b.op("Reshape", qf, grouped), perm=[1, 2, 0, 3])
    k4 = b.op("Unsqueeze", b.op("Transpose", kf, perm=[1, 2, 0]), b.const([1]))
    scores = b.op("Mul", b.op("MatMul", q4, k4), scale)
    return b.op("Softmax", b.op("Where", visible, scores, b.const(-np.inf, np.float32)), axis=-1)


def attention_mass_body(b: GraphBuilder, layers: int, scale: float) -> None:
    """The score graph (``videoxl.graphs.SCORE``): per layer the question's probabilities over
    [past_key.i ++ key.i] (query t sees rows < past_len and its own keys 0..t), summed over heads
    and queries, sliced to the past rows and added over layers into ``attention_mass``."""
    scale = b.const(scale, np.float32)
    past_pos = b.arange(b.const(0), b.dim("past_key.0", 0))
    query_pos = b.op("Add", b.arange(b.const(0), b.dim("query.0", 0)), b.scalar("past_len"))
    key_pos = b.op("Concat", past_pos, query_pos, axis=0)
    causal = b.op("LessOrEqual", b.op("Unsqueeze", key_pos, b.const([0])), b.op("Unsqueeze", query_pos, b.const([1])))
    own = b.op("Expand", b.const([True], np.bool_), b.op("Shape", query_pos))
    valid = b.op("Concat", b.op("Less", past_pos, "past_len"), own, axis=0)
    visible = b.op("And", causal, b.op("Unsqueeze", valid, b.const([0])))
    num_past = b.op("Shape", "past_key.0", start=0, end=1)
    total = None
    for i in range(layers):
        query = f"query.{i}"
        if total is not None:
            # The layers are independent: without an order TensorRT keeps most layers' fp32
            # probabilities live at once (16.4 GB at --max-frames 1024 against 0.79 GB for one
            # layer; bench/RESULTS.md, "Real size"). query + 0 x (running mass)[0] orders layer i
            # after layer i-1, exactly (the mass is finite), so one layer's working set is reused.
            after = b.op("Mul", b.op("Slice", total, b.const([0]), b.const([1])), b.const(0.0, np.float32))
            query = b.op("Add", query, b.op("CastLike", after, query))
        probs = gqa_probs(b, query, b.op("Concat", f"past_key.{i}", f"key.{i}", axis=0), visible, scale)  # (Hkv, G, T, P + T)
        mass = b.op("Slice", b.op("ReduceSum", probs, b.const([0, 1, 2]), keepdims=0), b.const([0]), num_past)
        out = ["attention_mass"] if i + 1 == layers else 1
        total = b.op("Identity", mass, outputs=out) if total is None else b.op("Add", total, mass, outputs=out)


def gqa_attention(b: GraphBuilder, query: str, key: str, value: str, visible: str, scale: str, probs: str | None = None) -> str:
    """query (n, Hq, D), key/value (m, Hkv, D), visible (n, m) bool -> (n, Hq, D).

        probs (Hkv,G,n,m) @ v (Hkv,1,m,D) -> (Hkv,G,n,D) -> (n,Hkv,G,D) -> (n,Hq,D)
    """
    probs = probs or gqa_probs(b, query, key, visible, scale)
    vf = b.op("Cast", value, to=TensorProto.FLOAT)
    v4 = b.op("Unsqueeze", b.op("Transpose", vf, perm=[1, 0, 2]), b.const([1]))
    out = b.op("Transpose", b.op("MatMul", probs, v4), perm=[2, 0, 1, 3])
    return b.op("CastLike", b.op("Reshape", out, b.op("Shape", query)), query)


def rope_tables(b: GraphBuilder, positions: str, inv_freq: str) -> tuple[str, str]:
    """positions (...) int64 -> cos, sin of shape (..., 1, D) in fp32 (Hugging Face Qwen2)."""
    freqs = b.op("Mul", b.op("Unsqueeze", b.op("Cast", positions, to=TensorProto.FLOAT), b.const([-1])), inv_freq)
    emb = b.op("Concat", freqs, freqs, axis=-1)
    return b.op("Unsqueeze", b.op("Cos", emb), b.const([-2])), b.op("Unsqueeze", b.op("Sin", emb), b.const([-2]))


def rope(b: GraphBuilder, x: str, cos: str, sin: str) -> str:
    """Rotate-half RoPE of x (n, H, D) in fp32, cast back to x's dtype."""
    xf = b.op("Cast", x, to=TensorProto.FLOAT)
    first, second = b.op("Split", xf, axis=-1, num_outputs=2, outputs=2)
    rotated = b.op("Concat", b.op("Neg", second), first, axis=-1)
    return b.op("CastLike", b.op("Add", b.op("Mul", xf, cos), b.op("Mul", rotated, sin)), x)


def rope_inv_freq_from_theta(b: GraphBuilder, theta: str, head_dim: str) -> str:
    """1 / theta ** (arange(0, D, 2) / D) in fp32, like `rope_inv_freq` in the PyTorch model."""
    steps = b.op("Cast", b.op("Range", b.const(0), head_dim, b.const(2)), to=TensorProto.FLOAT)
    exponent = b.op("Div", steps, b.op("Cast", head_dim, to=TensorProto.FLOAT))
    return b.op("Reciprocal", b.op("Pow", theta, exponent))


# --- ChunkSparseAttention -------------------------------------------------------------------


def attention(b: GraphBuilder, query: str, key: str, value: str, visible: str, scale: float | None = None) -> str:
    """Standard ONNX `Attention` (opset 23) on token-major tensors: GQA, a bool mask, no copies of its own.

        query (n, Hq, D), key/value (m, Hkv, D), visible (n, m) bool -> (n, Hq, D)
        4-D form (1, heads, tokens, D): the head counts come from the shapes, so one body serves
        every model; TensorRT maps the op to its fused attention layer.
    Inside a function body `scale=None` refers to the function's own `scale` attribute.
    """
    q4, k4, v4 = (b.op("Unsqueeze", b.op("Transpose", t, perm=[1, 0, 2]), b.const([0])) for t in (query, key, value))
    name = b.name("attention")
    node = helper.make_node("Attention", [q4, k4, v4, visible], [name])
    if scale is None:
        ref = onnx.AttributeProto(name="scale", ref_attr_name="scale", type=onnx.AttributeProto.FLOAT)
        node.attribute.append(ref)
    else:
        node.attribute.append(helper.make_attribute("scale", float(scale)))
    b.nodes.append(node)
    return b.op("Transpose", b.op("Squeeze", name, b.const([0])), perm=[1, 0, 2])


def _chunk_visible(b: GraphBuilder, past_rows: str, query_pos: str, num_chunk: str) -> str:
    """(n, R + Q) bool: every one of R gathered past rows, then chunk key j iff j <= query_pos.

    A key's chunk-relative index, with -1 for the gathered past, compared with the query's.
    """
    relative = b.op("Concat", b.op("Expand", b.const([-1]), b.op("Unsqueeze", past_rows, b.const([0]))), b.arange(b.const(0), num_chunk), axis=0)
    return b.op("LessOrEqual", b.op("Unsqueeze", relative, b.const([0])), b.op("Unsqueeze", query_pos, b.const([1])))


def _chunk_sparse_attention_body() -> GraphBuilder:
    """Every query reads the past through visible_past_index; timestamp queries read all of it.

        keys      = past_key[visible_past_index] ++ key              (the chunk's keys causally)
        out       = Attention(query, keys, mask)
        ts_rows   = [0, past_len) if there are timestamp queries else []   (nothing read otherwise)
        out[ts]   = Attention(query[ts], past_key[ts_rows] ++ key, mask)
    The past is never rotated, concatenated or copied whole: only gathered rows move.
    """
    b = GraphBuilder("csa_")
    query, key, value, past_key, past_value, past_len, visible_index, ts_queries = CHUNK_SPARSE_ATTENTION.input_names
    n_q = b.dim(query, 0)
    chunk_pos = b.arange(b.const(0), n_q)

    def attend(queries: str, rows: str, query_pos: str, standard: bool) -> str:
        keys = b.op("Concat", b.op("Gather", past_key, rows, axis=0), key, axis=0)
        values = b.op("Concat", b.op("Gather", past_value, rows, axis=0), value, axis=0)
        visible = _chunk_visible(b, b.dim(rows, 0), query_pos, n_q)
        if standard:
            return attention(b, queries, keys, values, visible)
        # timestamp queries may be none at all (streaming rule), which Attention refuses: plain ops
        return gqa_attention(b, queries, keys, values, visible, b.attr_const("scale"))

    out = attend(query, visible_index, chunk_pos, standard=True)
    any_ts = b.op("Min", b.dim(ts_queries, 0), b.const(1))
    ts_rows = b.arange(b.const(0), b.op("Mul", b.scalar(past_len), any_ts))
    out_ts = attend(b.op("Gather", query, ts_queries, axis=0), ts_rows, ts_queries, standard=False)
    b.op("ScatterND", out, b.op("Unsqueeze", ts_queries, b.const([1])), out_ts, outputs=CHUNK_SPARSE_ATTENTION.output_names)
    return b


# --- BilevelKVGather ------------------------------------------------------------------------


def _bilevel_kv_gather_body() -> GraphBuilder:
    """Un-rotate each source key at its position, pool with the weights, rotate at the target.

        k[m] = rope(sum_s w[m, s] * rope(key[i], -source_position[i]), target_position[m]),  i = index[m, s]
    """
    b = GraphBuilder("bkg_")
    key, value, index, weight, source_position, target_position = BILEVEL_KV_GATHER.input_names
    mixed_key, mixed_value = BILEVEL_KV_GATHER.output_names
    w = b.op("Unsqueeze", weight, b.const([2, 3]))  # (M, S, 1, 1)

    def pool(rows: str) -> str:
        return b.op("ReduceSum", b.op("Mul", rows, w), b.const([1]), keepdims=0)

    def gathered(source: str) -> str:
        return b.op("Cast", b.op("Gather", source, index, axis=0), to=TensorProto.FLOAT)  # (M, S, H, D)

    b.op("CastLike", pool(gathered(value)), value, outputs=[mixed_value])
    inv_freq = rope_inv_freq_from_theta(b, b.attr_const("rope_theta"), b.dim(key, 2))
    src_cos, src_sin = rope_tables(b, b.op("Gather", source_position, index, axis=0), inv_freq)  # (M, S, 1, D)
    unrotated = rope(b, gathered(key), src_cos, b.op("Neg", src_sin))  # a rotation by -p
    cos, sin = rope_tables(b, target_position, inv_freq)
    b.op("CastLike", rope(b, pool(unrotated), cos, sin), key, outputs=[mixed_key])
    return b


# --- nodes and functions --------------------------------------------------------------------


# plugin_version: TensorRT's parser looks the plugin up by name and this version ("1" when absent)
def chunk_sparse_attention(b: GraphBuilder, *inputs: str, scale: float) -> str:
    return b.op(CHUNK_SPARSE_ATTENTION.name, *inputs, domain=DOMAIN, scale=float(scale), plugin_version=PLUGIN_VERSION)


def bilevel_kv_gather(b: GraphBuilder, *inputs: str, rope_theta: float, outputs: int | list[str] = 2) -> list[str]:
    return b.op(BILEVEL_KV_GATHER.name, *inputs, domain=DOMAIN, outputs=outputs, rope_theta=float(rope_theta), plugin_version=PLUGIN_VERSION)


def function_protos() -> list[onnx.FunctionProto]:
    protos = []
    for contract, body, attributes in (
        (CHUNK_SPARSE_ATTENTION, _chunk_sparse_attention_body(), ["scale"]),
        (BILEVEL_KV_GATHER, _bilevel_kv_gather_body(), ["rope_theta"]),
    ):
        protos.append(
            helper.make_function(
                DOMAIN,
                contract.name,
                contract.input_names,
                contract.output_names,
                body.nodes,
                opset_imports=[helper.make_opsetid("", OPSET)],
                attributes=attributes,
                doc_string=contract.doc,
            )
        )
    return protos


def custom_opset_imports() -> list[onnx.OperatorSetIdProto]:
    return [helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, OPSET_VERSION)]
