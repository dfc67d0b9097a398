"""TensorRT IPluginV3 plugins for the two ``videoxl`` custom ops, for either TensorRT flavour.

Thin wrappers (STYLE 7): shapes, formats and attributes come from the op contract in
``videoxl.ops``; ``enqueue`` hands raw device pointers, sizes and the stream to the C launchers
bound in ``videoxl.plugins.kernels`` (imported lazily: building an engine never needs a GPU
or the kernel library). No math happens in Python.

How a node becomes a plugin: the exporter writes each op as a ``videoxl``-domain node with a
model-local function. The ONNX parser looks a node up as (op_type, ``plugin_version`` attribute
or "1", ``plugin_namespace`` attribute or ""), and only does so when ``ENABLE_PLUGIN_OVERRIDE``
is set or the node carries a ``plugin_namespace`` attribute; otherwise it inlines the function.
So the creators are registered twice: in the default namespace "" (what the parser asks for,
under the override flag) and in ``videoxl`` (the namespace the plugins report, which is what a
serialized engine asks for when it is deserialized). ``unregister_plugins`` removes both so
that a plugin-free build inlines the function bodies even when the node names a namespace.

A Python plugin is not stored in the engine: any process that deserializes an engine built
with plugins must call ``register_plugins(trt)`` first.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

import numpy as np

from videoxl.ops import ALL_OPS, BILEVEL_KV_GATHER, CHUNK_SPARSE_ATTENTION, PLUGIN_NAMESPACE, PLUGIN_VERSION, OpContract

log = logging.getLogger(__name__)

# Namespaces each creator is registered under; see the module docstring.
REGISTERED_NAMESPACES = ("", PLUGIN_NAMESPACE)

_classes: dict[str, dict[str, Any]] = {}  # trt module name -> {"plugins": {op: cls}, "creator": cls}
_registered: dict[str, list[Any]] = {}  # trt module name -> creator objects (kept alive while registered)


def register_plugins(trt: ModuleType) -> list[Any]:
    """Register the creators of both plugins with ``trt``'s plugin registry (idempotent)."""
    key = trt.__name__
    if key in _registered:
        return _registered[key]
    registry = trt.get_plugin_registry()
    creators = []
    for namespace in REGISTERED_NAMESPACES:
        for contract in ALL_OPS:
            creator = _define(trt)["creator"](contract, namespace)
            if not registry.register_creator(creator, namespace):
                for done in creators:
                    registry.deregister_creator(done)
                raise RuntimeError(
                    f"another plugin creator {contract.name!r} (version {PLUGIN_VERSION}, namespace {namespace!r}) "
                    "is already registered in this process"
                )
            creators.append(creator)
    _registered[key] = creators
    log.debug("registered %d videoxl plugin creators with %s", len(creators), key)
    return creators


def unregister_plugins(trt: ModuleType) -> None:
    """Remove the creators again (a plugin-free build must not find them)."""
    creators = _registered.pop(trt.__name__, [])
    registry = trt.get_plugin_registry()
    for creator in creators:
        registry.deregister_creator(creator)


def plugins_registered(trt: ModuleType) -> bool:
    return trt.__name__ in _registered


def creator_calls(trt: ModuleType) -> dict[str, int]:
    """How many plugins each op's creators have made so far in this process (tests, manifests)."""
    calls = {c.name: 0 for c in ALL_OPS}
    for creator in _registered.get(trt.__name__, []):
        calls[creator.name] += creator.calls
    return calls


# --- the classes, defined once per TensorRT module ------------------------------------------------
def _define(trt: ModuleType) -> dict[str, Any]:
    if trt.__name__ in _classes:
        return _classes[trt.__name__]

    float_types = (trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16)
    fixed_types = {"float32": trt.DataType.FLOAT, "int64": trt.DataType.INT64}
    dtype_names = {trt.DataType.FLOAT: "fp32", trt.DataType.HALF: "fp16", trt.DataType.BF16: "bf16"}

    class VideoXLPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        """Shared plumbing; a subclass adds get_output_shapes, a shape check and enqueue."""

        contract: OpContract

        def __init__(self, attributes: dict[str, float]) -> None:
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name = self.contract.name
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_version = PLUGIN_VERSION
            self.num_outputs = len(self.contract.outputs)
            self.attributes = dict(attributes)
            # Identical plugins (same op, same attributes) share their timing results.
            self.timing_cache_id = f"{self.contract.name}.v{PLUGIN_VERSION}:" + ",".join(
                f"{k}={v!r}" for k, v in sorted(self.attributes.items())
            )
            self.metadata_string = f"videoxl::{self.contract.name} v{PLUGIN_VERSION}"

        # -- core -----------------------------------------------------------------------------
        def get_capability_interface(self, capability):
            return self  # one object implements core, build and runtime

        def clone(self):
            return type(self)(self.attributes)

        def destroy(self) -> None:
            pass

        # -- build ----------------------------------------------------------------------------
        def get_output_data_types(self, input_types):
            # "float" outputs take the model's float dtype, which is the first input's.
            return [input_types[0] if spec.dtype == "float" else fixed_types[spec.dtype] for spec in self.contract.outputs]

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            specs = self.contract.inputs + self.contract.outputs
            if specs[pos].dtype == "float":
                if pos == 0:
                    return desc.type in float_types
                return desc.type == in_out[0].desc.type  # one float dtype across the op
            return desc.type == fixed_types[specs[pos].dtype]

        def configure_plugin(self, inputs, outputs) -> None:
            self.check_shapes([tuple(d.desc.dims) for d in inputs])

        def get_workspace_size(self, inputs, outputs) -> int:
            return 0  # overridden where a launcher takes workspace (chunk_attention.h)

        def get_valid_tactics(self):
            return []  # one implementation: TensorRT uses the default tactic 0

        def set_tactic(self, tactic) -> None:
            pass

        # -- runtime --------------------------------------------------------------------------
        def on_shape_change(self, inputs, outputs) -> None:
            self.check_shapes([tuple(d.dims) for d in inputs])

        def attach_to_context(self, resource_context):
            return self.clone()

        def get_fields_to_serialize(self):
            return trt.PluginFieldCollection(
                [
                    trt.PluginField(name, np.array([value], dtype=np.float32), trt.PluginFieldType.FLOAT32)
                    for name, value in sorted(self.attributes.items())
                ]
            )

        def check_shapes(self, dims: list[tuple[int, ...]]) -> None:
            raise NotImplementedError

        @staticmethod
        def dtype_name(data_type) -> str:
            return dtype_names[data_type]

    class ChunkSparseAttentionPlugin(VideoXLPlugin):
        contract = CHUNK_SPARSE_ATTENTION  # query, key, value, past_key, past_value, past_len, visible_past_index, timestamp_query_index

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            return [trt.DimsExprs(inputs[0])]  # output (Q, Hq, D) = query

        def check_shapes(self, dims):
            query, key, value, past_key, past_value = dims[:5]
            hq, hkv, d = query[1], key[1], query[2]
            problems = []
            if key[2] != d or value[1:] != key[1:] or past_key[1:] != key[1:] or past_value[1:] != key[1:]:
                problems.append(f"query {query}, key {key}, value {value}, past {past_key}/{past_value} disagree on heads/head_dim")
            if hq > 0 and hkv > 0 and hq % hkv:
                problems.append(f"{hq} query heads are not a multiple of {hkv} KV heads")
            if query[0] >= 0 and key[0] >= 0 and key[0] != query[0]:
                problems.append(f"{key[0]} chunk keys for {query[0]} queries (key holds the chunk's own keys)")
            if problems:
                raise ValueError(f"videoxl::{self.contract.name}: " + "; ".join(problems))

        def workspace_bytes(self, dims, data_type) -> int:
            """The launcher's own answer for these shapes (videoxl_chunk_attention_workspace_bytes)."""
            from videoxl.plugins import kernels

            query, key, past_key, visible, ts = dims[0], dims[1], dims[3], dims[6], dims[7]
            try:
                return kernels.chunk_attention_workspace_bytes(
                    num_queries=query[0], past_capacity=past_key[0], num_visible=visible[0],
                    num_timestamp_queries=ts[0], num_q_heads=query[1], num_kv_heads=key[1], head_dim=query[2],
                    dtype=self.dtype_name(data_type),
                )
            except kernels.build.BuildError as err:
                # No kernel library on the building machine: the bound chunk_attention_mma.cu
                # guarantees (at most 64 splits of every (query, head) row, fp32 acc + m + l).
                bound = 64 * query[0] * query[1] * (query[2] + 2) * 4 + 512
                log.warning("sizing the attention workspace without the kernel library (%s): %d bytes", err, bound)
                return bound

        def get_workspace_size(self, inputs, outputs) -> int:
            return self.workspace_bytes([tuple(d.max) for d in inputs], inputs[0].desc.type)

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            from videoxl.plugins import kernels

            dims = [tuple(d.dims) for d in input_desc]
            q, k, past = dims[0], dims[1], dims[3]
            kernels.chunk_attention(
                query=inputs[0], key=inputs[1], value=inputs[2], past_key=inputs[3], past_value=inputs[4],
                past_len=inputs[5], visible_past_index=inputs[6], num_visible=dims[6][0],
                timestamp_query_index=inputs[7], num_timestamp_queries=dims[7][0],
                output=outputs[0], workspace=workspace,
                workspace_bytes=self.workspace_bytes(dims, input_desc[0].type),
                num_queries=q[0], past_capacity=past[0], num_q_heads=q[1], num_kv_heads=k[1], head_dim=q[2],
                scale=self.attributes["scale"], dtype=self.dtype_name(input_desc[0].type), stream=stream,
            )

    class BilevelKVGatherPlugin(VideoXLPlugin):
        contract = BILEVEL_KV_GATHER

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            mixed = trt.DimsExprs(inputs[0])  # (N, Hkv, D) -> (M, Hkv, D), M = gather_index rows
            mixed[0] = inputs[2][0]
            return [mixed, trt.DimsExprs(mixed)]

        def check_shapes(self, dims):
            key, value, index, weight, source, target = dims
            problems = []
            if value != key and -1 not in key + value:
                problems.append(f"key {key} and value {value} differ")
            if key[2] > 0 and key[2] % 2:
                problems.append(f"head_dim {key[2]} is odd (RoPE rotates pairs)")
            if index[1:] != weight[1:] and -1 not in index + weight:
                problems.append(f"gather_index {index} and gather_weight {weight} differ")
            if source[0] >= 0 and key[0] >= 0 and source[0] != key[0]:
                problems.append(f"source_position {source} for {key[0]} source rows")
            if target[0] >= 0 and index[0] >= 0 and target[0] != index[0]:
                problems.append(f"target_position {target} for {index[0]} output rows")
            if problems:
                raise ValueError(f"videoxl::{self.contract.name}: " + "; ".join(problems))

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            from videoxl.plugins import kernels

            key, index = input_desc[0].dims, input_desc[2].dims
            kernels.bilevel_kv_gather(
                key=inputs[0], value=inputs[1], gather_index=inputs[2], gather_weight=inputs[3],
                source_position=inputs[4], target_position=inputs[5],
                mixed_key=outputs[0], mixed_value=outputs[1],
                num_source=key[0], num_mixed=index[0], gather_width=index[1],
                num_kv_heads=key[1], head_dim=key[2],
                rope_theta=self.attributes["rope_theta"], dtype=self.dtype_name(input_desc[0].type), stream=stream,
            )

    plugin_classes = {c.contract.name: c for c in (ChunkSparseAttentionPlugin, BilevelKVGatherPlugin)}

    class VideoXLPluginCreator(trt.IPluginCreatorV3One):
        """Makes one op's plugin from the node's attributes (build) or the serialized fields (runtime)."""

        def __init__(self, contract: OpContract, namespace: str) -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.contract = contract
            self.name = contract.name
            self.plugin_namespace = namespace
            self.plugin_version = PLUGIN_VERSION
            # The parser hands over exactly the node attributes named here (ONNX floats: FLOAT32).
            self.field_names = trt.PluginFieldCollection(
                [trt.PluginField(a, np.array([], dtype=np.float32), trt.PluginFieldType.FLOAT32) for a in contract.attributes]
            )
            self.calls = 0

        def create_plugin(self, name, field_collection, phase):
            values = {f.name: np.asarray(f.data).reshape(-1) for f in field_collection}
            attributes = {}
            for attr in self.contract.attributes:
                if attr not in values or values[attr].size != 1:
                    raise ValueError(
                        f"videoxl::{self.contract.name} node {name!r}: attribute {attr!r} missing or not one float "
                        f"(got fields {sorted(values)})"
                    )
                attributes[attr] = float(values[attr][0])
            self.calls += 1
            return plugin_classes[self.contract.name](attributes)

    _classes[trt.__name__] = {"plugins": plugin_classes, "creator": VideoXLPluginCreator}
    return _classes[trt.__name__]

