"""The graph contract: every exported graph's inputs and outputs, defined once (STYLE 19).

The exporter writes graphs with exactly these names, shapes and dtypes; the ONNX Runtime and
TensorRT backends bind them; the engine builder sizes its optimization profiles from them; the
export manifest carries them (`manifest_entry`), so a directory says what it expects.

Conventions:
- KV tensors are token-major `(tokens, kv_heads, head_dim)`, one sequence, one pair per layer
  (`past_key.{layer}`, `present_value.{layer}`, ...). Keys are stored **rotated** at the
  position they are cached at: RoPE is applied once, when a key is written.
- dtype "float" is the model's float type (the export precision); "float32" and "int64" are fixed.
- `location` says where a backend must put an input: "device" for data the graph computes with,
  "host" for shape tensors (TensorRT reads those on the host). The v2 graphs have none: every
  length they need is a data input (`past_len`) or the shape of a bound buffer.
- Dimensions are names: a model dimension from the config (`hidden_size`, ...), a fixed number,
  or a free symbol (`chunk_tokens`, ...) that the builder's profiles bound.
- Layer boundaries (`GraphContract.boundary`): the LLM graphs name the tensors that cross from
  decoder layer i-1 into layer i, so the builder can cut a graph into layer ranges
  (`videoxl.engines.ranges`) without a second export. A range [a, b) takes the boundary tensors
  of layer a (none when a = 0: it owns the embeddings and the visual splice) and gives out those
  of layer b (the graph's own outputs when b = L: it owns the final norm and lm_head).

      input_ids ... -> [layers 0..a) -> hidden.a -> [layers a..b) -> hidden.b -> ...
- Block scoring holds no weights: the question runs as a chunk on the scoring cache through
  prefill_chunk (its per-layer `query.{layer}` and `present_key.{layer}` outputs), and `score`
  turns those queries and keys into attention mass. So the LLM's weights exist once per
  prefill_chunk engine (plus decode's, unless decode runs on prefill_chunk too).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from videoxl.config import VideoXLConfig

CONTRACT_VERSION = 3  # 3: prefill_chunk gives out its queries; score is the weightless mass over them
MODEL_DIMS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "image_size", "tokens_per_group")


@dataclass(frozen=True)
class IOSpec:
    name: str  # "{layer}" in the name: one tensor per decoder layer
    dims: tuple[str | int, ...]
    dtype: str  # "float" (the export precision), "float32" or "int64"
    doc: str
    location: str = "device"  # or "host": a shape tensor

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.name

    def names(self, layers: int) -> list[str]:
        return [self.name.format(layer=i) for i in range(layers)] if self.per_layer else [self.name]

    def shape(self, config: VideoXLConfig) -> list[str | int]:
        """Dims with the model's numbers filled in; free symbols stay names."""
        return [getattr(config, d) if isinstance(d, str) and d in MODEL_DIMS else d for d in self.dims]


@dataclass(frozen=True)
class GraphContract:
    name: str
    inputs: tuple[IOSpec, ...]
    outputs: tuple[IOSpec, ...]
    doc: str
    boundary: tuple[IOSpec, ...] = ()  # per-layer tensors entering layer i (1 <= i < L): where ranges are cut

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    def input_names(self, layers: int) -> list[str]:
        return [n for spec in self.inputs for n in spec.names(layers)]

    def output_names(self, layers: int) -> list[str]:
        return [n for spec in self.outputs for n in spec.names(layers)]

    def spec(self, name: str) -> IOSpec:
        """The spec a (possibly per-layer) tensor name belongs to."""
        for spec in (*self.inputs, *self.outputs):
            if spec.name == name or (spec.per_layer and name.rsplit(".", 1)[0] == spec.name.rsplit(".", 1)[0]):
                return spec
        raise KeyError(f"{self.name} has no tensor {name!r}")

    def host_inputs(self, layers: int) -> list[str]:
        return [n for spec in self.inputs if spec.location == "host" for n in spec.names(layers)]


KV = ("num_key_value_heads", "head_dim")


def _hidden(tokens: str) -> IOSpec:
    return IOSpec("hidden.{layer}", (tokens, "hidden_size"), "float", "the residual stream entering decoder layer `layer`")


def _kv(prefix: str, tokens: str, doc: str) -> tuple[IOSpec, IOSpec]:
    return (
        IOSpec(f"{prefix}_key.{{layer}}", (tokens, *KV), "float", f"{doc}; keys rotated at their positions"),
        IOSpec(f"{prefix}_value.{{layer}}", (tokens, *KV), "float", doc),
    )


VISION = GraphContract(
    "vision",
    inputs=(IOSpec("pixel_values", ("frames", 3, "image_size", "image_size"), "float32", "4G normalised RGB frames"),),
    outputs=(IOSpec("visual_embeds", ("groups", "tokens_per_group", "hidden_size"), "float", "144 tokens per group of 4"),),
    doc="Frames -> visual embeddings (SigLIP, DTS compressor, projector, 2x2 pool); standard ops only.",
)

PREFILL_CHUNK = GraphContract(
    "prefill_chunk",
    inputs=(
        IOSpec("input_ids", ("chunk_tokens",), "int64", "the chunk's token ids (visual slots hold the image id)"),
        IOSpec("visual_embeds", ("visual_tokens", "hidden_size"), "float", "the chunk's visual rows, in order"),
        IOSpec("past_len", (1,), "int64", "position of the chunk's first token = valid past rows"),
        IOSpec("visible_past_index", ("visible_past",), "int64", "past rows every query sees (ChunkSparseAttention)"),
        IOSpec("timestamp_query_index", ("timestamp_queries",), "int64", "queries that see the whole past"),
        *_kv("past", "past_tokens", "the dense tier so far (rows >= past_len unused)"),
    ),
    outputs=(
        IOSpec("logits", (1, "vocab_size"), "float32", "logits of the chunk's last position"),
        *_kv("present", "chunk_tokens", "the chunk's KV, to be written at rows [past_len, past_len + Q)"),
        IOSpec("query.{layer}", ("chunk_tokens", "num_attention_heads", "head_dim"), "float",
               "the chunk's queries, rotated at their positions: what `score` reads when the chunk is a question"),
    ),
    doc="One prefill chunk (or the prefix) against the rotated past, read in place; positions past_len + i.",
    boundary=(_hidden("chunk_tokens"),),
)

DECODE = GraphContract(
    "decode",
    inputs=(
        IOSpec("input_ids", ("new_tokens",), "int64", "tokens at positions past_len + t"),
        IOSpec("past_len", (1,), "int64", "valid rows of the decode cache"),
        *_kv("past", "past_tokens", "the mixed decode cache, a capacity buffer (rows >= past_len unused)"),
    ),
    outputs=(
        IOSpec("logits", (1, "vocab_size"), "float32", "logits of the last new token"),
        *_kv("present", "new_tokens", "the new tokens' KV, to be written at rows [past_len, past_len + T)"),
    ),
    doc="A few tokens against the decode cache: fixed-capacity past + valid length, so one CUDA graph per capacity replays.",
    boundary=(_hidden("new_tokens"),),
)

SCORE = GraphContract(
    "score",
    inputs=(
        IOSpec("past_len", (1,), "int64", "valid rows of the scoring cache"),
        IOSpec("query.{layer}", ("new_tokens", "num_attention_heads", "head_dim"), "float",
               "the question's queries, rotated: prefill_chunk's query.{layer} for the question run as a chunk on the scoring cache"),
        IOSpec("key.{layer}", ("new_tokens", *KV), "float", "the question's own keys, rotated: that run's present_key.{layer}"),
        IOSpec("past_key.{layer}", ("past_tokens", *KV), "float",
               "the all-sparse scoring cache, a capacity buffer (rows >= past_len unused); keys rotated at their positions"),
    ),
    outputs=(
        IOSpec("attention_mass", ("past_tokens",), "float32",
               "attention probability each past row receives, summed over layers, heads and queries (0 for rows >= past_len)"),
    ),
    doc="Block scoring, once per question: the question's attention probabilities on the all-sparse cache (query t sees "
    "rows [0, past_len) and its own keys 0..t), summed. No weights: the queries and keys come from the prefill_chunk engine.",
)

KV_GATHER = GraphContract(
    "kv_gather",
    inputs=(
        IOSpec("key", ("source_tokens", *KV), "float", "source keys, rotated at source_position"),
        IOSpec("value", ("source_tokens", *KV), "float", "source values"),
        IOSpec("gather_index", ("gathered_tokens", "pool"), "int64", "source rows pooled into each output row"),
        IOSpec("gather_weight", ("gathered_tokens", "pool"), "float32", "pooling weights"),
        IOSpec("source_position", ("source_tokens",), "int64", "position each source key is rotated at"),
        IOSpec("target_position", ("gathered_tokens",), "int64", "position each output key is rotated at"),
    ),
    outputs=(
        IOSpec("mixed_key", ("gathered_tokens", *KV), "float", "pooled keys rotated at target_position"),
        IOSpec("mixed_value", ("gathered_tokens", *KV), "float", "pooled values"),
    ),
    doc="One layer of BilevelKVGather: fills the sparse tier (target 0) and the decode cache (target 0..M-1).",
)

GRAPHS: dict[str, GraphContract] = {g.name: g for g in (VISION, PREFILL_CHUNK, DECODE, SCORE, KV_GATHER)}
LLM_WEIGHTS = "llm_weights.onnx.data"  # shared by the graphs that hold LLM weights


RANGE_FILE = re.compile(r"^(?P<graph>[a-z_]+)\.layers_(?P<first>\d+)-(?P<last>\d+)\.(?P<kind>onnx|engine)$")


def range_file(graph: str, start: int, stop: int, kind: str = "onnx") -> str:
    """``decode.layers_00-06.onnx``: decoder layers start..stop-1 of a graph (both ends in the name), as
    the engine builder cuts it beside the export (``videoxl.engines.ranges``); kind "engine" for its engine."""
    return f"{graph}.layers_{start:02d}-{stop - 1:02d}.{kind}"


def kv_names(prefix: str, layer: int) -> tuple[str, str]:
    """("past_key.3", "past_value.3") for prefix "past"; "present" likewise."""
    return f"{prefix}_key.{layer}", f"{prefix}_value.{layer}"


def kv_bytes(config: VideoXLConfig, tokens: int, itemsize: int) -> int:
    """Bytes of K and V for `tokens` tokens over all layers."""
    return tokens * config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * itemsize


def manifest_entry(config: VideoXLConfig) -> dict:
    """The contract as written into an export manifest: version and every graph's I/O."""

    def io(spec: IOSpec) -> dict:
        return {"name": spec.name, "shape": spec.shape(config), "dtype": spec.dtype, "location": spec.location}

    def entry(g: GraphContract) -> dict:
        found = {"inputs": [io(s) for s in g.inputs], "outputs": [io(s) for s in g.outputs]}
        return found | ({"boundary": [io(s) for s in g.boundary]} if g.boundary else {})

    return {"version": CONTRACT_VERSION, "graphs": {g.name: entry(g) for g in GRAPHS.values()}}
