"""Prepared-video cache: same answers from memory and disk, keys that never mix videos or settings, corruption rebuilt."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from videoxl.runtime.ort_backend import OnnxRuntimeBackend
from videoxl.runtime.pipeline import InferenceOptions, Pipeline
from videoxl.runtime.prepared_cache import (
    DATA_FILE,
    META_FILE,
    PreparedCache,
    backend_fingerprint,
    read_entry,
    video_content_hash,
)
from videoxl.sampling import GenerationConfig
from videoxl.text import load_tokenizer
from videoxl.video import open_video

OPTIONS = InferenceOptions(dense_blocks=1, chunk_groups=2, window_chunks=1, block_groups=2)
SAMPLING = {"fps": 1.0, "max_frames": 16}
GEN = GenerationConfig(max_new_tokens=6, stop_at_eos=False)


@pytest.fixture(scope="module")
def pipeline(tiny_onnx):
    return Pipeline(OnnxRuntimeBackend(tiny_onnx), load_tokenizer(tiny_onnx))


def _video(pipeline, path):
    cfg = pipeline.config
    return open_video(path, image_size=cfg.image_size, fps=SAMPLING["fps"], max_fps=cfg.max_fps, max_frames=SAMPLING["max_frames"])


def test_disk_entry_round_trips_and_answers_alike(pipeline, synthetic_video, tmp_path):
    backend = pipeline.backend
    cache = PreparedCache(fingerprint=backend_fingerprint(backend), memory_budget_bytes=0, directory=tmp_path)
    key = cache.key(video_hash=video_content_hash(synthetic_video), sampling=SAMPLING, options=OPTIONS)
    fresh, tier = cache.get_or_prepare(key, backend, lambda: pipeline.prepare(_video(pipeline, synthetic_video), options=OPTIONS))
    assert tier is None and (tmp_path / key / META_FILE).is_file()
    loaded, tier = cache.get(key, backend)
    assert tier == "disk"
    for name, array in fresh.store.state().items():
        np.testing.assert_array_equal(loaded.store.state()[name], array, err_msg=name)
    np.testing.assert_array_equal(loaded.layout.input_ids, fresh.layout.input_ids)
    assert loaded.options == fresh.options and loaded.report.frames == fresh.report.frames
    expected = pipeline.ask(fresh, "What colour?", gen=GEN)
    assert pipeline.ask(loaded, "What colour?", gen=GEN).token_ids == expected.token_ids


def test_keys_separate_content_sampling_options_and_model(pipeline, synthetic_video, tmp_path):
    cache = PreparedCache(fingerprint=backend_fingerprint(pipeline.backend))
    video_hash = video_content_hash(synthetic_video)
    base = cache.key(video_hash=video_hash, sampling=SAMPLING, options=OPTIONS)
    assert cache.key(video_hash=video_hash, sampling=dict(SAMPLING), options=OPTIONS) == base
    # decode-time choices share the prefill, so they share the entry
    assert cache.key(video_hash=video_hash, sampling=SAMPLING, options=InferenceOptions(
        dense_blocks=3, decode="dense", chunk_groups=2, window_chunks=1, block_groups=2)) == base
    assert cache.key(video_hash=video_hash, sampling={**SAMPLING, "fps": 2.0}, options=OPTIONS) != base
    assert cache.key(video_hash=video_hash, sampling=SAMPLING, options=InferenceOptions(chunk_groups=3)) != base
    assert PreparedCache(fingerprint="another model").key(video_hash=video_hash, sampling=SAMPLING, options=OPTIONS) != base
    changed = shutil.copy(synthetic_video, tmp_path / "clip.mp4")
    assert video_content_hash(changed) == video_hash  # same bytes, another path
    with open(changed, "r+b") as f:  # same size; the mtime moves, so the remembered hash is not reused
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    assert video_content_hash(changed) != video_hash


def test_memory_lru_by_bytes(pipeline, synthetic_video):
    prepared = pipeline.prepare(_video(pipeline, synthetic_video), options=OPTIONS)
    from videoxl.runtime.prepared_cache import prepared_nbytes

    size = prepared_nbytes(prepared)
    cache = PreparedCache(fingerprint="m", memory_budget_bytes=2 * size + size // 2)  # room for two
    for key in ("a", "b", "c"):
        cache.put(key, prepared)
    assert cache.stats.memory_entries == 2 and cache.stats.memory_bytes == 2 * size
    assert cache.get("a", pipeline.backend) == (None, None)  # least recently used, dropped
    assert cache.get("b", pipeline.backend)[1] == "memory"


@pytest.mark.parametrize("damage", ["data_byte", "truncated", "meta_field", "missing_meta"])
def test_corrupt_entry_is_deleted_and_rebuilt(pipeline, synthetic_video, tmp_path, damage):
    backend = pipeline.backend
    cache = PreparedCache(fingerprint=backend_fingerprint(backend), directory=tmp_path)
    key = cache.key(video_hash=video_content_hash(synthetic_video), sampling=SAMPLING, options=OPTIONS)
    prepare = lambda: pipeline.prepare(_video(pipeline, synthetic_video), options=OPTIONS)  # noqa: E731
    expected = pipeline.ask(cache.get_or_prepare(key, backend, prepare)[0], "Why?", gen=GEN).token_ids
    data, meta = tmp_path / key / DATA_FILE, tmp_path / key / META_FILE
    if damage == "data_byte":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        data.write_bytes(raw)
    elif damage == "truncated":
        data.write_bytes(data.read_bytes()[:-100])
    elif damage == "meta_field":
        fields = json.loads(meta.read_text())
        fields["layout"]["suffix_start"] += 1
        meta.write_text(json.dumps(fields))
    else:
        meta.unlink()
    with pytest.raises(ValueError):
        read_entry(tmp_path / key, key, backend)
    cache.clear_memory()
    rebuilt, tier = cache.get_or_prepare(key, backend, prepare)
    assert tier is None and cache.stats.corrupt == 1
    assert pipeline.ask(rebuilt, "Why?", gen=GEN).token_ids == expected
    assert read_entry(tmp_path / key, key, backend) is not None  # written again, whole


def test_crash_mid_write_leaves_nothing_that_loads(pipeline, synthetic_video, tmp_path, monkeypatch):
    backend = pipeline.backend
    cache = PreparedCache(fingerprint=backend_fingerprint(backend), directory=tmp_path)
    prepared = pipeline.prepare(_video(pipeline, synthetic_video), options=OPTIONS)

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr("videoxl.runtime.prepared_cache.json.dump", crash)
    with pytest.raises(OSError, match="disk full"):
        cache.put("k", prepared)
    assert list(tmp_path.iterdir()) == []
    cache.clear_memory()
    assert cache.get("k", backend) == (None, None)


def test_store_state_refuses_a_mismatched_shape(pipeline, synthetic_video):
    from videoxl.runtime.kv_store import TwoTierKVStore

    prepared = pipeline.prepare(_video(pipeline, synthetic_video), options=OPTIONS)
    state = dict(prepared.store.state())
    state["key.0"] = state["key.0"][:-1]
    with pytest.raises(ValueError, match=r"KV state key.0: expected float32\["):
        TwoTierKVStore.from_state(pipeline.backend, pipeline.config, prepared.layout, block_groups=2, state=state)


def test_a_kept_video_whose_kv_memory_was_reused_is_not_handed_out(pipeline, synthetic_video, monkeypatch):
    """A backend that keeps one video's KV at a time (TensorRT) reuses its memory for the next video:
    the memory entry of the earlier one is dropped, not handed out."""
    cache = PreparedCache(fingerprint="f", memory_budget_bytes=1 << 30)
    prepared = pipeline.prepare(_video(pipeline, synthetic_video), options=OPTIONS)
    cache.put("k", prepared, to_disk=False)
    assert cache.get("k", pipeline.backend)[1] == "memory"
    monkeypatch.setattr(type(prepared.store.cache), "live", property(lambda self: False))
    assert cache.get("k", pipeline.backend) == (None, None)
