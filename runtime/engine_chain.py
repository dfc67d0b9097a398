"""An LLM graph built as layer-range engines, run as one engine (the TensorRT backend's ``_Engine`` interface).

``videoxl build`` cuts an LLM graph whose weights exceed its per-engine limit into ranges of
decoder layers (``videoxl.engines.ranges``); the manifest lists them in order with the boundary
tensors each takes in and gives out. The chain runs them one after another on the caller's
stream, each range's boundary outputs written into a buffer the next range reads::

    inputs ──> [layers 0..a) ──hidden.a──> [layers a..b) ──hidden.b──> ... ──> [layers ..L) ──> logits
               (+ present KV of its layers, bound in place, exactly as for one engine)

To the backend the chain looks like one engine: ``tensors`` are the graph's own inputs and
outputs (the union over the ranges; a KV tensor belongs to the range of its layer), ``context``
is a group of one context per range, ``enqueue`` queues every range, so a CUDA graph captured
around it records the whole chain. The boundary tensors (``boundary``) get device buffers from
the backend at their profile maximum (``bind_boundary``). The ranges run one at a time, so their
contexts share the backend's one activations scratch: ``device_memory_bytes`` is the largest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class ChainContext:
    """One execution context per range, used together (what a captured decode graph owns)."""

    def __init__(self, contexts: Sequence[Any]) -> None:
        self.contexts = list(contexts)

    def set_device_memory(self, ptr: int, nbytes: int) -> None:
        for context in self.contexts:  # one scratch: the ranges run one after another on one stream
            context.set_device_memory(ptr, nbytes)

    def is_stream_capturable(self, stream: int) -> bool:
        return all(getattr(c, "is_stream_capturable", lambda s: True)(stream) for c in self.contexts)


class EngineChain:
    """Layer-range engines (each an ``_Engine`` of the TensorRT backend) behaving as one."""

    def __init__(
        self, graph: str, parts: Sequence[Any], boundaries: Sequence[tuple[Sequence[str], Sequence[str]]], *,
        declared_inputs: Sequence[str] = (),
    ) -> None:
        """``parts`` in layer order; ``boundaries[i]`` = (tensors part i takes in, tensors it gives out).

        ``declared_inputs``: the graph's inputs by its contract. One that no range reads (score's last
        layer needs no values: its output is only the attention mass) is accepted and not bound.
        """
        self.graph, self.parts = graph, list(parts)
        if len(boundaries) != len(self.parts) or not self.parts:
            raise ValueError(f"{graph}: {len(self.parts)} range engines but {len(boundaries)} boundary entries")
        self._in = [tuple(b[0]) for b in boundaries]
        self._out = [tuple(b[1]) for b in boundaries]
        for i, part in enumerate(self.parts):
            expected_in = self._out[i - 1] if i else ()
            if self._in[i] != expected_in:
                raise ValueError(f"{graph}: range {i} takes {list(self._in[i])} but the range before gives {list(expected_in)}")
            missing = [n for n in (*self._in[i], *self._out[i]) if n not in part.tensors]
            if missing:
                raise ValueError(f"{graph}: range engine {i} has no tensor {missing[0]!r}")
        if self._out[-1]:
            raise ValueError(f"{graph}: the last range gives out {list(self._out[-1])}: the chain is cut short")
        crossing = {n for names in self._in for n in names}
        self.tensors: dict[str, Any] = {}
        for part in self.parts:
            for name, tensor in part.tensors.items():
                if name not in crossing:
                    self.tensors.setdefault(name, tensor)
        # the buffer of each boundary tensor, sized by the range that reads it (its profile maximum)
        self.boundary = {name: part.tensors[name] for part, names in zip(self.parts, self._in) for name in names}
        self._boundary_address: dict[str, int] = {}
        self.unread = frozenset(declared_inputs) - set(self.tensors)
        self.host_inputs = frozenset(n for part in self.parts for n in part.host_inputs if n not in crossing)
        self.context = self.new_context()

    def bind_boundary(self, addresses: dict[str, int]) -> None:
        """The device buffers of the boundary tensors (fixed for the backend's life)."""
        missing = sorted(set(self.boundary) - set(addresses))
        if missing:
            raise ValueError(f"{self.graph}: no buffer for boundary tensors {missing}")
        self._boundary_address = dict(addresses)

    def new_context(self) -> ChainContext:
        return ChainContext([part.new_context() for part in self.parts])

    def device_memory_bytes(self) -> int:
        return max(part.device_memory_bytes() for part in self.parts)

    def inputs(self) -> list:
        return [t for t in self.tensors.values() if t.is_input]

    def check_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        for part in self.parts:
            part.check_shapes({n: s for n, s in shapes.items() if n in part.tensors})
        unknown = sorted(set(shapes) - set(self.tensors) - self.unread)
        if unknown:
            raise KeyError(f"{self.graph} engines have no input {unknown[0]!r}")

    def set_shapes(self, context: ChainContext, shapes: dict[str, tuple[int, ...]]) -> None:
        """Each range's own inputs, then its boundary inputs at the shapes the range before gives out."""
        self.check_shapes(shapes)
        given: dict[str, tuple[int, ...]] = {}
        for part, part_context, takes, gives in zip(self.parts, context.contexts, self._in, self._out):
            own = {n: s for n, s in shapes.items() if n in part.tensors}
            part.set_shapes(part_context, own | {n: given[n] for n in takes})
            given = {n: tuple(part_context.get_tensor_shape(n)) for n in gives}

    def enqueue(self, context: ChainContext, addresses: dict[str, int], stream) -> None:
        """Every range in layer order on ``stream``; boundary tensors through the chain's buffers."""
        if not self._boundary_address and self.boundary:
            raise RuntimeError(f"{self.graph}: the boundary buffers were never bound (bind_boundary)")
        for part, part_context, takes, gives in zip(self.parts, context.contexts, self._in, self._out):
            own = {n: a for n, a in addresses.items() if n in part.tensors}
            part.enqueue(part_context, own | {n: self._boundary_address[n] for n in (*takes, *gives)}, stream)
