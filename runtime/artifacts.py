"""The exported artifact directory, checked before any work (the runtime never imports torch)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from videoxl.config import VideoXLConfig
from videoxl.graphs import GRAPHS

MANIFEST = "export_manifest.json"


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
        return self.root / self.manifest["graphs"][name]["file"]

    def check_frames(self, frames: int) -> None:
        if frames > self.max_frames:
            raise ArtifactError(
                f"{frames} frames requested but {self.root} was exported for at most {self.max_frames}; "
                f"lower --max-frames or re-export with `videoxl export --max-frames {frames}`"
            )


def load_onnx_artifacts(root: str | Path) -> OnnxArtifacts:
    root = Path(root)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{root}: no {MANIFEST}; export with `videoxl export --checkpoint CKPT --out {root}`")
    try:
        manifest = json.loads(manifest_path.read_text())
        config = VideoXLConfig.load(root / "config.json")
    except (OSError, ValueError, TypeError) as err:
        raise ArtifactError(f"{root}: unreadable manifest or config.json ({err})") from err
    if manifest.get("model_hash") != config.model_hash():
        raise ArtifactError(
            f"{root}: config.json (model hash {config.model_hash()}) does not match the graphs "
            f"(exported for {manifest.get('model_hash')}); re-export the directory"
        )
    missing = [
        manifest["graphs"].get(name, {}).get("file", f"{name}.onnx")
        for name in GRAPHS
        if name not in manifest.get("graphs", {}) or not (root / manifest["graphs"][name]["file"]).is_file()
    ]
    for name in GRAPHS:
        for data in manifest.get("graphs", {}).get(name, {}).get("external_data") or []:
            if not (root / data).is_file() and data not in missing:
                missing.append(data)
    if missing:
        raise ArtifactError(f"{root}: missing graph files {', '.join(missing)}; re-export the directory")
    if not (root / "tokenizer.json").is_file():
        raise ArtifactError(f"{root}: missing tokenizer.json; re-export the directory")
    return OnnxArtifacts(root, config, manifest)
