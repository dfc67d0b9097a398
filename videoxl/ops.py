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
OPSET_VERSION = 2  # v2: rotated past read in place, positions in the gather
PLUGIN_NAMESPACE = "videoxl"
PLUGIN_VERSION = "2"


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
        TensorSpec("query", ("Q", "Hq", "D"), "float", "chunk queries, rotated at past_len + i"),
        TensorSpec("key", ("Q", "Hkv", "D"), "float", "the chunk's own keys, rotated at past_len + i"),
        TensorSpec("value", ("Q", "Hkv", "D"), "float", "the chunk's own values"),
        TensorSpec(
            "past_key", ("P", "Hkv", "D"), "float",
            "past buffer: row j holds the key of position j, rotated; rows >= past_len unused. Or, with no timestamp "
            "queries (streaming rule), a compact view: kept rows in position order, so row j holds a position >= j, "
            "each key rotated at its own position; P may then be below past_len and rows are read only through "
            "visible_past_index",
        ),
        TensorSpec("past_value", ("P", "Hkv", "D"), "float", "past buffer of values, rows as past_key's"),
        TensorSpec("past_len", ("1",), "int64", "absolute position of query 0 = valid past rows of a full buffer (a device tensor, not a shape)"),
        TensorSpec("visible_past_index", ("V",), "int64", "past rows every query sees, ascending, all < past_len (prefix, earlier timestamps, window)"),
        TensorSpec("timestamp_query_index", ("Tq",), "int64", "queries that see the whole past [0, past_len) instead (ascending; empty under the streaming rule)"),
    ),
    outputs=(TensorSpec("output", ("Q", "Hq", "D"), "float", "attention output"),),
    attributes={"scale": "float: softmax scale, head_dim ** -0.5"},
    doc=(
        "Query i sits at absolute position past_len + i and sees past rows visible_past_index "
        "(all rows [0, past_len) if i is in timestamp_query_index) plus chunk keys 0..i (causal). "
        "The past is read in place through the index list: no chunk copies or rotates it. "
        "Query head h reads KV head h // (Hq / Hkv). Softmax and accumulation in float32."
    ),
)

BILEVEL_KV_GATHER = OpContract(
    name="BilevelKVGather",
    inputs=(
        TensorSpec("key", ("N", "Hkv", "D"), "float", "source keys, source row n rotated at source_position[n]"),
        TensorSpec("value", ("N", "Hkv", "D"), "float", "source values"),
        TensorSpec("gather_index", ("M", "S"), "int64", "source rows pooled into each output row"),
        TensorSpec("gather_weight", ("M", "S"), "float32", "pooling weights (1,0,..) copies, 1/S averages"),
        TensorSpec("source_position", ("N",), "int64", "position each source key is rotated at (0: stored before RoPE)"),
        TensorSpec("target_position", ("M",), "int64", "position each output key is rotated at (0: left unrotated)"),
    ),
    outputs=(
        TensorSpec("mixed_key", ("M", "Hkv", "D"), "float", "pooled keys, rotated at target_position"),
        TensorSpec("mixed_value", ("M", "Hkv", "D"), "float", "pooled values"),
    ),
    attributes={"rope_theta": "float: RoPE base (rotate-half convention)"},
    doc=(
        "mixed_key[m] = rope(sum_s gather_weight[m, s] * rope(key[i], -source_position[i]), target_position[m]) "
        "with i = gather_index[m, s]; mixed_value[m] = sum_s gather_weight[m, s] * value[i] (float32 accumulation). "
        "Un-rotating, pooling and re-rotating in one pass equals the official pool-then-rotate of pre-RoPE keys "
        "up to rounding (RoPE is a rotation; position 0 is the identity). The sparse tier is filled with "
        "target_position 0 (pooled keys kept before RoPE); the mixed decode cache with target_position 0..M-1."
    ),
)

ALL_OPS = (CHUNK_SPARSE_ATTENTION, BILEVEL_KV_GATHER)
