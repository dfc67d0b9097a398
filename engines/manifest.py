"""``manifest.json`` of an engine directory, and the check the runtime makes before loading.

An engine is only valid for the TensorRT that built it, the GPUs it was built for, the ONNX
files and model config it came from, the graph contract version its I/O follows, and (when it
uses them) the videoxl plugins. The manifest records all of that at build time, plus what the
runtime needs to bind each engine: per engine whether it needs the plugin library, and per input
whether TensorRT reads it on the host (a shape tensor) or on the device; :func:`check_manifest` compares it with the running process
and raises :class:`EngineMismatchError` naming the actual values and the rebuild command.

    engines/
      manifest.json   this file's subject
      config.json     VideoXLConfig of the model (copied from the ONNX directory)
      vision.engine  prefill_chunk.engine  decode.engine  score.engine  kv_gather.engine
                      (one per graph of the graph contract, videoxl.graphs)
      decode.layers_00-05.engine  decode.layers_06-13.engine ...
                      instead, for an LLM graph built in layer ranges: its entry has "ranges", in
                      layer order, each with its engine file and the boundary tensors it takes in
                      and gives out (a chain the TensorRT backend runs as one engine)
      vision_pad_embedding.npy
                      the embedding row of <|vision_pad|>: that token's visual row when a question
                      (block scoring) or, with --decode-on-prefill (no decode engine then), a decode
                      step runs on prefill_chunk; the entry "vision_pad" names the token, the file
                      and its sha256
      export_manifest.json, tokenizer*.json, generation_config.json   copied when present,
                      so that the runtime needs nothing else next to the engines
"""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path
from types import ModuleType
from typing import Any

from videoxl.config import VideoXLConfig
from videoxl.files import UnsafePathError, confined_path, file_sha256
from videoxl.engines.errors import EngineMismatchError
from videoxl.engines.profiles import DEFAULT_MAX_ENGINE_WEIGHTS
from videoxl.engines.trt_module import FLAVOUR_TITLES, describe, flavour_of, normalize_target
from videoxl.graphs import CONTRACT_VERSION
from videoxl.ops import PLUGIN_VERSION

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.json"
VISION_PAD_FILE = "vision_pad_embedding.npy"  # one float row, [hidden]
COPIED_FILES = ("export_manifest.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
MANIFEST_FORMAT = 4  # 4: "vision_pad" always, "decode_on_prefill" a bool; 3: layer ranges (engines[graph]["ranges"])

__all__ = ["EngineMismatchError", "check_manifest", "read_manifest", "write_manifest", "rebuild_command"]


# --- fingerprints ----------------------------------------------------------------------------------
def file_fingerprint(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"sha256": file_sha256(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def kernels_library_info() -> dict[str, Any] | None:
    """Path and hash of the compiled kernel library the plugins call, or None if it is not built."""
    try:
        from videoxl.plugins import kernels
    except ImportError as err:
        log.debug("videoxl.plugins.kernels is not importable: %s", err)
        return None
    locate = getattr(kernels, "library_path", None)
    path = locate() if callable(locate) else getattr(kernels, "LIBRARY_PATH", None)
    if path is None or not Path(path).is_file():
        return None
    return {"path": str(path), "sha256": file_sha256(Path(path))}


# --- reading and writing ---------------------------------------------------------------------------
def write_manifest(engine_dir: Path, manifest: dict[str, Any]) -> Path:
    path = Path(engine_dir) / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def read_manifest(engine_dir: str | Path) -> dict[str, Any]:
    engine_dir = Path(engine_dir)
    path = engine_dir / MANIFEST_FILE
    if not path.is_file():
        raise EngineMismatchError(
            f"{engine_dir}: no {MANIFEST_FILE} (not an engine directory written by `videoxl build`); "
            "build engines with `videoxl build --onnx ONNX_DIR --out ENGINE_DIR`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EngineMismatchError(f"{path}: unreadable ({err}); rebuild the engines with `videoxl build`") from err
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise EngineMismatchError(
            f"{path}: manifest format {found!r}, this videoxl reads format {MANIFEST_FORMAT}; "
            f"rebuild with `{rebuild_command(manifest if isinstance(manifest, dict) else {}, engine_dir)}`"
        )
    return manifest


def rebuild_command(manifest: dict[str, Any], engine_dir: str | Path | None = None) -> str:
    """The `videoxl build` command line that rebuilds these engines with the same limits."""
    onnx_dir = manifest.get("model", {}).get("onnx_dir", "ONNX_DIR")
    out = str(engine_dir) if engine_dir is not None else "ENGINE_DIR"
    args = ["videoxl", "build", "--onnx", onnx_dir, "--out", out]
    if "precision" in manifest:
        args.append(f"--{manifest['precision']}")
    limits = manifest.get("limits", {})
    for key, flag in (("max_frames", "--max-frames"), ("chunk_groups", "--chunk-groups"), ("window_chunks", "--window")):
        if key in limits:
            args += [flag, str(limits[key])]
    for target in manifest.get("compute_capabilities", []) if manifest.get("tensorrt", {}).get("flavour") == "tensorrt_rtx" else []:
        args += ["--target", target]
    if not manifest.get("plugins", {}).get("requested", True):
        args.append("--no-plugins")
    if manifest.get("decode_on_prefill"):
        args.append("--decode-on-prefill")
    memory = manifest.get("memory") or {}
    if memory.get("budget_bytes") is not None:  # the same checks as the first build
        args += ["--memory-budget", str(memory["budget_bytes"])]
    if memory.get("gpu_plan"):
        args += ["--gpu-memory-budget", str(memory["gpu_plan"]["budget_bytes"])]
        if memory["gpu_plan"].get("unified_memory"):
            args.append("--unified-memory")
    layer_ranges = manifest.get("layer_ranges", {})
    if layer_ranges.get("layers_per_engine") is not None:
        args += ["--layers-per-engine", str(layer_ranges["layers_per_engine"])]
    elif layer_ranges.get("max_engine_weights", DEFAULT_MAX_ENGINE_WEIGHTS) != DEFAULT_MAX_ENGINE_WEIGHTS:
        args += ["--max-engine-weights", str(layer_ranges["max_engine_weights"] or "none")]
    return shlex.join(args)


# --- the check -------------------------------------------------------------------------------------
def check_manifest(
    engine_dir: str | Path,
    *,
    trt_module: ModuleType,
    gpu_compute_capability: str | tuple[int, int],
    onnx_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Return the manifest if the engines fit this process; else raise EngineMismatchError.

    Checks the TensorRT flavour and version, the GPU's compute capability against the build
    targets, the graph contract version, the plugin library when the engines use plugins, the engine files, the model config
    hash, and (given ``onnx_dir``) that the ONNX files are the ones the engines were built from.
    """
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    problems: list[str] = []

    built = manifest["tensorrt"]
    flavour, version = flavour_of(trt_module), trt_module.__version__
    if (built["flavour"], built["version"]) != (flavour, version):
        problems.append(
            f"built with {FLAVOUR_TITLES.get(built['flavour'], built['flavour'])} {built['version']}, "
            f"this process uses {describe(trt_module)}"
        )

    gpu = normalize_target(gpu_compute_capability)
    targets = manifest["compute_capabilities"]
    if gpu not in targets:
        problems.append(f"built for {', '.join(targets)}; this GPU is {gpu}")

    contract = manifest["graph_contract"]["version"]
    if contract != CONTRACT_VERSION:
        problems.append(f"built from graphs of contract v{contract}, this videoxl binds contract v{CONTRACT_VERSION}")

    plugins = manifest["plugins"]
    if plugins["used"]:
        if plugins["version"] != PLUGIN_VERSION:
            problems.append(f"built with videoxl plugins v{plugins['version']}, this videoxl has v{PLUGIN_VERSION}")
        if kernels_library_info() is None:
            problems.append(
                "the engines use the videoxl TensorRT plugins but the kernel library they call is missing "
                "(build it, see plugins/README.md, or rebuild the engines with --no-plugins)"
            )

    for graph, entry in manifest["engines"].items():
        ranges = entry.get("ranges") if isinstance(entry, dict) else None
        if ranges is not None:
            problems += _chain_problems(graph, ranges, manifest_layers(engine_dir))
        for part in ranges if isinstance(ranges, list) else [entry]:
            try:
                path = confined_path(engine_dir, part.get("file") if isinstance(part, dict) else None, what=f"engine {graph!r}")
            except UnsafePathError as err:
                problems.append(str(err))
                continue
            if not path.is_file():
                problems.append(f"engine file {path.name} is missing")
            elif path.stat().st_size != part["bytes"]:
                problems.append(f"engine file {path.name} has {path.stat().st_size} bytes, the build wrote {part['bytes']}")

    problems += _decode_engine_problems(manifest) + _vision_pad_problems(engine_dir, manifest)
    config_hash = manifest["model"]["config_hash"]
    problems += _config_problems(engine_dir / CONFIG_FILE, config_hash, "engine directory")
    if onnx_dir is not None:
        onnx_dir = Path(onnx_dir)
        problems += _config_problems(onnx_dir / CONFIG_FILE, config_hash, "ONNX directory")
        problems += _onnx_problems(onnx_dir, manifest["onnx"])

    if problems:
        raise EngineMismatchError(
            f"{engine_dir}: the engines do not fit this process:\n  - "
            + "\n  - ".join(problems)
            + f"\nrebuild with `{rebuild_command(manifest, engine_dir)}`"
        )
    return manifest


def manifest_layers(engine_dir: Path) -> int | None:
    """The model's decoder layers from the engine directory's config (None when it cannot be read)."""
    try:
        return VideoXLConfig.load(engine_dir / CONFIG_FILE).num_hidden_layers
    except (OSError, ValueError, TypeError):
        return None


def _chain_problems(graph: str, ranges: Any, layers: int | None) -> list[str]:
    """A graph's layer ranges must cover its layers in order, each taking what the one before gives out."""
    if not isinstance(ranges, list) or not ranges or not all(isinstance(r, dict) for r in ranges):
        return [f"engine {graph!r}: its layer ranges are not a list of entries"]
    try:
        spans = [tuple(r["layers"]) for r in ranges]
        chained = all(r["boundary_in"] == p["boundary_out"] for p, r in zip(ranges, ranges[1:]))
        ends = ranges[0]["boundary_in"] == [] and ranges[-1]["boundary_out"] == []
    except (KeyError, TypeError) as err:
        return [f"engine {graph!r}: a layer range lacks {err}"]
    covered = [a for a, _ in spans] + [spans[-1][1]]
    if covered[0] != 0 or any(b != a for (_, b), (a, _) in zip(spans, spans[1:])) or (layers is not None and covered[-1] != layers):
        return [f"engine {graph!r}: layer ranges {spans} do not cover layers 0-{(layers or 0) - 1} in order"]
    if not (chained and ends):
        return [f"engine {graph!r}: its layer ranges do not chain (each range must take in what the one before gives out)"]
    return []


def _decode_engine_problems(manifest: dict[str, Any]) -> list[str]:
    """A decode engine is listed exactly when decode does not run on the prefill engine."""
    listed = "decode" in manifest["engines"]
    if manifest.get("decode_on_prefill"):
        return ["a decode engine is listed, but the manifest says decode runs on prefill_chunk"] if listed else []
    return [] if listed else ["no decode engine, and the manifest does not say decode runs on prefill_chunk"]


def _vision_pad_problems(engine_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """The vision_pad row as the build wrote it."""
    entry = manifest.get("vision_pad")
    if not isinstance(entry, dict):
        return ["the manifest names no vision_pad embedding"]
    try:
        path = confined_path(engine_dir, entry.get("file"), what="vision_pad embedding")
    except UnsafePathError as err:
        return [str(err)]
    if not path.is_file():
        return [f"{path.name} (the vision_pad embedding a question or decode step on prefill_chunk needs) is missing"]
    if path.stat().st_size != entry.get("bytes") or file_sha256(path) != entry.get("sha256"):
        return [f"{path.name} differs from the file the build wrote"]
    return []


def _config_problems(path: Path, expected_hash: str, where: str) -> list[str]:
    if not path.is_file():
        return [f"no {CONFIG_FILE} in the {where} ({path.parent})"]
    try:
        actual = VideoXLConfig.load(path).model_hash()
    except (ValueError, TypeError, json.JSONDecodeError) as err:
        return [f"{path}: unreadable model config ({err})"]
    if actual != expected_hash:
        return [f"model config hash in the {where} is {actual}, the engines were built for {expected_hash}"]
    return []


def _onnx_problems(onnx_dir: Path, recorded: dict[str, dict[str, Any]]) -> list[str]:
    """Compare files by size and mtime first; hash only files that look touched."""
    problems = []
    for name, fingerprint in recorded.items():
        try:
            path = confined_path(onnx_dir, name, what="recorded ONNX file")
        except UnsafePathError as err:
            problems.append(str(err))
            continue
        if not path.is_file():
            problems.append(f"{name} is missing from {onnx_dir}")
            continue
        stat = path.stat()
        if stat.st_size == fingerprint["bytes"] and stat.st_mtime_ns == fingerprint["mtime_ns"]:
            continue
        if stat.st_size == fingerprint["bytes"] and file_sha256(path) == fingerprint["sha256"]:
            continue  # touched, same content
        newer = " (newer than the build)" if stat.st_mtime_ns > fingerprint["mtime_ns"] else ""
        problems.append(f"{name} in {onnx_dir} differs from the file the engines were built from{newer}")
    return problems
