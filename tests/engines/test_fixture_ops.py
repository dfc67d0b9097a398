"""The function bodies the fixture (and the exporter) writes implement op contract v2 (ONNX Runtime vs plugins/reference.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from engine_fixtures import OPSET, bilevel_kv_gather_function, chunk_sparse_attention_function
from videoxl import ops
from videoxl.plugins import reference

_TYPES = {"float": TensorProto.FLOAT, "float32": TensorProto.FLOAT, "int64": TensorProto.INT64}


def _session(contract: ops.OpContract, function: onnx.FunctionProto, **attributes: float) -> ort.InferenceSession:
    """One node of the op with its model-local function, inputs typed from the op contract (fp32 as the float)."""
    node = helper.make_node(contract.name, contract.input_names, contract.output_names, domain=ops.DOMAIN, **attributes)
    inputs = [helper.make_tensor_value_info(t.name, _TYPES[t.dtype], None) for t in contract.inputs]
    outputs = [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, None) for t in contract.outputs]
    model = helper.make_model(
        helper.make_graph([node], "op", inputs, outputs),
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(ops.DOMAIN, ops.OPSET_VERSION)],
        functions=[function],
    )
    model.ir_version = 10
    return ort.InferenceSession(model.SerializeToString())


@pytest.mark.parametrize(
    ("past_len", "timestamp_queries"),
    [(11, [1, 4]), (11, []), (0, [2])],
    ids=["two_timestamp_queries", "streaming_rule_no_timestamp_queries", "prefix_chunk_no_past"],
)
def test_chunk_sparse_attention_body(past_len: int, timestamp_queries: list[int]) -> None:
    rng = np.random.default_rng(0)
    q_len, capacity, hq, hkv, d = 7, 13, 4, 2, 16  # odd sizes on purpose; rows >= past_len are unused
    session = _session(ops.CHUNK_SPARSE_ATTENTION, chunk_sparse_attention_function(), scale=d**-0.5)
    past_key = rng.standard_normal((capacity, hkv, d)).astype(np.float32)
    past_value = rng.standard_normal((capacity, hkv, d)).astype(np.float32)
    past_key[past_len:] = past_value[past_len:] = 1e4  # garbage beyond the valid rows: must never be read
    feed = {
        "query": rng.standard_normal((q_len, hq, d)).astype(np.float32),
        "key": rng.standard_normal((q_len, hkv, d)).astype(np.float32),
        "value": rng.standard_normal((q_len, hkv, d)).astype(np.float32),
        "past_key": past_key,
        "past_value": past_value,
        "past_len": np.array([past_len], np.int64),
        "visible_past_index": np.array([i for i in (0, 2, 3, 6, 9, 10) if i < past_len], np.int64),
        "timestamp_query_index": np.array(timestamp_queries, np.int64),  # Tq may be 0
    }
    (got,) = session.run(None, feed)
    want = reference.chunk_sparse_attention(*feed.values(), d**-0.5)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bilevel_kv_gather_body() -> None:
    rng = np.random.default_rng(1)
    source, gathered, pool, hkv, d = 23, 9, 4, 2, 16
    session = _session(ops.BILEVEL_KV_GATHER, bilevel_kv_gather_function(), rope_theta=1e6)
    weight = np.full((gathered, pool), 0.25, np.float32)
    weight[::2] = [1, 0, 0, 0]
    feed = {
        "key": rng.standard_normal((source, hkv, d)).astype(np.float32),
        "value": rng.standard_normal((source, hkv, d)).astype(np.float32),
        "gather_index": rng.integers(0, source, (gathered, pool)),
        "gather_weight": weight,
        # [sparse rows kept before RoPE | dense rows rotated at their positions], re-rotated at 0..M-1
        "source_position": np.concatenate([np.zeros(8, np.int64), np.arange(100, 100 + source - 8)]),
        "target_position": np.arange(gathered, dtype=np.int64),
    }
    got_key, got_value = session.run(None, feed)
    want_key, want_value = reference.bilevel_kv_gather(*feed.values(), 1e6)
    np.testing.assert_allclose(got_value, want_value, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_key, want_key, rtol=1e-4, atol=1e-4)
