"""The two `videoxl` custom ops as ONNX: nodes plus model-local functions (standard-op bodies).

ONNX Runtime (and TensorRT without plugin override) inline the bodies; TensorRT with
ENABLE_PLUGIN_OVERRIDE runs our plugins instead. The contract lives in `videoxl.ops`.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from videoxl.export.onnx_graph import OPSET, GraphBuilder
from videoxl.ops import BILEVEL_KV_GATHER, CHUNK_SPARSE_ATTENTION, DOMAIN, OPSET_VERSION


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
    """positions (n,) int64 -> cos, sin of shape (n, 1, D) in fp32 (Hugging Face Qwen2)."""
    freqs = b.op("Mul", b.op("Unsqueeze", b.op("Cast", positions, to=TensorProto.FLOAT), b.const([1])), inv_freq)
    emb = b.op("Concat", freqs, freqs, axis=-1)
    return b.op("Unsqueeze", b.op("Cos", emb), b.const([1])), b.op("Unsqueeze", b.op("Sin", emb), b.const([1]))


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


def _chunk_sparse_attention_body() -> GraphBuilder:
    """Visual queries attend to a gathered past; timestamp queries to the whole history.

        gathered = [0, prefix_len) ++ past_timestamp_index ++ [window_start, K)
        out      = attention(query, key[gathered], causal on absolute positions)
        out[ts]  = attention(query[ts], key, causal)           (few rows: timestamp tokens)
    """
    b = GraphBuilder("csa_")
    query, key, value, prefix_len, window_start, past_ts, ts_rows = CHUNK_SPARSE_ATTENTION.input_names
    scale = b.attr_const("scale")
    n_q, n_k = b.dim(query, 0), b.dim(key, 0)
    past = b.op("Sub", n_k, n_q)
    gathered = b.op(
        "Concat",
        b.arange(b.const(0), b.scalar(prefix_len)),
        past_ts,
        b.arange(b.scalar(window_start), n_k),
        axis=0,
    )
    query_pos = b.op("Add", b.arange(b.const(0), n_q), past)
    visible = b.op("LessOrEqual", b.op("Unsqueeze", gathered, b.const([0])), b.op("Unsqueeze", query_pos, b.const([1])))
    out_visual = gqa_attention(
        b, query, b.op("Gather", key, gathered, axis=0), b.op("Gather", value, gathered, axis=0), visible, scale
    )
    ts_visible = b.op(
        "LessOrEqual",
        b.op("Unsqueeze", b.arange(b.const(0), n_k), b.const([0])),
        b.op("Unsqueeze", b.op("Add", ts_rows, past), b.const([1])),
    )
    out_ts = gqa_attention(b, b.op("Gather", query, ts_rows, axis=0), key, value, ts_visible, scale)
    b.op("ScatterND", out_visual, b.op("Unsqueeze", ts_rows, b.const([1])), out_ts, outputs=CHUNK_SPARSE_ATTENTION.output_names)
    return b


# --- BilevelKVGather ------------------------------------------------------------------------


def _bilevel_kv_gather_body() -> GraphBuilder:
    """mixed[m] = sum_s w[m, s] * source[index[m, s]]; keys rotated at m = 0..M-1."""
    b = GraphBuilder("bkg_")
    key, value, index, weight = BILEVEL_KV_GATHER.input_names
    mixed_key, mixed_value = BILEVEL_KV_GATHER.output_names
    w = b.op("Unsqueeze", weight, b.const([2, 3]))  # (M, S, 1, 1)

    def pool(source: str) -> str:
        gathered = b.op("Cast", b.op("Gather", source, index, axis=0), to=TensorProto.FLOAT)  # (M, S, H, D)
        return b.op("ReduceSum", b.op("Mul", gathered, w), b.const([1]), keepdims=0)

    pooled_key = pool(key)
    b.op("CastLike", pool(value), value, outputs=[mixed_value])
    inv_freq = rope_inv_freq_from_theta(b, b.attr_const("rope_theta"), b.dim(key, 2))
    cos, sin = rope_tables(b, b.arange(b.const(0), b.dim(index, 0)), inv_freq)
    b.op("CastLike", rope(b, pooled_key, cos, sin), key, outputs=[mixed_key])
    return b


# --- nodes and functions --------------------------------------------------------------------


def chunk_sparse_attention(b: GraphBuilder, *inputs: str, scale: float) -> str:
    return b.op(CHUNK_SPARSE_ATTENTION.name, *inputs, domain=DOMAIN, scale=float(scale))


def bilevel_kv_gather(b: GraphBuilder, *inputs: str, rope_theta: float, outputs: int | list[str] = 2) -> list[str]:
    return b.op(BILEVEL_KV_GATHER.name, *inputs, domain=DOMAIN, outputs=outputs, rope_theta=float(rope_theta))


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
