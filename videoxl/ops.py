"""The contract of videoxl's two custom ops, defined once (STYLE 6).

The exporter, the numpy reference (`videoxl.plugins.reference`), the TensorRT plugins and
the CUDA launchers all read these tables. Every exported node is a `videoxl`-domain node that
also carries a model-local ONNX function with its standard-op definition: ONNX Runtime and
TensorRT without plugin override inline the body; TensorRT with ENABLE_PLUGIN_OVERRIDE maps the
node to our plugin.

Layouts are token-major: K/V tensors are (tokens, kv_heads, head_dim), so that a token range
of the cache is a contiguous slice. Sets of tokens are index lists, never masks: a list needs no
NonZero to gather from (TensorRT for RTX cannot import NonZero), and it is what a kernel loops over.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DOMAIN = "videoxl"
OPSET_VERSION = 1
PLUGIN_NAMESPACE = "videoxl"
PLUGIN_VERSION = "1"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[str, ...]
    dtype: str  # "float" = the model's float dtype (fp32/fp16/bf16)
    doc: str


@dataclass(frozen=True)
class OpContract:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    attributes: dict[str, str] = field(default_factory=dict)
    doc: str = ""

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


CHUNK_SPARSE_ATTENTION = OpContract(
    name="ChunkSparseAttention",
    inputs=(
        TensorSpec("query", ("Q", "Hq", "D"), "float", "chunk queries, RoPE applied"),
        TensorSpec("key", ("K", "Hkv", "D"), "float", "past then chunk keys (K = past + Q), RoPE applied"),
        TensorSpec("value", ("K", "Hkv", "D"), "float", "past then chunk values"),
        TensorSpec("prefix_len", ("1",), "int64", "tokens before the video, always visible"),
        TensorSpec("window_start", ("1",), "int64", "first past token of the P previous chunks"),
        TensorSpec("past_timestamp_index", ("T",), "int64", "timestamp tokens in [prefix_len, window_start)"),
        TensorSpec("timestamp_query_index", ("Tq",), "int64", "chunk queries that are timestamp tokens (ascending)"),
    ),
    outputs=(TensorSpec("output", ("Q", "Hq", "D"), "float", "attention output"),),
    attributes={"scale": "float: softmax scale, head_dim ** -0.5"},
    doc=(
        "Query i sits at absolute position p = (K - Q) + i. A timestamp query (i in "
        "timestamp_query_index) sees keys [0, p]; "
        "any other query sees [0, prefix_len) U past_timestamp_index U [window_start, p]. "
        "Query head h reads KV head h // (Hq / Hkv). Softmax and accumulation in float32."
    ),
)

BILEVEL_KV_GATHER = OpContract(
    name="BilevelKVGather",
    inputs=(
        TensorSpec("key", ("N", "Hkv", "D"), "float", "source keys, before RoPE"),
        TensorSpec("value", ("N", "Hkv", "D"), "float", "source values"),
        TensorSpec("gather_index", ("M", "S"), "int64", "source rows pooled into each mixed row"),
        TensorSpec("gather_weight", ("M", "S"), "float32", "pooling weights (1,0,..) copies, 1/S averages"),
    ),
    outputs=(
        TensorSpec("mixed_key", ("M", "Hkv", "D"), "float", "pooled keys rotated at positions 0..M-1"),
        TensorSpec("mixed_value", ("M", "Hkv", "D"), "float", "pooled values"),
    ),
    attributes={"rope_theta": "float: RoPE base (rotate-half convention)"},
    doc=(
        "mixed[m] = sum_s gather_weight[m, s] * source[gather_index[m, s]] (float32 accumulation); "
        "keys are then rotated at compacted position m, so the mixed cache is contiguous 0..M-1."
    ),
)

ALL_OPS = (CHUNK_SPARSE_ATTENTION, BILEVEL_KV_GATHER)
