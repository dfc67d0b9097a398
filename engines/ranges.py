"""Layer ranges: one exported LLM graph cut into small graphs of a few decoder layers each.

An 8B model's LLM graph holds 15 GB of weights, more than TensorRT for RTX's compiler can copy
on a 24 GiB machine; a range of a few layers builds in ~10 GiB. The cut needs no second export:
the exporter names the tensors that cross between layers (``GraphContract.boundary`` in
``videoxl.graphs``), and a range is the part of the graph between two boundaries::

    full graph:   inputs -> [embed, splice] -> hidden.0 -> layer 0 -> hidden.1 -> ... -> layer L-1 -> [norm, lm_head] -> logits
    range [a, b): inputs it reads + hidden.a -> layers a..b-1 -> hidden.b
                  a = 0: it owns the embeddings and the visual splice;  b = L: it owns the graph's own outputs

Each range is written as its own small ``.onnx`` file beside the graph, in the same directory,
referencing the SAME external data file: the graph is read with ``load_external_data=False``
and the initializers keep their external-data entries, so no weight byte is copied. Small
initializers and constants that several ranges read (RoPE's inverse frequencies) go into each.

What every range recomputes: the prologue (positions, RoPE tables, the decode mask) from the
inputs it reads. The mask's past capacity is read from ``past_key.0``'s shape; a range that does
not own layer 0 reads it from its first layer's ``past_key.{a}`` instead (same dims by contract),
and the cut refuses any other read of a layer outside the range.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from videoxl.config import VideoXLConfig
from videoxl.engines.errors import EngineBuildError
from videoxl.graphs import GraphContract, range_file

RANGED_GRAPHS = ("prefill_chunk", "decode")  # the graphs that hold the LLM's layers (score holds no weights)
_ELEM = {"int64": TensorProto.INT64, "float32": TensorProto.FLOAT}
_LAYER_NAME = re.compile(r"^(.*)\.(\d+)$")
_LAYER_WEIGHT = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class LayerRange:
    start: int  # first decoder layer
    stop: int  # one past the last

    def file(self, graph: str, kind: str = "onnx") -> str:
        return range_file(graph, self.start, self.stop, kind)

    def __str__(self) -> str:
        return f"layers {self.start}-{self.stop - 1}"


@dataclass(frozen=True)
class RangeGraph:
    """One extracted range: its model (initializers external where the graph's were) and its I/O."""

    graph: str
    layers: LayerRange
    model: onnx.ModelProto
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    boundary_in: tuple[str, ...]  # the tensors the previous range gives out (none for the first)
    boundary_out: tuple[str, ...]  # the tensors the next range takes in (none for the last)

    @property
    def weight_bytes(self) -> int:
        return initializer_bytes(self.model)


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of a model's initializers, external ones from their ``length`` entry (nothing is read)."""
    return sum(initializer_bytes_of(tensor) for tensor in model.graph.initializer)


def initializer_bytes_of(tensor: onnx.TensorProto) -> int:
    if tensor.data_location == TensorProto.EXTERNAL:
        return int({e.key: e.value for e in tensor.external_data}.get("length", 0))
    return len(tensor.raw_data) or onnx.numpy_helper.to_array(tensor).nbytes


def boundary_names(contract: GraphContract, layer: int) -> list[str]:
    return [spec.name.format(layer=layer) for spec in contract.boundary]


def extract_range(
    model: onnx.ModelProto, contract: GraphContract, cfg: VideoXLConfig, layers: LayerRange
) -> RangeGraph:
    """The part of ``model`` (read without its external data) that computes layers [start, stop)."""
    total = cfg.num_hidden_layers
    if not 0 <= layers.start < layers.stop <= total:
        raise EngineBuildError(f"{contract.name}: {layers} is not a layer range of a {total}-layer graph")
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    graph_inputs = {vi.name: vi for vi in graph.input if vi.name not in initializers}
    graph_outputs = {vi.name: vi for vi in graph.output}
    produced_by = {out: i for i, node in enumerate(graph.node) for out in node.output}  # tensor -> node index
    missing = [n for n in boundary_names(contract, layers.start) + boundary_names(contract, layers.stop)
               if 0 < int(n.rsplit(".", 1)[1]) < total and n not in produced_by]
    if missing:
        raise EngineBuildError(
            f"{contract.name}: the graph does not name its layer boundaries ({', '.join(missing[:3])} missing); "
            "re-export it with this videoxl (`videoxl export`) to build it in layer ranges"
        )

    def in_range(name: str) -> bool:
        match = _LAYER_NAME.match(name)
        return match is None or layers.start <= int(match.group(2)) < layers.stop

    boundary_in = tuple(boundary_names(contract, layers.start)) if layers.start > 0 else ()
    if layers.stop < total:
        boundary_out = tuple(boundary_names(contract, layers.stop))
        own = [n for n in contract.output_names(total) if contract.spec(n).per_layer and in_range(n)]
    else:
        boundary_out = ()
        own = [n for n in contract.output_names(total) if not contract.spec(n).per_layer or in_range(n)]
    outputs = [*own, *boundary_out]

    # walk back from the outputs; stop at the range's boundary, graph inputs and initializers
    needed: set[int] = set()
    stack = list(outputs)
    seen: set[str] = set(boundary_in)
    while stack:
        name = stack.pop()
        if name in seen or name in initializers or name in graph_inputs or not name:
            continue
        seen.add(name)
        if name not in produced_by:
            raise EngineBuildError(f"{contract.name}: {layers} needs tensor {name!r}, which nothing in the graph produces")
        needed.add(produced_by[name])
        stack.extend(graph.node[produced_by[name]].input)
    nodes = [onnx.NodeProto() for _ in needed]
    for copy, i in zip(nodes, sorted(needed)):
        copy.CopyFrom(graph.node[i])

    _rebase_layer_reads(contract, layers, nodes, graph_inputs)
    read = {name for node in nodes for name in node.input if name}
    leaked = sorted(n for n in read if (m := _LAYER_WEIGHT.match(n)) and not layers.start <= int(m.group(1)) < layers.stop)
    if leaked:
        raise EngineBuildError(f"{contract.name}: {layers} reaches weights of other layers ({', '.join(leaked[:3])}): the boundary is not a cut")
    inputs = [n for n in graph_inputs if n in read] + list(boundary_in)
    value_infos = {**graph_inputs, **graph_outputs, **_boundary_infos(contract, cfg, model, [*boundary_in, *boundary_out])}
    sub = helper.make_graph(
        nodes,
        f"{graph.name}_layers_{layers.start}_{layers.stop}",
        [value_infos[n] for n in inputs],
        [value_infos[n] for n in outputs],
        initializer=[initializers[n] for n in initializers if n in read],
    )
    ranged = helper.make_model(sub, opset_imports=list(model.opset_import), functions=list(model.functions))
    ranged.ir_version, ranged.producer_name = model.ir_version, model.producer_name
    return RangeGraph(contract.name, layers, ranged, tuple(inputs), tuple(outputs), boundary_in, boundary_out)


def _rebase_layer_reads(contract: GraphContract, layers: LayerRange, nodes: list, graph_inputs: dict) -> None:
    """Shape-only reads of another layer's input (the prologue's ``past_key.0``) -> this range's first layer."""
    for node in nodes:
        for slot, name in enumerate(node.input):
            match = _LAYER_NAME.match(name)
            if name not in graph_inputs or match is None or layers.start <= int(match.group(2)) < layers.stop:
                continue
            if node.op_type != "Shape":
                raise EngineBuildError(
                    f"{contract.name}: {layers} reads {name!r} (a {node.op_type} node), an input of a layer outside the range"
                )
            node.input[slot] = f"{match.group(1)}.{layers.start}"


def _boundary_infos(contract: GraphContract, cfg: VideoXLConfig, model: onnx.ModelProto, names: list[str]) -> dict:
    float_type = next(
        vi.type.tensor_type.elem_type for vi in model.graph.input if vi.name.startswith("past_key.")
    )
    by_template = {spec.name.rsplit(".", 1)[0]: spec for spec in contract.boundary}
    infos = {}
    for name in names:
        spec = by_template[name.rsplit(".", 1)[0]]
        elem = float_type if spec.dtype == "float" else _ELEM[spec.dtype]
        infos[name] = helper.make_tensor_value_info(name, elem, spec.shape(cfg))
    return infos


def split_layers(
    model: onnx.ModelProto, contract: GraphContract, cfg: VideoXLConfig, *,
    max_weight_bytes: int | None = None, layers_per_engine: int | None = None,
) -> list[RangeGraph]:
    """Cut ``model`` into consecutive ranges: ``layers_per_engine`` layers each, or the fewest ranges whose
    weights (the embeddings and lm_head included where a range owns them) each stay within
    ``max_weight_bytes``, with the cuts placed so that the largest range is as small as it can be."""
    total = cfg.num_hidden_layers
    if layers_per_engine is not None:
        if layers_per_engine < 1:
            raise EngineBuildError(f"--layers-per-engine must be at least 1, got {layers_per_engine}")
        cuts = list(range(0, total, layers_per_engine)) + [total]
    elif max_weight_bytes is None:
        cuts = [0, total]
    else:
        cuts = _balanced_cuts(model, contract, cfg, max_weight_bytes)
    return [extract_range(model, contract, cfg, LayerRange(a, b)) for a, b in zip(cuts, cuts[1:])]


def _balanced_cuts(model: onnx.ModelProto, contract: GraphContract, cfg: VideoXLConfig, max_weight_bytes: int) -> list[int]:
    """Layer cuts [0, ..., L]: the fewest ranges within ``max_weight_bytes``, then the smallest largest range.

    A range's initializers are the union of its layers' one-layer ranges' (its nodes are theirs), so the
    bytes of any range come from one extraction per layer.
    """
    total = cfg.num_hidden_layers
    per_layer = []
    for layer in range(total):
        part = extract_range(model, contract, cfg, LayerRange(layer, layer + 1))
        per_layer.append({t.name: initializer_bytes_of(t) for t in part.model.graph.initializer})
        if sum(per_layer[-1].values()) > max_weight_bytes:
            raise EngineBuildError(
                f"{contract.name}: layer {layer} alone holds {sum(per_layer[-1].values()):,} bytes of weights (with the "
                f"embeddings or lm_head its range owns), more than --max-engine-weights {max_weight_bytes:,}"
            )

    def greedy(limit: int) -> list[int]:
        cuts, held = [0], {}
        for layer, weights in enumerate(per_layer):
            grown = held | weights
            if layer > cuts[-1] and sum(grown.values()) > limit:
                cuts.append(layer)
                grown = dict(weights)
            held = grown
        return cuts + [total]

    fewest = len(greedy(max_weight_bytes))
    low, high = max(sum(w.values()) for w in per_layer), max_weight_bytes
    while low < high:  # the smallest limit that needs no more ranges than the greedy cut at the maximum
        middle = (low + high) // 2
        low, high = (low, middle) if len(greedy(middle)) <= fewest else (middle + 1, high)
    return greedy(low)


def write_range(part: RangeGraph, onnx_dir: Path) -> Path:
    """``part`` as ``onnx_dir/{graph}.layers_AA-BB.onnx`` beside the external data it references,
    checked with the path-based ONNX checker; an identical file already there is kept."""
    path = onnx_dir / part.layers.file(part.graph)
    data = part.model.SerializeToString()
    if not (path.is_file() and path.read_bytes() == data):
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        partial.write_bytes(data)
        os.replace(partial, path)
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as err:
        raise EngineBuildError(f"{path}: the extracted {part.layers} graph fails the ONNX checker: {err}") from err
    return path
