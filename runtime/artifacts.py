"""The exported artifact directory, checked before any work (the runtime never imports torch).

The manifest lists every file the export wrote with its size and sha256. Each load compares
sizes (cheap); the hashes are compared when a directory is first used and the result is kept
in ``.verified.json`` by (size, mtime), so a later load hashes only files that changed.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from videoxl.config import VideoXLConfig
from videoxl.files import confined_path, file_sha256
from videoxl.graphs import GRAPHS, RANGE_FILE

log = logging.getLogger(__name__)

MANIFEST = "export_manifest.json"
STAMP = ".verified.json"  # (size, mtime_ns) of files whose sha256 matched the manifest


class ArtifactError(ValueError):
    """The ONNX/engine directory is incomplete, stale or does not fit the request."""


@dataclass(frozen=True)
class OnnxArtifacts:
    root: Path
    config: VideoXLConfig
    manifest: dict

    @property
    def max_frames(self) -> int:
        return int(self.manifest["max_frames"])

    @property
    def dtype(self) -> str:
        return str(self.manifest["dtype"])

    def graph_path(self, name: str) -> Path:
        return confined_path(self.root, self.manifest["graphs"][name]["file"], what=f"{MANIFEST} graph {name!r}")

    def check_frames(self, frames: int) -> None:
        if frames > self.max_frames:
            raise ArtifactError(
                f"{frames} frames requested but {self.root} was exported for at most {self.max_frames}; "
                f"lower --max-frames or re-export with `videoxl export --max-frames {frames}`"
            )


def file_inventory(root: Path) -> dict[str, dict[str, int | str]]:
    """{name: {bytes, sha256}} of every file in ``root`` (the export's own manifest excluded)."""
    return {
        path.name: {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        for path in sorted(root.iterdir())
        if path.is_file() and path.name not in (MANIFEST, STAMP)
    }


def previous_export_problem(root: Path) -> str | None:
    """None when ``root`` holds only what a videoxl export wrote (safe to replace), else why not."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        return f"has no {MANIFEST} (not written by `videoxl export`)"
    except (OSError, ValueError) as err:
        return f"has an unreadable {MANIFEST} ({err})"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("graphs"), dict):
        return f"has a {MANIFEST} that videoxl did not write"
    known = {MANIFEST, STAMP, "config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    known |= set(manifest.get("files") or {})
    for entry in manifest["graphs"].values():
        if isinstance(entry, dict):
            known.add(str(entry.get("file")))
            known |= {str(name) for name in entry.get("external_data") or []}
    # layer-range graphs the engine builder cut beside the export (videoxl.graphs.range_file)
    ranged = {str(e.get("file")).removesuffix(".onnx") for e in manifest["graphs"].values() if isinstance(e, dict)}
    foreign = sorted(
        p.name for p in root.iterdir()
        if p.name not in known and not ((m := RANGE_FILE.match(p.name)) and m["kind"] == "onnx" and m["graph"] in ranged)
    )
    if foreign:
        return f"holds files the export did not write ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})"
    return None


def _read_stamp(root: Path) -> dict:
    try:
        stamp = json.loads((root / STAMP).read_text())
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


def _write_stamp(root: Path, stamp: dict) -> None:
    """Best effort: a read-only artifact directory is verified again on its next use."""
    tmp = root / f"{STAMP}.{os.getpid()}"
    try:
        tmp.write_text(json.dumps(stamp))
        tmp.replace(root / STAMP)
    except OSError as err:
        log.debug("cannot record the verification in %s: %s", root, err)
        tmp.unlink(missing_ok=True)


def verify_files(root: Path, manifest: dict) -> None:
    """Sizes of every listed file at each call; sha256 of files not verified before at this (size, mtime)."""
    listed = manifest.get("files")
    if not isinstance(listed, dict):  # exports before the inventory: the graphs' hashes only
        listed = {g["file"]: {"sha256": g["sha256"]} for g in manifest["graphs"].values() if "sha256" in g}
    stamp, verified = _read_stamp(root), {}
    for name, expected in listed.items():
        path = confined_path(root, name, what=f"{MANIFEST} file")
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise ArtifactError(f"{path}: missing; re-export the directory") from None
        if "bytes" in expected and stat.st_size != expected["bytes"]:
            raise ArtifactError(
                f"{path}: {stat.st_size:,} bytes, the export wrote {expected['bytes']:,} (truncated or replaced); re-export the directory"
            )
        seen = [stat.st_size, stat.st_mtime_ns, expected.get("sha256")]
        if stamp.get(name) != seen and "sha256" in expected:
            if file_sha256(path) != expected["sha256"]:
                raise ArtifactError(f"{path}: content differs from the export (sha256 mismatch); re-export the directory")
        verified[name] = seen
    if verified != stamp:
        _write_stamp(root, verified)


def load_onnx_artifacts(root: str | Path, *, verify: bool = True) -> OnnxArtifacts:
    """The checked artifact directory; ArtifactError (one line, naming the file) otherwise."""
    root = Path(root)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{root}: no {MANIFEST}; export with `videoxl export --checkpoint CKPT --out {root}`")
    try:
        manifest = json.loads(manifest_path.read_text())
        config = VideoXLConfig.load(root / "config.json")
    except (OSError, ValueError, TypeError) as err:
        raise ArtifactError(f"{root}: unreadable manifest or config.json ({err})") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("graphs"), dict):
        raise ArtifactError(f"{manifest_path}: not a videoxl export manifest; re-export the directory")
    if manifest.get("model_hash") != config.model_hash():
        raise ArtifactError(
            f"{root}: config.json (model hash {config.model_hash()}) does not match the graphs "
            f"(exported for {manifest.get('model_hash')}); re-export the directory"
        )
    missing = [
        manifest["graphs"].get(name, {}).get("file", f"{name}.onnx")
        for name in GRAPHS
        if name not in manifest["graphs"]
        or not confined_path(root, manifest["graphs"][name]["file"], what=f"{MANIFEST} graph {name!r}").is_file()
    ]
    for name in GRAPHS:
        for data in manifest["graphs"].get(name, {}).get("external_data") or []:
            if not confined_path(root, data, what=f"{MANIFEST} external data").is_file() and data not in missing:
                missing.append(data)
    if missing:
        raise ArtifactError(f"{root}: missing graph files {', '.join(missing)}; re-export the directory")
    if not (root / "tokenizer.json").is_file():
        raise ArtifactError(f"{root}: missing tokenizer.json; re-export the directory")
    if verify:
        verify_files(root, manifest)
    return OnnxArtifacts(root, config, manifest)
