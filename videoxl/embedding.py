"""One row of an exported graph's token-embedding table, read without loading the graph's weights.

The ONNX Runtime backend and the engine builder both need the embedding of ``<|vision_pad|>``: a
decode step run on the prefill_chunk graph splices a "visual" row in for every vision_pad it
generates, and that row is the token's own embedding, so the splice is exact (``decode_as_chunk``). The table lives in
the export's external data; one row is ``hidden_size x dtype`` bytes at ``offset + token x row``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper

from videoxl.files import confined_path

EMBEDDING_TABLE = "model.embed_tokens.weight"  # the checkpoint's name, kept by the exporter


def embedding_row(graph_path: str | Path, token: int, *, table: str = EMBEDDING_TABLE) -> np.ndarray:
    """Row ``token`` of initializer ``table`` of the graph at ``graph_path``, in the table's dtype: [hidden]."""
    graph_path = Path(graph_path)
    found = [t for t in onnx.load(str(graph_path), load_external_data=False).graph.initializer if t.name == table]
    if not found:
        raise ValueError(f"{graph_path}: no initializer {table!r} (the token-embedding table); re-export the directory")
    tensor = found[0]
    rows, width = (int(d) for d in tensor.dims)
    if not 0 <= token < rows:
        raise ValueError(f"{graph_path}: token {token} is outside the {rows} rows of {table!r}")
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    row_bytes = width * dtype.itemsize
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return onnx.numpy_helper.to_array(tensor)[token].copy()
    where = {e.key: e.value for e in tensor.external_data}
    with open(confined_path(graph_path.parent, where["location"], what="external data"), "rb") as f:
        f.seek(int(where.get("offset", 0)) + token * row_bytes)
        data = f.read(row_bytes)
    if len(data) != row_bytes:
        raise ValueError(f"{graph_path}: the external data of {table!r} ends before row {token}; re-export the directory")
    return np.frombuffer(data, dtype).copy()


def decode_as_chunk(input_ids: np.ndarray, past_len: int, vision_pad: int, pad_row: np.ndarray) -> dict[str, np.ndarray]:
    """The prefill_chunk inputs of a decode step: the new tokens see every past row [0, past_len), no
    timestamp queries, and each generated ``<|vision_pad|>`` gets ``pad_row`` (its own embedding) as its
    visual row, so the step equals the decode graph's."""
    ids = np.asarray(input_ids, np.int64)
    pads = int(np.count_nonzero(ids == vision_pad))
    return {
        "input_ids": ids,
        "visual_embeds": np.repeat(np.asarray(pad_row)[None], pads, axis=0),  # [pads, hidden]
        "past_len": np.array([past_len], np.int64),
        "visible_past_index": np.arange(past_len, dtype=np.int64),
        "timestamp_query_index": np.zeros(0, np.int64),
    }
