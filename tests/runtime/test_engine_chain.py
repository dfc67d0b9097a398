"""EngineChain's bookkeeping with stand-in range engines (the whole chain on a simulated device is in
test_trt_backend.py: test_simulated_layer_range_engines_give_the_onnxruntime_tokens)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from videoxl.runtime.engine_chain import EngineChain


@dataclass(frozen=True)
class _Tensor:
    name: str
    is_input: bool
    max: tuple[int, ...]


@dataclass
class _Context:
    shapes: dict = field(default_factory=dict)
    memory: tuple | None = None

    def set_device_memory(self, ptr: int, nbytes: int) -> None:
        self.memory = (ptr, nbytes)

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return (self.shapes["input_ids"][0], 8)  # hidden.i: (tokens, hidden)


class _Part:
    """A range engine: its tensors, and a log of what it was given."""

    def __init__(self, inputs: list[str], outputs: list[str], scratch: int, log: list) -> None:
        self.tensors = {n: _Tensor(n, True, (64, 8) if n.startswith("hidden") else (64,)) for n in inputs}
        self.tensors |= {n: _Tensor(n, False, (64, 8)) for n in outputs}
        self.host_inputs, self.scratch, self.log = frozenset(), scratch, log

    def new_context(self) -> _Context:
        return _Context()

    def device_memory_bytes(self) -> int:
        return self.scratch

    def check_shapes(self, shapes: dict) -> None:
        unknown = set(shapes) - set(self.tensors)
        assert not unknown, unknown

    def set_shapes(self, context: _Context, shapes: dict) -> None:
        self.check_shapes(shapes)
        context.shapes = dict(shapes)

    def enqueue(self, context: _Context, addresses: dict, stream) -> None:
        self.log.append((self, dict(context.shapes), dict(addresses)))


def _chain(log: list, **kwargs) -> tuple[EngineChain, list[_Part]]:
    parts = [
        _Part(["input_ids", "past_key.0"], ["present_key.0", "hidden.1"], 100, log),
        _Part(["input_ids", "past_key.1", "hidden.1"], ["present_key.1", "logits"], 300, log),
    ]
    return EngineChain("decode", parts, [((), ("hidden.1",)), (("hidden.1",), ())], **kwargs), parts


def test_the_chain_is_one_engine_to_the_backend():
    log: list = []
    chain, (first, second) = _chain(log, declared_inputs=["input_ids", "past_key.0", "past_key.1", "past_value.1"])
    assert sorted(chain.tensors) == ["input_ids", "logits", "past_key.0", "past_key.1", "present_key.0", "present_key.1"]
    assert list(chain.boundary) == ["hidden.1"] and chain.boundary["hidden.1"].max == (64, 8)  # the reader's profile max
    assert chain.device_memory_bytes() == 300  # one scratch, the largest range's
    chain.context.set_device_memory(7, 300)
    assert all(c.memory == (7, 300) for c in chain.context.contexts)

    with pytest.raises(RuntimeError, match="bind_boundary"):
        chain.enqueue(chain.context, {}, None)
    chain.bind_boundary({"hidden.1": 4096})
    shapes = {"input_ids": (3,), "past_key.0": (10,), "past_key.1": (10,), "past_value.1": (10,)}  # past_value.1: read by no range
    chain.set_shapes(chain.context, shapes)
    addresses = {"input_ids": 1, "past_key.0": 2, "past_key.1": 3, "present_key.0": 4, "present_key.1": 5, "logits": 6}
    chain.enqueue(chain.context, addresses, None)
    (ran_first, shapes_first, given_first), (ran_second, shapes_second, given_second) = log
    assert (ran_first, ran_second) == (first, second)  # in layer order
    assert shapes_second["hidden.1"] == (3, 8)  # the shape the range before gives out
    assert given_first["hidden.1"] == given_second["hidden.1"] == 4096  # one buffer: written, then read
    assert "past_key.1" not in given_first and "past_key.0" not in given_second
    with pytest.raises(KeyError, match="no input 'past_key.9'"):
        chain.check_shapes({"past_key.9": (10,)})


def test_a_chain_that_does_not_connect_is_refused():
    log: list = []
    parts = _chain(log)[1]
    with pytest.raises(ValueError, match="takes \\['hidden.1'\\] but the range before gives \\[\\]"):
        EngineChain("decode", parts, [((), ()), (("hidden.1",), ())])
    with pytest.raises(ValueError, match="cut short"):
        EngineChain("decode", parts[:1], [((), ("hidden.1",))])
    with pytest.raises(ValueError, match="has no tensor 'hidden.2'"):
        EngineChain("decode", parts, [((), ("hidden.2",)), (("hidden.2",), ())])
