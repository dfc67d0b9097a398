"""The simulated device keeps CUDA's ordering rules, and only those: what it lets race does race."""

from __future__ import annotations

import numpy as np
import pytest

from fake_cuda import FakeCudart, cudaError_t, view

H2D, D2H, D2D = 1, 2, 3


@pytest.fixture
def device():
    fake = FakeCudart(delay_ms=(0.0, 0.2), seed=1)
    yield fake
    assert fake.shutdown() == []


def _new(device, call, *args) -> int:
    err, value = getattr(device, call)(*args)
    assert err == cudaError_t.cudaSuccess
    return value


def test_a_copy_reads_its_source_when_the_stream_reaches_it(device):
    stream = _new(device, "cudaStreamCreateWithFlags", 1)
    host, dev = _new(device, "cudaMallocHost", 64), _new(device, "cudaMalloc", 64)
    device.set_delay(stream, 20.0)  # the stream is far behind the host
    view(host, (16,), np.float32)[...] = 1.0
    assert device.cudaMemcpyAsync(dev, host, 64, H2D, stream) == (cudaError_t.cudaSuccess,)
    view(host, (16,), np.float32)[...] = 2.0  # overwritten before the copy ran
    assert device.cudaStreamSynchronize(stream) == (cudaError_t.cudaSuccess,)
    np.testing.assert_array_equal(view(dev, (16,), np.float32), 2.0)


def test_an_event_wait_orders_two_streams_and_its_absence_races(device):
    slow, fast = _new(device, "cudaStreamCreateWithFlags", 1), _new(device, "cudaStreamCreateWithFlags", 1)
    event = _new(device, "cudaEventCreateWithFlags", 2)
    host, a, b = _new(device, "cudaMallocHost", 64), _new(device, "cudaMalloc", 64), _new(device, "cudaMalloc", 64)
    device.set_delay(slow, 15.0)
    device.set_delay(fast, 0.0)
    for value, wait in ((7.0, True), (9.0, False)):
        view(host, (16,), np.float32)[...] = value
        device.cudaMemcpyAsync(a, host, 64, H2D, slow)
        device.cudaEventRecord(event, slow)
        if wait:
            device.cudaStreamWaitEvent(fast, event, 0)
        device.cudaMemcpyAsync(b, a, 64, D2D, fast)
        device.cudaDeviceSynchronize()
        np.testing.assert_array_equal(view(a, (16,), np.float32), value)
        # with the wait, b gets the upload (7, not the 0 a held before); without it, the copy runs
        # before the second upload lands and b gets the old contents of a (7, not 9)
        np.testing.assert_array_equal(view(b, (16,), np.float32), 7.0)


def test_capture_records_and_each_launch_replays(device):
    stream = _new(device, "cudaStreamCreateWithFlags", 1)
    host, dev = _new(device, "cudaMallocHost", 8), _new(device, "cudaMalloc", 8)
    counter = view(host, (1,), np.int64)
    device.cudaStreamBeginCapture(stream, 1)
    device.cudaMemcpyAsync(dev, host, 8, H2D, stream)
    assert device.cudaStreamSynchronize(stream) == (cudaError_t.cudaErrorStreamCaptureUnsupported,)  # as CUDA: invalidates
    assert device.cudaStreamEndCapture(stream) == (cudaError_t.cudaErrorStreamCaptureInvalidated, None)

    device.cudaStreamBeginCapture(stream, 1)
    device.cudaMemcpyAsync(dev, host, 8, H2D, stream)
    device.launch(stream, lambda: view(dev, (1,), np.int64).__iadd__(1), "add one")
    device.cudaMemcpyAsync(host, dev, 8, D2H, stream)
    graph = _new(device, "cudaStreamEndCapture", stream)
    device.cudaStreamSynchronize(stream)
    assert counter[0] == 0  # recorded, not run
    executable = _new(device, "cudaGraphInstantiate", graph, 0)
    for expected in (1, 2, 3):
        device.cudaGraphLaunch(executable, stream)
        device.cudaStreamSynchronize(stream)
        assert counter[0] == expected  # each replay reads what the previous one wrote back
    assert device.graph_launches == 3


def test_copies_must_name_the_right_memory(device):
    stream = _new(device, "cudaStreamCreateWithFlags", 1)
    dev, pageable = _new(device, "cudaMalloc", 64), np.zeros(16, np.float32)
    assert device.cudaMemcpyAsync(dev, dev, 64, H2D, stream) == (cudaError_t.cudaErrorInvalidValue,)
    assert device.cudaMemcpyAsync(dev + 32, pageable.ctypes.data, 64, H2D, stream) == (cudaError_t.cudaErrorInvalidValue,)
    device.cudaStreamBeginCapture(stream, 1)
    assert device.cudaMemcpyAsync(dev, pageable.ctypes.data, 64, H2D, stream) == (cudaError_t.cudaErrorStreamCaptureUnsupported,)
    device.cudaStreamEndCapture(stream)


def test_a_failing_kernel_is_a_sticky_fault(device):
    stream = _new(device, "cudaStreamCreateWithFlags", 1)
    ptr = _new(device, "cudaMalloc", 16)
    device.launch(stream, lambda: 1 / 0, "divides by zero")
    assert device.cudaStreamSynchronize(stream) == (cudaError_t.cudaErrorLaunchFailure,)
    assert isinstance(device.fault, ZeroDivisionError)
    assert device.cudaMalloc(16) == (cudaError_t.cudaErrorLaunchFailure, None)  # every later call fails
    assert device.cudaFree(ptr) == (cudaError_t.cudaErrorLaunchFailure,)
    assert device.unreleased() == [f"stream 0x{stream:x}"]  # the free was tried, the stream was not
