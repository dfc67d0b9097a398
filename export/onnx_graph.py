"""A small helper for writing ONNX graphs by hand (the LLM graphs and the custom-op bodies).

Each `op()` call appends one node and returns fresh output names, so graph code reads like the
math it implements.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 23  # the standard Attention op (GQA, bool mask) that TensorRT maps to fused attention

ONNX_FLOAT = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}


def save_model(model: onnx.ModelProto, path: Path, *, external_data: bool) -> None:
    """Save ``model`` inline, or with every initializer of 1 KiB+ in ``<file>.data``.

    onnx appends to an existing data file: a stale one is removed first, or the graph would point
    past a copy of the old weights (2 GB of dead bytes in a real-size vision graph).
    """
    if external_data:
        data = path.parent / (path.name + ".data")
        data.unlink(missing_ok=True)
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
            location=data.name, size_threshold=1024,
        )
        data.chmod(path.stat().st_mode & 0o777)  # onnx creates it owner-only; readable like its graph
    else:
        onnx.save_model(model, str(path))


class ExternalData:
    """Initializers written straight into one shared `.data` file as graphs are built.

    The prefill and decode graphs hold the same LLM weights: they share one file, and an 8B
    model's weights never sit in a ModelProto (or in memory twice).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "wb")
        self._written: dict[str, tuple[int, int]] = {}
        self._meta: dict[str, tuple[tuple[int, ...], int]] = {}

    def tensor(self, name: str, payload: bytes, dims: tuple[int, ...], elem_type: int) -> onnx.TensorProto:
        if name not in self._written:
            offset = -(-self._file.tell() // 4096) * 4096  # page-aligned, so readers may mmap
            self._file.seek(offset)
            self._file.write(payload)
            self._written[name] = (offset, len(payload))
            self._meta[name] = (tuple(dims), elem_type)
        return self.reference(name)

    def holds(self, name: str) -> bool:
        return name in self._written

    def reference(self, name: str) -> onnx.TensorProto:
        """The initializer of a tensor already in the file (another graph wrote it): no conversion, no I/O."""
        (offset, length), (dims, elem_type) = self._written[name], self._meta[name]
        tensor = onnx.TensorProto(name=name, data_type=elem_type, dims=list(dims), data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        return tensor

    def close(self) -> None:
        self._file.close()


class GraphBuilder:
    def __init__(self, prefix: str = "", external: ExternalData | None = None) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._ids = itertools.count()
        self.prefix = prefix
        self.external = external
        self._initializer_names: set[str] = set()

    def name(self, hint: str) -> str:
        return f"{self.prefix}{hint}_{next(self._ids)}"

    def op(self, op_type: str, *inputs: str, outputs: int | list[str] = 1, domain: str = "", **attrs) -> str | list[str]:
        names = outputs if isinstance(outputs, list) else [self.name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, domain=domain, **attrs))
        return names[0] if len(names) == 1 else names

    def const(self, value, dtype=np.int64) -> str:
        """A small constant as a Constant node (keeps function bodies self-contained)."""
        name = self.name("const")
        self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, dtype=dtype))))
        return name

    def has_initializer(self, name: str) -> bool:
        """True when this graph has ``name``, or now has it because the shared external file already
        holds it (the decode graph reuses the prefill's 15 GB without converting it again)."""
        if name in self._initializer_names:
            return True
        if self.external is not None and self.external.holds(name):
            self._initializer_names.add(name)
            self.initializers.append(self.external.reference(name))
            return True
        return False

    def initializer(self, name: str, array: np.ndarray, onnx_dtype: int | None = None) -> str:
        if onnx_dtype == TensorProto.BFLOAT16:
            payload, elem_type = _bf16_bits(array).tobytes(), TensorProto.BFLOAT16
        else:
            payload, elem_type = np.ascontiguousarray(array).tobytes(), helper.np_dtype_to_tensor_dtype(array.dtype)
        return self.raw_initializer(name, payload, array.shape, elem_type)

    def raw_initializer(self, name: str, payload: bytes, dims: tuple[int, ...], elem_type: int) -> str:
        """An initializer from its raw bytes (packed types such as INT4 have no numpy dtype)."""
        self._initializer_names.add(name)
        if self.external is not None and len(payload) >= 1024:
            tensor = self.external.tensor(name, payload, dims, elem_type)
        else:
            tensor = helper.make_tensor(name, elem_type, dims, payload, raw=True)
        self.initializers.append(tensor)
        return name

    def attr_const(self, attribute: str, kind: int = onnx.AttributeProto.FLOAT) -> str:
        """Constant whose value is the enclosing function's attribute `attribute`."""
        name = self.name(attribute)
        node = helper.make_node("Constant", [], [name])
        ref = onnx.AttributeProto()
        ref.name = "value_float" if kind == onnx.AttributeProto.FLOAT else "value_int"
        ref.ref_attr_name = attribute
        ref.type = kind
        node.attribute.append(ref)
        self.nodes.append(node)
        return name

    # --- little compositions --------------------------------------------------------------
    def dim(self, tensor: str, axis: int) -> str:
        """Size of one axis as a scalar int64."""
        return self.op("Squeeze", self.op("Shape", tensor, start=axis, end=axis + 1), self.const([0]))

    def scalar(self, tensor_1: str) -> str:
        return self.op("Squeeze", tensor_1, self.const([0]))

    def arange(self, start: str, stop: str) -> str:
        return self.op("Range", start, stop, self.const(1))


def _bf16_bits(array: np.ndarray, block: int = 2**24) -> np.ndarray:
    """float32 -> bfloat16 bit patterns with round-to-nearest-even.

    Converted ``block`` elements at a time: the uint32 temporaries of a whole 152064 x 3584
    lm_head would add ~6 GB to the export's peak memory.
    """
    try:  # torch's cast rounds to nearest even too, ~10x faster than the numpy bit arithmetic
        import torch

        source = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        return source.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    except ImportError:
        pass
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32).reshape(-1)
    out = np.empty(bits.shape, dtype=np.uint16)
    for start in range(0, bits.size, block):
        part = bits[start:start + block]
        rounding = ((part >> 16) & 1) + 0x7FFF
        out[start:start + block] = (part + rounding) >> 16
    return out.reshape(np.shape(array))


def value_info(name: str, elem_type: int, shape: list[str | int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)
