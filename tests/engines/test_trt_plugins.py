"""The IPluginV3 plugins at build time: registration, attributes, formats, shapes, and the parser's use of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from videoxl.ops import BILEVEL_KV_GATHER, CHUNK_SPARSE_ATTENTION, PLUGIN_NAMESPACE, PLUGIN_VERSION
from videoxl.plugins import trt_plugins


@pytest.fixture
def registered(trt):
    trt_plugins.register_plugins(trt)
    yield trt
    trt_plugins.unregister_plugins(trt)


def _fields(trt, **values: float):
    return trt.PluginFieldCollection(
        [trt.PluginField(k, np.array([v], np.float32), trt.PluginFieldType.FLOAT32) for k, v in values.items()]
    )


def _creator(trt, op: str, namespace: str = PLUGIN_NAMESPACE):
    return trt.get_plugin_registry().get_creator(op, PLUGIN_VERSION, namespace)


def _desc(trt, dtype, dims, fmt=None):
    desc = trt.DynamicPluginTensorDesc()
    desc.desc.type, desc.desc.dims = dtype, trt.Dims(list(dims))
    desc.desc.format = fmt if fmt is not None else trt.TensorFormat.LINEAR
    return desc


def test_registration_is_idempotent_and_reversible(trt) -> None:
    first = trt_plugins.register_plugins(trt)
    assert trt_plugins.register_plugins(trt) is first
    for op in (CHUNK_SPARSE_ATTENTION.name, BILEVEL_KV_GATHER.name):
        for namespace in trt_plugins.REGISTERED_NAMESPACES:
            creator = _creator(trt, op, namespace)
            assert creator is not None and creator.plugin_version == PLUGIN_VERSION
    names = {f.name for f in _creator(trt, CHUNK_SPARSE_ATTENTION.name).field_names}
    assert names == {"scale"}
    trt_plugins.unregister_plugins(trt)
    assert _creator(trt, CHUNK_SPARSE_ATTENTION.name) is None
    assert not trt_plugins.plugins_registered(trt)


def test_attributes_survive_serialization(registered) -> None:
    trt = registered
    creator = _creator(trt, BILEVEL_KV_GATHER.name)
    plugin = creator.create_plugin("gather", _fields(trt, rope_theta=1e6), trt.TensorRTPhase.BUILD)
    assert plugin.attributes == {"rope_theta": 1e6}
    assert (plugin.plugin_name, plugin.plugin_namespace, plugin.plugin_version) == (
        BILEVEL_KV_GATHER.name, PLUGIN_NAMESPACE, PLUGIN_VERSION,
    )
    # What an engine stores is what the runtime-phase creator gets back.
    restored = creator.create_plugin("gather", plugin.get_fields_to_serialize(), trt.TensorRTPhase.RUNTIME)
    assert restored.attributes == plugin.attributes
    clone = plugin.attach_to_context(None)
    assert clone is not plugin and clone.attributes == plugin.attributes
    assert plugin.timing_cache_id == clone.timing_cache_id


def test_missing_attribute_is_an_error(registered) -> None:
    trt = registered
    with pytest.raises(ValueError, match="attribute 'scale' missing"):
        _creator(trt, CHUNK_SPARSE_ATTENTION.name).create_plugin("attn", _fields(trt), trt.TensorRTPhase.BUILD)


def _attention_io(trt, dtype, *, q=5, past=9):
    """query, key, value, past_key, past_value, past_len, visible_past_index, timestamp_query_index, output."""
    i64 = trt.DataType.INT64
    return [_desc(trt, dtype, (q, 4, 16)), _desc(trt, dtype, (q, 2, 16)), _desc(trt, dtype, (q, 2, 16)),
            _desc(trt, dtype, (past, 2, 16)), _desc(trt, dtype, (past, 2, 16)),
            _desc(trt, i64, (1,)), _desc(trt, i64, (6,)), _desc(trt, i64, (2,)), _desc(trt, dtype, (q, 4, 16))]


def test_formats_and_dtypes(registered, monkeypatch: pytest.MonkeyPatch) -> None:
    from videoxl.plugins import kernels

    trt = registered
    plugin = _creator(trt, CHUNK_SPARSE_ATTENTION.name).create_plugin("attn", _fields(trt, scale=0.25), trt.TensorRTPhase.BUILD)
    half, f32, i64, i32, b = trt.DataType.HALF, trt.DataType.FLOAT, trt.DataType.INT64, trt.DataType.INT32, trt.DataType.BOOL
    io = _attention_io(trt, half)
    assert [spec.name for spec in CHUNK_SPARSE_ATTENTION.inputs][5:] == ["past_len", "visible_past_index", "timestamp_query_index"]
    assert all(plugin.supports_format_combination(pos, io, 8) for pos in range(9))
    io[3] = _desc(trt, f32, (9, 2, 16))  # one float dtype across the op, the past included
    assert not plugin.supports_format_combination(3, io, 8)
    io[5] = _desc(trt, i32, (1,))  # past_len is int64 by contract
    assert not plugin.supports_format_combination(5, io, 8)
    io[6] = _desc(trt, i32, (6,))  # indices are int64 by contract
    assert not plugin.supports_format_combination(6, io, 8)
    for dtype in (b, i32):  # timestamp queries are an int64 index list, not a mask
        io[7] = _desc(trt, dtype, (5,) if dtype == b else (2,))
        assert not plugin.supports_format_combination(7, io, 8)
    io[0] = _desc(trt, half, (5, 4, 16), trt.TensorFormat.HWC8)
    assert not plugin.supports_format_combination(0, io, 8)
    for dtype in (f32, half, trt.DataType.BF16):
        assert plugin.get_output_data_types([dtype] * 5 + [i64] * 3) == [dtype]
    # the workspace is the launcher's answer for the profile's largest shapes
    asked = []
    monkeypatch.setattr(kernels, "chunk_attention_workspace_bytes", lambda **kw: asked.append(kw) or 4096)
    inputs = _attention_io(trt, trt.DataType.BF16)[:8]
    for d, most in zip(inputs, [(611, 28, 128), (611, 4, 128), (611, 4, 128), (80_000, 4, 128), (80_000, 4, 128),
                                (1,), (3_000,), (24,)]):
        d.max = trt.Dims(list(most))
    assert plugin.get_workspace_size(inputs, []) == 4096
    assert asked == [dict(num_queries=611, past_capacity=80_000, num_visible=3_000, num_timestamp_queries=24,
                          num_q_heads=28, num_kv_heads=4, head_dim=128, dtype="bf16")]
    assert plugin.get_valid_tactics() == []


def test_shape_checks(registered) -> None:
    trt = registered
    plugin = _creator(trt, CHUNK_SPARSE_ATTENTION.name).create_plugin("attn", _fields(trt, scale=0.25), trt.TensorRTPhase.BUILD)
    good = [(5, 4, 16), (5, 2, 16), (5, 2, 16), (9, 2, 16), (9, 2, 16), (1,), (6,), (2,)]
    plugin.check_shapes(good)
    with pytest.raises(ValueError, match="not a multiple"):
        plugin.check_shapes([(5, 3, 16), *good[1:]])
    with pytest.raises(ValueError, match="chunk keys for 5 queries"):
        plugin.check_shapes([good[0], (4, 2, 16), (4, 2, 16), *good[3:]])
    with pytest.raises(ValueError, match="disagree"):
        plugin.check_shapes([*good[:3], (9, 3, 16), (9, 3, 16), *good[5:]])
    gather = _creator(trt, BILEVEL_KV_GATHER.name).create_plugin("g", _fields(trt, rope_theta=1e4), trt.TensorRTPhase.BUILD)
    gather.check_shapes([(9, 2, 16), (9, 2, 16), (3, 4), (3, 4), (9,), (3,)])
    with pytest.raises(ValueError, match="odd"):
        gather.check_shapes([(9, 2, 15), (9, 2, 15), (3, 4), (3, 4), (9,), (3,)])
    with pytest.raises(ValueError, match="source_position"):
        gather.check_shapes([(9, 2, 16), (9, 2, 16), (3, 4), (3, 4), (8,), (3,)])
    with pytest.raises(ValueError, match="target_position"):
        gather.check_shapes([(9, 2, 16), (9, 2, 16), (3, 4), (3, 4), (9,), (4,)])


def _parse(trt, path: Path, *, override: bool):
    logger = trt.Logger(trt.Logger.ERROR)
    network = trt.Builder(logger).create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if override:
        parser.set_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)
    assert parser.parse_from_file(str(path)), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    plugins = [layer for layer in layers if layer.type == trt.LayerType.PLUGIN_V3]
    for layer in plugins:
        layer.__class__ = trt.IPluginV3Layer  # the bindings' usual downcast
    outputs = {network.get_output(i).name: network.get_output(i) for i in range(network.num_outputs)}
    return network, plugins, outputs


def test_parser_maps_custom_nodes_to_plugins(registered, onnx_dir: Path) -> None:
    trt = registered
    before = trt_plugins.creator_calls(trt)
    _, plugins, outputs = _parse(trt, onnx_dir / "prefill_chunk.onnx", override=True)
    assert [p.name for p in plugins] == ["chunk_attention.0", "chunk_attention.1"]
    assert plugins[0].plugin.plugin_name == CHUNK_SPARSE_ATTENTION.name
    assert plugins[0].plugin.attributes == {"scale": pytest.approx(16 ** -0.5)}
    assert plugins[0].num_inputs == len(CHUNK_SPARSE_ATTENTION.inputs) == 8  # v2: the past buffer read in place
    assert trt_plugins.creator_calls(trt)[CHUNK_SPARSE_ATTENTION.name] == before[CHUNK_SPARSE_ATTENTION.name] + 2
    assert outputs["logits"].dtype == trt.DataType.FLOAT
    assert outputs["present_key.0"].dtype == trt.DataType.HALF

    _, plugins, outputs = _parse(trt, onnx_dir / "kv_gather.onnx", override=True)
    assert [p.plugin.plugin_name for p in plugins] == [BILEVEL_KV_GATHER.name]
    assert plugins[0].num_inputs == len(BILEVEL_KV_GATHER.inputs) == 6  # v2: source and target positions too
    assert tuple(outputs["mixed_key"].shape) == (-1, 2, 16) and outputs["mixed_key"].dtype == trt.DataType.HALF


def _layer_types(network) -> list[str]:
    return [network.get_layer(i).type.name for i in range(network.num_layers)]


def test_without_override_the_function_body_is_inlined(registered, onnx_dir: Path) -> None:
    """The inlined body's standard ONNX Attention becomes TensorRT's fused attention, one per decoder layer."""
    network, plugins, _ = _parse(registered, onnx_dir / "prefill_chunk.onnx", override=False)
    types = _layer_types(network)
    assert plugins == [] and network.num_layers > 50
    assert types.count("ATTENTION_INPUT") == types.count("ATTENTION_OUTPUT") == 2
    # past_len sizes the timestamp queries' Range: TensorRT reads it on the host in this network only
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    assert [name for name, t in inputs.items() if t.is_shape_tensor] == ["past_len"]
    network, plugins, _ = _parse(registered, onnx_dir / "prefill_chunk.onnx", override=True)
    assert "ATTENTION_OUTPUT" not in _layer_types(network) and len(plugins) == 2
    assert not any(network.get_input(i).is_shape_tensor for i in range(network.num_inputs))  # the plugin reads it on the device


def test_unregistered_plugins_are_never_used(trt, onnx_dir: Path) -> None:
    trt_plugins.unregister_plugins(trt)
    _, plugins, _ = _parse(trt, onnx_dir / "kv_gather.onnx", override=True)
    assert plugins == []


def _tensor(trt, dtype, dims):
    desc = trt.PluginTensorDesc()
    desc.type, desc.dims, desc.format = dtype, trt.Dims(list(dims)), trt.TensorFormat.LINEAR
    return desc


def test_enqueue_hands_pointers_and_sizes_to_the_launchers(registered, monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU needed: the launcher's C call is intercepted, so only the argument plumbing is checked."""
    from videoxl.plugins import kernels

    calls = []
    monkeypatch.setattr(kernels, "_call", lambda name, *args: calls.append((name, args)))
    trt = registered
    half, i64 = trt.DataType.HALF, trt.DataType.INT64
    monkeypatch.setattr(kernels, "chunk_attention_workspace_bytes", lambda **kw: 512)
    attn = _creator(trt, CHUNK_SPARSE_ATTENTION.name).create_plugin("attn", _fields(trt, scale=0.25), trt.TensorRTPhase.RUNTIME)
    inputs = [_tensor(trt, half, (5, 4, 16)), _tensor(trt, half, (5, 2, 16)), _tensor(trt, half, (5, 2, 16)),
              _tensor(trt, half, (9, 2, 16)), _tensor(trt, half, (9, 2, 16)),
              _tensor(trt, i64, (1,)), _tensor(trt, i64, (6,)), _tensor(trt, i64, (2,))]
    attn.enqueue(inputs, [_tensor(trt, half, (5, 4, 16))], [101, 102, 103, 104, 105, 106, 107, 108], [201], 301, 77)
    name, args = calls[-1]
    assert name == "videoxl_chunk_attention"
    assert args == (101, 102, 103, 104, 105, 106, 107, 6, 108, 2, 201, 301, 512, 5, 9, 4, 2, 16, 0.25,
                    kernels.DType.FLOAT16, 77)

    gather = _creator(trt, BILEVEL_KV_GATHER.name).create_plugin("g", _fields(trt, rope_theta=1e6), trt.TensorRTPhase.RUNTIME)
    inputs = [_tensor(trt, trt.DataType.BF16, (23, 2, 16)), _tensor(trt, trt.DataType.BF16, (23, 2, 16)),
              _tensor(trt, i64, (9, 4)), _tensor(trt, trt.DataType.FLOAT, (9, 4)), _tensor(trt, i64, (23,)),
              _tensor(trt, i64, (9,))]
    gather.enqueue(inputs, [], [1, 2, 3, 4, 5, 6], [7, 8], 0, 0)
    name, args = calls[-1]
    assert name == "videoxl_bilevel_kv_gather"
    assert args == (1, 2, 3, 4, 5, 6, 7, 8, 23, 9, 4, 2, 16, 1e6, kernels.DType.BFLOAT16, 0)
