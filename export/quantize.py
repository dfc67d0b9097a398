"""Weight-only quantization of the linears (`videoxl export --weights int8|int4`).

The format (what is quantized, how, and why) is `videoxl.weight_format`; this module does the
arithmetic and writes the graph form both runtimes take::

    <name>.weight.T.q      (in, out)  int8 | int4  --\\
    <name>.weight.T.scale  int4: (in / B, out)      --+-> DequantizeLinear -> MatMul(x, .)
                           int8: (out,)

ONNX Runtime's CPU provider fuses the pair into MatMulNBits (block-wise int4/int8 kernels);
TensorRT turns it into a weight-only GEMM. Rounding is to nearest, ties to even (numpy), with
one scale = absmax / qmax per block, so every weight is within scale / 2 of its original.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from videoxl.export.onnx_graph import save_model
from videoxl.weight_format import WeightFormat

QMAX = {8: 127, 4: 7}  # symmetric: -8 (int4) and -128 (int8) are never used
ELEM = {8: TensorProto.INT8, 4: TensorProto.INT4}
BF16 = "bf16"
PROJECTOR = ("model.mm_projector.0", "model.mm_projector.2")
SCALE_DTYPE = {TensorProto.FLOAT: np.dtype(np.float32), TensorProto.FLOAT16: np.dtype(np.float16), TensorProto.BFLOAT16: BF16}


def _round_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16 (ties to even), kept as float32."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + ((bits >> 16) & 1) + 0x7FFF) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)


def quantize_weight(w_in_out: np.ndarray, bits: int, block_size: int | None, scale_dtype: np.dtype | str) -> tuple[np.ndarray, np.ndarray]:
    """(in, out) float weight -> (q int8 array holding values in [-qmax, qmax], scale in ``scale_dtype``).

    bits 8: one scale per output channel, shape (out,). bits 4: one per block of ``block_size``
    input rows and output channel, shape (in / block_size, out). The scale is rounded to its stored
    dtype before the weights are divided by it, so dequantization uses exactly the divisor
    (``scale_dtype`` "bf16": float32 values that bf16 holds exactly, written as bf16 by the builder).

    Per element, in float32 throughout: scale = absmax / qmax (1 where absmax is 0), rounded to the
    stored dtype; q = clip(rint(w / scale), -qmax, qmax). The work goes tile by tile (whole blocks,
    about TILE_BYTES each) into one reused float32 buffer, so each weight is read from memory once
    or twice and no full-size float temporary exists (bench/bench_quant_speed.py).
    """
    w = np.asarray(w_in_out, dtype=np.float32)
    k, n = w.shape
    qmax = QMAX[bits]
    q = np.empty((k, n), np.int8)
    scale = np.empty((1 if bits == 8 else k // block_size, n), np.float32 if scale_dtype == BF16 else scale_dtype)
    if bits == 8:  # one block of every row: its absmax takes a first pass, then any rows make a tile
        scale[0] = _scale(_absmax_of_columns(w), qmax, scale_dtype)
    block = 1 if bits == 8 else block_size
    tile_rows, tile_cols = _tile_shape(n, block)
    buf = np.empty(tile_rows * tile_cols, np.float32)
    for r0 in range(0, k, tile_rows):
        for c0 in range(0, n, tile_cols):
            tile = w[r0 : r0 + tile_rows, c0 : c0 + tile_cols]
            cols = slice(c0, c0 + tile.shape[1])
            if bits == 8:
                blocks, scale_rows = tile[None], slice(0, 1)  # (1, rows, c)
            else:  # the tile's blocks' scales from one read while it is in cache
                blocks = tile.reshape(tile.shape[0] // block, block, tile.shape[1])  # (m, B, c), a view
                scale_rows = slice(r0 // block, r0 // block + blocks.shape[0])
                scale[scale_rows, cols] = _scale(np.maximum(blocks.max(axis=1), -blocks.min(axis=1)), qmax, scale_dtype)
            out = buf[: tile.size].reshape(blocks.shape)
            # a true division by the stored scale (not a reciprocal product): ties round as in the format
            np.divide(blocks, scale[scale_rows, cols].astype(np.float32)[:, None, :], out=out)
            np.rint(out, out=out)
            np.clip(out, -qmax, qmax, out=out)
            q[r0 : r0 + tile.shape[0], cols] = out.reshape(tile.shape)  # float32 -> int8, exact for these integers
    return q, (scale[0] if bits == 8 else scale)


TILE_BYTES = 1 << 20  # float32 per tile: the tile and its quotient stay in a 2 MiB L2


def _tile_shape(n: int, block: int) -> tuple[int, int]:
    """(rows, columns) of a tile of the (k, n) weight: whole blocks of rows, about TILE_BYTES."""
    elements = TILE_BYTES // 4
    cols = min(n, max(256, elements // block))  # >= 1 KiB contiguous per row
    return block * max(1, elements // (block * cols)), cols


def _absmax_of_columns(w: np.ndarray) -> np.ndarray:
    """max |w| per column of (k, n) float32, as max(max, -min) over row slabs (no |w| temporary)."""
    k, n = w.shape
    rows = max(1, TILE_BYTES // (4 * n))
    hi, lo = w[:rows].max(axis=0), w[:rows].min(axis=0)
    for r0 in range(rows, k, rows):
        np.maximum(hi, w[r0 : r0 + rows].max(axis=0), out=hi)
        np.minimum(lo, w[r0 : r0 + rows].min(axis=0), out=lo)
    return np.maximum(hi, -lo)


def _scale(absmax: np.ndarray, qmax: int, scale_dtype: np.dtype | str) -> np.ndarray:
    """absmax / qmax in the stored dtype; an all-zero block keeps scale 1 (its values quantize to 0
    and dequantize to exactly 0)."""
    scale = np.where(absmax > 0, absmax / qmax, 1.0)
    return _round_to_bf16(scale) if scale_dtype == BF16 else scale.astype(scale_dtype)


def dequantize_weight(q: np.ndarray, scale: np.ndarray, bits: int, block_size: int | None) -> np.ndarray:
    """What DequantizeLinear computes, in float32 (the reference the tests compare against)."""
    k, n = q.shape
    if bits == 8:
        return q.astype(np.float32) * scale.astype(np.float32)[None]
    return (q.reshape(k // block_size, block_size, n).astype(np.float32) * scale.astype(np.float32)[:, None]).reshape(k, n)


def dequantize_attrs(bits: int, block_size: int | None) -> dict:
    """DequantizeLinear attributes: int8 per output channel (axis 1), int4 block-wise along the input (axis 0)."""
    return {"axis": 1} if bits == 8 else {"axis": 0, "block_size": block_size}


def pack_int4(q: np.ndarray) -> bytes:
    """ONNX INT4 raw data: two values per byte, the first element in the low nibble.

    Each pair of int8 values read as one little-endian uint16 (first value in bits 0..7, second in
    8..15) packs as (v & 0x0F) | ((v >> 4) & 0xF0): contiguous reads, in slabs that stay in cache.
    """
    flat = np.ascontiguousarray(q, dtype=np.int8).reshape(-1)
    if flat.size % 2:
        flat = np.append(flat, np.int8(0))
    pairs = flat.view("<u2")
    packed = np.empty(pairs.size, np.uint8)
    high = np.empty(max(1, min(pairs.size, TILE_BYTES // 2)), np.uint16)
    for start in range(0, pairs.size, high.size):
        v, hi, out = pairs[start : start + high.size], high[: pairs.size - start], packed[start : start + high.size]
        np.right_shift(v, 4, out=hi)  # the second value's low nibble now in bits 4..7
        np.bitwise_and(hi, 0xF0, out=hi)
        np.bitwise_and(v, 0x0F, out=out, casting="unsafe")  # < 16: exact as uint8
        np.bitwise_or(out, hi, out=out, casting="unsafe")  # < 256: exact as uint8
    return packed.tobytes()


def quantized_tensors(
    name: str, w_in_out: np.ndarray, bits: int, block_size: int | None, scale_dtype: np.dtype
) -> tuple[tuple[str, bytes, tuple[int, ...], int], tuple[str, np.ndarray]]:
    """((values name, raw payload, dims, ONNX type), (scale name, scale array)) for one linear."""
    q, scale = quantize_weight(w_in_out, bits, block_size, scale_dtype)
    payload = pack_int4(q) if bits == 4 else q.tobytes()
    return (f"{name}.q", payload, q.shape, ELEM[bits]), (f"{name}.scale", scale)


# --- the projector inside the exported vision graph --------------------------------------------
def quantize_projector(path: Path, state: dict, fmt: WeightFormat, *, external_data: bool = False) -> int:
    """Rewrite the projector's two MatMul weights in ``path`` (the exported vision graph) in place.

    With ``external_data`` the rewritten graph goes straight back to ``<file>.data`` (which it
    replaces); inline, a real-size fp32 vision graph would be at the 2 GB protobuf limit.

    The vision graph comes from torch.export, which renames constants (``val_244``), so each
    projector weight is found by value: the (in, out) initializer equal to the checkpoint weight
    transposed, in the graph's dtype. Exactly one MatMul must read each. Returns the bytes saved.
    """
    if not fmt.quantized:
        return 0
    if external_data:
        stale = {e.value for t in onnx.load(str(path), load_external_data=False).graph.initializer
                 for e in t.external_data if e.key == "location"}
    model = onnx.load(str(path))
    graph = model.graph
    by_name = {t.name: t for t in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in by_name:
            readers.setdefault(node.input[1], []).append(node)
    saved = 0
    for linear in PROJECTOR:
        w = state[f"{linear}.weight"].detach().float().numpy().T
        matches = []
        for init_name in readers:
            t = by_name[init_name]
            if list(t.dims) != list(w.shape):
                continue
            held = numpy_helper.to_array(t)
            if np.array_equal(held.astype(np.float32), w.astype(held.dtype).astype(np.float32)):
                matches.append(init_name)
        if len(matches) != 1 or len(readers[matches[0]]) != 1:
            raise ValueError(
                f"{path.name}: expected one MatMul reading {linear}.weight, found {len(matches)} matching "
                "initializer(s); the vision export changed its form, so the projector cannot be quantized"
            )
        old = by_name[matches[0]]
        held = numpy_helper.to_array(old).astype(np.float32)
        bits = fmt.bits_of(linear)
        (q_name, payload, dims, elem), (s_name, scale) = quantized_tensors(
            f"{linear}.weight.T", held, bits, fmt.block_size, SCALE_DTYPE[old.data_type]
        )
        graph.initializer.remove(old)
        graph.initializer.extend([helper.make_tensor(q_name, elem, dims, payload, raw=True), _scale_tensor(s_name, scale, old.data_type)])
        dq_out = f"{linear}.weight.T.dequantized"
        node = readers[matches[0]][0]
        index = list(graph.node).index(node)
        graph.node.insert(index, helper.make_node("DequantizeLinear", [q_name, s_name], [dq_out], **dequantize_attrs(bits, fmt.block_size)))
        node.input[1] = dq_out
        saved += _nbytes(old) - len(payload) - _nbytes(graph.initializer[-1])
    if external_data:
        for location in stale:  # loaded into memory above; onnx would append to them
            (path.parent / location).unlink()
    save_model(model, path, external_data=external_data)
    return saved


def _scale_tensor(name: str, scale: np.ndarray, elem_type: int) -> onnx.TensorProto:
    if elem_type == TensorProto.BFLOAT16:  # bf16-exact float32 values: the top 16 bits are the bf16 pattern
        bits = (np.ascontiguousarray(scale, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return helper.make_tensor(name, elem_type, scale.shape, bits.tobytes(), raw=True)
    return numpy_helper.from_array(scale, name)


def _nbytes(tensor: onnx.TensorProto) -> int:
    return len(tensor.raw_data) if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).nbytes
