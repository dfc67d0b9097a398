"""Arena layout and the first-fit allocator (pure Python), and CUDA errors without a GPU."""

from __future__ import annotations

import pytest

from videoxl.runtime.cuda_memory import (
    ALIGNMENT,
    ArenaLayout,
    ArenaOverflowError,
    CudaError,
    FirstFitAllocator,
    KVSlabs,
    align_up,
    check,
)
from videoxl.runtime.device import gpu_usable


def test_regions_are_placed_in_order_on_256_byte_boundaries():
    layout = ArenaLayout(10_000)
    a = layout.add("weights", 1000)
    b = layout.add("activations", 1)
    c = layout.add("mixed", 512)
    assert (a.offset, b.offset, c.offset) == (0, 1024, 1280)
    assert all(r.offset % ALIGNMENT == 0 for r in (a, b, c))
    assert layout.used == 1792 and layout.free == 10_000 - 1792
    assert layout["mixed"] is c and "weights" in layout and "io" not in layout


def test_zero_sized_regions_and_base_offsets():
    inner = ArenaLayout(4096, base=1_048_576, label="region 'io'")
    empty = inner.add("nothing", 0)
    logits = inner.add("logits", 100)
    assert empty.offset == logits.offset == 1_048_576  # an empty region takes no room
    assert inner.add("ids", 8).offset == 1_048_576 + 256


def test_overflow_names_the_region_and_the_missing_bytes():
    layout = ArenaLayout(4096, label="device arena")
    layout.add("weights", 3000)
    with pytest.raises(ArenaOverflowError) as err:
        layout.add("mixed", 2000)
    message = str(err.value)
    # weights end at 3000, mixed would start at 3072 and end at 5072: 976 bytes over 4096
    assert "'mixed'" in message and "976 bytes" in message and "weights" in message
    assert "mixed" not in layout.regions  # nothing placed on failure
    assert layout.add("io", 1024).offset == 3072  # exactly fills the arena


def test_duplicate_and_negative_regions_are_refused():
    layout = ArenaLayout(1024)
    layout.add("io", 10)
    with pytest.raises(ValueError, match="already placed"):
        layout.add("io", 10)
    with pytest.raises(ValueError, match="asks for -1"):
        layout.add("x", -1)
    with pytest.raises(ValueError, match="power of two"):
        ArenaLayout(1024, alignment=100)
    with pytest.raises(KeyError, match="no region 'kv'"):
        layout["kv"]


def test_only_the_last_region_shrinks():
    layout = ArenaLayout(1 << 20)
    layout.add("weights", 1 << 19)
    shrunk = layout.shrink_last("weights", 1000)
    assert (shrunk.offset, shrunk.nbytes) == (0, 1000)
    assert layout.add("activations", 10).offset == 1024
    with pytest.raises(ValueError, match="only the last region"):
        layout.shrink_last("weights", 10)
    with pytest.raises(ValueError, match="cannot shrink"):
        layout.shrink_last("activations", 11)


def test_align_up():
    assert [align_up(v) for v in (0, 1, 256, 257)] == [0, 256, 256, 512]
    assert align_up(5, 4) == 8


def test_first_fit_allocates_aligned_reuses_and_merges():
    alloc = FirstFitAllocator(4096)
    a = alloc.allocate(100)
    b = alloc.allocate(300)
    c = alloc.allocate(10, 1024)  # stricter alignment than the region's
    assert (a, b, c) == (0, 256, 1024)
    assert alloc.high_water == 1280 and alloc.used == 256 + 512 + 256
    alloc.release(b)
    assert alloc.allocate(200) == 256  # first fit reuses the hole
    alloc.release(a)
    alloc.release(256)
    assert alloc.allocate(768) == 0  # freed neighbours merged into one block
    assert alloc.allocate(5000) is None and alloc.failed_request == 5000
    with pytest.raises(ValueError, match="not allocated"):
        alloc.release(12345)


def test_first_fit_shrinks_to_its_high_water_mark():
    alloc = FirstFitAllocator(1 << 20)
    alloc.allocate(1000)
    alloc.shrink(alloc.high_water)
    assert alloc.capacity == 1024 and alloc.allocate(1) is None
    with pytest.raises(ValueError, match="cannot shrink"):
        alloc.shrink(512)


def test_kv_slabs_interleave_layers_on_aligned_slabs():
    slabs = KVSlabs(ptr=1 << 20, layers=3, capacity=10, row_bytes=100)  # 1000 B per slab -> 1024
    assert KVSlabs.nbytes(3, 10, 100) == 6 * 1024
    assert slabs.pitch == 2048
    assert slabs.key(0) == 1 << 20 and slabs.value(0) == (1 << 20) + 1024
    assert slabs.key(2, 3) == (1 << 20) + 4 * 1024 + 300
    assert slabs.key(1, 0) - slabs.key(0, 0) == slabs.pitch  # one 2-D copy walks the layers
    assert all(slabs.key(layer) % ALIGNMENT == 0 for layer in range(3))
    assert slabs.value(2, 10) == (1 << 20) + 6 * 1024 - 24  # one past the last row
    with pytest.raises(IndexError):
        slabs.key(3)
    with pytest.raises(IndexError):
        slabs.value(0, 11)


def test_check_unpacks_results_and_names_errors():
    runtime = pytest.importorskip("cuda.bindings.runtime")
    ok, bad = runtime.cudaError_t.cudaSuccess, runtime.cudaError_t.cudaErrorMemoryAllocation
    assert check((ok,)) is None
    assert check((ok, 7)) == 7
    assert check((ok, 1, 2)) == (1, 2)
    with pytest.raises(CudaError, match=r"cudaMalloc\(1 GiB\) failed: cudaErrorMemoryAllocation \(2\)"):
        check((bad, None), "cudaMalloc(1 GiB)")


@pytest.mark.skipif(gpu_usable(), reason="checks the behaviour without a usable GPU")
def test_device_arena_without_a_gpu_raises_cuda_error():
    pytest.importorskip("cuda.bindings.runtime")
    from videoxl.runtime.cuda_memory import DeviceArena

    with pytest.raises(CudaError, match="cudaMalloc.*failed: cudaError"):
        DeviceArena(1 << 20)
