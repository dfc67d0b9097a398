"""Prepared videos kept across questions and restarts: an LRU in memory, optionally entries on disk.

    key = sha256(format | model fingerprint | video content hash | sampling settings | prefill options)

    memory  OrderedDict key -> PreparedVideo, least recently used dropped past `memory_budget_bytes`
    disk    DIR/<key>/data.bin   the arrays, back to back (64-byte aligned)
            DIR/<key>/meta.json  format, key, names/dtypes/shapes/offsets, plain fields, data.bin's sha256

A changed file (content hash), other sampling settings, other prefill options or another model
(the export's or engine manifest's per-graph sha256) give another key, so they never hit. A disk
entry is written into a temporary directory, fsynced and renamed into place: a crash mid-write
leaves no entry that loads. Loading checks the format, the key and both checksums; an entry that
fails is deleted and the video prepared again.

The KV tiers cross this module only through `TwoTierKVStore.state()` / `from_state()`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from videoxl.layout import TokenLayout
from videoxl.backend import Backend
from videoxl.runtime.kv_store import TwoTierKVStore
from videoxl.runtime.pipeline import InferenceOptions, PreparedVideo, RunReport

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: graph contract v2 (one [sparse | dense] buffer per layer, keys stored rotated)
DATA_FILE, META_FILE = "data.bin", "meta.json"
ALIGN = 64  # bytes: every array starts on a cache-line boundary of data.bin
STALE_TMP_S = 3600.0  # temporary directories older than this are left-overs of a crashed writer
# Only these options change the prefill (the KV tiers); the rest (block choice, decode mode) act per question.
PREFILL_OPTION_FIELDS = ("prefill", "prefill_rule", "chunk_groups", "window_chunks", "block_groups")
LAYOUT_ARRAYS = ("input_ids", "group_starts", "group_visual_starts", "group_ends", "is_timestamp", "is_visual")


class CacheEntryError(ValueError):
    """A disk entry that does not load: wrong format, wrong key, bad checksum, truncated."""


# --- identities ----------------------------------------------------------------------------------
_hash_memo: dict[tuple[str, int, int, int], str] = {}
_hash_memo_lock = threading.Lock()


def _file_content_hash(path: Path) -> str:
    """sha256 of the file's bytes, streamed; remembered per (path, inode, size, mtime) so unchanged files hash once."""
    stat = path.stat()
    memo_key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    with _hash_memo_lock:
        known = _hash_memo.get(memo_key)
    if known is not None:
        return known
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    with _hash_memo_lock:
        _hash_memo[memo_key] = digest.hexdigest()
    return digest.hexdigest()


def video_content_hash(path: str | Path) -> str:
    """Content hash of a video file, or of a folder of images (each file's name and bytes, in name order)."""
    path = Path(path).resolve()
    if path.is_dir():
        digest = hashlib.sha256()
        for item in sorted(p for p in path.iterdir() if p.is_file()):
            digest.update(f"{item.name}\0{_file_content_hash(item)}\0".encode())
        return digest.hexdigest()
    return _file_content_hash(path)


def backend_fingerprint(backend: Backend) -> str:
    """Identity of the model behind `backend`: the export's or the engines' per-file sha256, dtype, config.

    Raises ValueError for a backend without a manifest (the PyTorch one): its weights have no fingerprint here.
    """
    artifacts = getattr(backend, "artifacts", None)
    manifest = getattr(backend, "manifest", None)
    if artifacts is not None:  # ONNX Runtime: the export manifest
        source = {"kind": "onnx", "dtype": artifacts.dtype, "model_hash": artifacts.manifest.get("model_hash"),
                  "graphs": {name: g.get("sha256") for name, g in sorted(artifacts.manifest["graphs"].items())}}
    elif isinstance(manifest, Mapping) and "engines" in manifest:  # TensorRT: the engine manifest
        source = {"kind": "engines", "precision": manifest.get("precision"), "model": manifest.get("model"),
                  "engines": {name: e.get("sha256") for name, e in sorted(manifest["engines"].items())}}
    else:
        raise ValueError(f"the prepared-video cache needs ONNX or engine artifacts; the {backend.name} backend has no manifest")
    source["float_dtype"] = np.dtype(backend.float_dtype).str
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()


def sampling_settings(backend: Backend, *, fps: float | None, max_frames: int | None) -> dict[str, Any]:
    """open_video's frame-sampling arguments for `backend` (None: the config's fps, the artifacts' frame limit).

    They are part of the cache key: the same file sampled otherwise is another prepared video.
    """
    cfg = backend.config
    return {"image_size": cfg.image_size, "fps": cfg.fps if fps is None else fps, "max_fps": cfg.max_fps,
            "max_frames": getattr(backend, "max_frames", cfg.max_frames) if max_frames is None else max_frames}


def prepared_key(*, model: str, video_hash: str, sampling: Mapping[str, Any], options: InferenceOptions) -> str:
    """The cache key of one prepared video (hex sha256)."""
    prefill = {name: getattr(options, name) for name in PREFILL_OPTION_FIELDS}
    text = json.dumps({"format": FORMAT_VERSION, "model": model, "video": video_hash,
                       "sampling": dict(sampling), "prefill": prefill}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def prepared_nbytes(prepared: PreparedVideo) -> int:
    """Host bytes a prepared video holds (KV tiers, layout, frame times)."""
    layout = prepared.layout
    return (prepared.store.nbytes + prepared.frame_times.nbytes
            + sum(getattr(layout, name).nbytes for name in LAYOUT_ARRAYS))


# --- disk format ---------------------------------------------------------------------------------
def _options_to_json(options: InferenceOptions) -> dict[str, Any]:
    fields = dataclasses.asdict(options)
    if isinstance(options.dense_blocks, tuple):
        fields["dense_blocks"] = list(options.dense_blocks)
    return fields


def _options_from_json(fields: dict[str, Any]) -> InferenceOptions:
    if isinstance(fields.get("dense_blocks"), list):
        fields = {**fields, "dense_blocks": tuple(fields["dense_blocks"])}
    return InferenceOptions(**fields)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_entry(directory: Path, key: str, prepared: PreparedVideo) -> Path:
    """Write `prepared` as DIR/<key> atomically (temporary directory, fsync, rename); returns the entry."""
    layout, store = prepared.layout, prepared.store
    arrays = {f"layout.{name}": getattr(layout, name) for name in LAYOUT_ARRAYS}
    arrays["frame_times"] = prepared.frame_times
    arrays.update({f"store.{name}": array for name, array in store.state().items()})
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".tmp-{key[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        table, digest, offset = [], hashlib.sha256(), 0
        with open(tmp / DATA_FILE, "wb") as f:
            for name, array in arrays.items():
                data = np.ascontiguousarray(array)
                pad = (-offset) % ALIGN
                if pad:
                    f.write(b"\0" * pad)
                    digest.update(b"\0" * pad)
                    offset += pad
                view = memoryview(data).cast("B") if data.size else b""
                f.write(view)
                digest.update(view)
                table.append({"name": name, "dtype": data.dtype.str, "shape": list(data.shape), "offset": offset})
                offset += data.nbytes
            f.flush()
            os.fsync(f.fileno())
        meta = {
            "format": FORMAT_VERSION,
            "key": key,
            "created": time.time(),
            "data_bytes": offset,
            "data_sha256": digest.hexdigest(),
            "arrays": table,
            "layout": {"prefix_len": layout.prefix_len, "suffix_start": layout.suffix_start},
            # the prefill's own default (Pipeline.prefill), so the store is rebuilt with the same blocks
            "store": {"block_groups": prepared.options.block_groups or store.config.block_groups},
            "options": _options_to_json(prepared.options),
            "report": dataclasses.asdict(prepared.report),
        }
        meta["meta_sha256"] = _meta_digest(meta)
        with open(tmp / META_FILE, "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        final = directory / key
        try:
            tmp.rename(final)
        except OSError:  # another writer got there first with the same content
            shutil.rmtree(tmp, ignore_errors=True)
            return final
        _fsync_dir(directory)
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _meta_digest(meta: dict[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_entry(entry: Path, key: str, backend: Backend) -> PreparedVideo:
    """Load DIR/<key>; CacheEntryError when anything does not check out."""
    try:
        meta = json.loads((entry / META_FILE).read_text())
        data = bytearray((entry / DATA_FILE).read_bytes())  # writable: the arrays are used in place
    except (OSError, ValueError) as err:
        raise CacheEntryError(f"{entry}: unreadable ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise CacheEntryError(f"{entry}: format {meta.get('format') if isinstance(meta, dict) else None}, expected {FORMAT_VERSION}")
    if meta.get("meta_sha256") != _meta_digest(meta):
        raise CacheEntryError(f"{entry}: {META_FILE} checksum mismatch")
    if meta.get("key") != key:
        raise CacheEntryError(f"{entry}: holds key {meta.get('key')}, expected {key}")
    if len(data) != meta["data_bytes"] or hashlib.sha256(data).hexdigest() != meta["data_sha256"]:
        raise CacheEntryError(f"{entry}: {DATA_FILE} checksum mismatch ({len(data)} bytes, expected {meta['data_bytes']})")
    try:
        arrays = {
            a["name"]: np.frombuffer(data, dtype=np.dtype(a["dtype"]), count=int(np.prod(a["shape"], dtype=np.int64)),
                                     offset=a["offset"]).reshape(a["shape"])
            for a in meta["arrays"]
        }
        layout = TokenLayout(
            prefix_len=int(meta["layout"]["prefix_len"]), suffix_start=int(meta["layout"]["suffix_start"]),
            **{name: arrays[f"layout.{name}"] for name in LAYOUT_ARRAYS},
        )
        state = {name[len("store."):]: array for name, array in arrays.items() if name.startswith("store.")}
        store = TwoTierKVStore.from_state(
            backend, backend.config, layout, block_groups=int(meta["store"]["block_groups"]), state=state,
        )
        return PreparedVideo(arrays["frame_times"], layout, store, _options_from_json(meta["options"]), RunReport(**meta["report"]))
    except (KeyError, TypeError, ValueError) as err:
        raise CacheEntryError(f"{entry}: inconsistent entry ({err})") from err


# --- the cache -----------------------------------------------------------------------------------
@dataclass
class CacheStats:
    memory_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    corrupt: int = 0
    memory_bytes: int = 0
    memory_entries: int = 0


class PreparedCache:
    """Prepared videos by key: an LRU in memory under `memory_budget_bytes`, and entries under `directory`.

    Not thread-safe by design beyond its counters: one worker owns the backend and this cache.
    """

    def __init__(self, *, fingerprint: str, memory_budget_bytes: int = 0, directory: str | Path | None = None) -> None:
        if memory_budget_bytes < 0:
            raise ValueError(f"memory_budget_bytes must be >= 0, got {memory_budget_bytes}")
        self.fingerprint = fingerprint
        self.memory_budget_bytes = memory_budget_bytes
        self.directory = None if directory is None else Path(directory)
        self.stats = CacheStats()
        self._memory: OrderedDict[str, tuple[PreparedVideo, int]] = OrderedDict()
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._remove_stale_tmp()

    def _remove_stale_tmp(self) -> None:
        now = time.time()
        for tmp in self.directory.glob(".tmp-*"):
            try:
                if now - tmp.stat().st_mtime > STALE_TMP_S:
                    shutil.rmtree(tmp, ignore_errors=True)
            except OSError:
                continue  # removed by another process meanwhile

    def key(self, *, video_hash: str, sampling: Mapping[str, Any], options: InferenceOptions) -> str:
        return prepared_key(model=self.fingerprint, video_hash=video_hash, sampling=sampling, options=options)

    def get(self, key: str, backend: Backend) -> tuple[PreparedVideo | None, str | None]:
        """(prepared video, "memory" | "disk") or (None, None); a corrupt disk entry is deleted."""
        if key in self._memory and not self._memory[key][0].store.cache.live:
            del self._memory[key]  # its KV memory now holds another video (a backend that keeps one at a time)
        if key in self._memory:
            self._memory.move_to_end(key)
            self.stats.memory_hits += 1
            return self._memory[key][0], "memory"
        if self.directory is not None and (self.directory / key).is_dir():
            entry = self.directory / key
            try:
                prepared = read_entry(entry, key, backend)
            except CacheEntryError as err:
                log.warning("prepared-video cache: %s; deleting it, the video will be prepared again", err)
                self.stats.corrupt += 1
                shutil.rmtree(entry, ignore_errors=True)
            else:
                self.stats.disk_hits += 1
                self._remember(key, prepared)
                return prepared, "disk"
        self.stats.misses += 1
        return None, None

    def put(self, key: str, prepared: PreparedVideo, *, to_disk: bool = True) -> None:
        """Keep `prepared` in memory (within the budget) and, with `to_disk`, write it to disk when a directory is set."""
        self._remember(key, prepared)
        if to_disk:
            self.save(key, prepared)

    def save(self, key: str, prepared: PreparedVideo) -> None:
        """Write `prepared` to disk unless the entry exists (no directory: nothing to do)."""
        if self.directory is not None and not (self.directory / key).is_dir():
            started = time.perf_counter()
            write_entry(self.directory, key, prepared)
            log.info("prepared-video cache: wrote %s in %.2f s", key[:16], time.perf_counter() - started)

    def get_or_prepare(
        self, key: str, backend: Backend, prepare: Callable[[], PreparedVideo]
    ) -> tuple[PreparedVideo, str | None]:
        """The cached prepared video, else `prepare()`'s result, stored; with where it came from (None: prepared now)."""
        prepared, tier = self.get(key, backend)
        if prepared is None:
            prepared = prepare()
            self.put(key, prepared)
        return prepared, tier

    def _remember(self, key: str, prepared: PreparedVideo) -> None:
        size = prepared_nbytes(prepared)
        if size > self.memory_budget_bytes:
            return  # would evict everything and still not fit
        if key in self._memory:
            self.stats.memory_bytes -= self._memory.pop(key)[1]
        self._memory[key] = (prepared, size)
        self.stats.memory_bytes += size
        while self.stats.memory_bytes > self.memory_budget_bytes:
            _, (_, dropped) = self._memory.popitem(last=False)
            self.stats.memory_bytes -= dropped
        self.stats.memory_entries = len(self._memory)

    def clear_memory(self) -> None:
        """Forget the in-memory entries (disk entries stay)."""
        self._memory.clear()
        self.stats.memory_bytes = self.stats.memory_entries = 0
