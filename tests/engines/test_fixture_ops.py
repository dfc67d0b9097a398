"""The function bodies the fixture (and the exporter) writes implement the op contract (ONNX Runtime vs plugins/reference.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from engine_fixtures import OPSET, bilevel_kv_gather_function, chunk_sparse_attention_function
from videoxl import ops
from videoxl.plugins import reference


def _session(contract: ops.OpContract, function: onnx.FunctionProto, types: dict[str, int], **attributes: float):
    node = helper.make_node(contract.name, contract.input_names, contract.output_names, domain=ops.DOMAIN, **attributes)
    inputs = [helper.make_tensor_value_info(n, types[n], None) for n in contract.input_names]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in contract.output_names]
    model = helper.make_model(
        helper.make_graph([node], "op", inputs, outputs),
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(ops.DOMAIN, ops.OPSET_VERSION)],
        functions=[function],
    )
    model.ir_version = 10
    return ort.InferenceSession(model.SerializeToString())


@pytest.mark.parametrize("timestamp_queries", [[1, 4], []], ids=["two_timestamp_queries", "no_timestamp_queries"])
def test_chunk_sparse_attention_body(timestamp_queries: list[int]) -> None:
    rng = np.random.default_rng(0)
    q_len, past, hq, hkv, d = 7, 13, 4, 2, 16  # odd sizes on purpose
    types = {n: TensorProto.FLOAT for n in ("query", "key", "value")}
    types.update(prefix_len=TensorProto.INT64, window_start=TensorProto.INT64, past_timestamp_index=TensorProto.INT64,
                 timestamp_query_index=TensorProto.INT64)
    session = _session(ops.CHUNK_SPARSE_ATTENTION, chunk_sparse_attention_function(), types, scale=d ** -0.5)
    feed = {
        "query": rng.standard_normal((q_len, hq, d)).astype(np.float32),
        "key": rng.standard_normal((past + q_len, hkv, d)).astype(np.float32),
        "value": rng.standard_normal((past + q_len, hkv, d)).astype(np.float32),
        "prefix_len": np.array([3]), "window_start": np.array([9]),
        "past_timestamp_index": np.array([4, 7]),
        "timestamp_query_index": np.array(timestamp_queries, np.int64),  # Tq may be 0
    }
    (got,) = session.run(None, feed)
    want = reference.chunk_sparse_attention(
        feed["query"], feed["key"], feed["value"], 3, 9, feed["past_timestamp_index"], feed["timestamp_query_index"], d ** -0.5
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bilevel_kv_gather_body() -> None:
    rng = np.random.default_rng(1)
    source, mixed, pool, hkv, d = 23, 9, 4, 2, 16
    types = {"key": TensorProto.FLOAT, "value": TensorProto.FLOAT, "gather_index": TensorProto.INT64,
             "gather_weight": TensorProto.FLOAT}
    session = _session(ops.BILEVEL_KV_GATHER, bilevel_kv_gather_function(), types, rope_theta=1e6)
    weight = np.full((mixed, pool), 0.25, np.float32)
    weight[::2] = [1, 0, 0, 0]
    feed = {
        "key": rng.standard_normal((source, hkv, d)).astype(np.float32),
        "value": rng.standard_normal((source, hkv, d)).astype(np.float32),
        "gather_index": rng.integers(0, source, (mixed, pool)),
        "gather_weight": weight,
    }
    got_key, got_value = session.run(None, feed)
    want_key, want_value = reference.bilevel_kv_gather(feed["key"], feed["value"], feed["gather_index"], weight, 1e6)
    np.testing.assert_allclose(got_value, want_value, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_key, want_key, rtol=1e-4, atol=1e-4)
