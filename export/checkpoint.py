"""Read a Hugging Face checkpoint directory: config.json + (sharded) safetensors. No pickle."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from videoxl.config import VideoXLConfig

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Keys a Video-XL-2 checkpoint may carry that inference does not use (DESIGN §1).
UNUSED_KEY_PREFIXES = (
    "model.text_mlp.",
    "model.vision_tower.vision_tower.vision_model.post_layernorm.",
    "model.vision_tower.vision_tower.vision_model.head.",
)


class CheckpointError(ValueError):
    """The checkpoint directory is incomplete or does not match the model."""


def checkpoint_files(checkpoint_dir: Path) -> list[Path]:
    index = checkpoint_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: not a safetensors index ({err})") from err
        files = sorted({checkpoint_dir / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{checkpoint_dir}: shards listed in {INDEX_FILE} are missing: {', '.join(missing)}")
        return files
    single = checkpoint_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    if list(checkpoint_dir.glob("*.bin")) or list(checkpoint_dir.glob("*.pt")):
        raise CheckpointError(f"{checkpoint_dir}: only pickle weights (*.bin/*.pt) found; convert them to safetensors")
    raise CheckpointError(f"{checkpoint_dir}: no {SINGLE_FILE} or {INDEX_FILE}")


def load_state_dict(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    checkpoint_dir = Path(checkpoint_dir)
    state: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(checkpoint_dir):
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from err
    return state


def checkpoint_shapes(checkpoint_dir: str | Path) -> dict[str, tuple[tuple[int, ...], Path]]:
    """key -> (shape, shard) from the safetensors headers, without reading any tensor data."""
    shapes: dict[str, tuple[tuple[int, ...], Path]] = {}
    for path in checkpoint_files(Path(checkpoint_dir)):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    shapes[key] = (tuple(f.get_slice(key).get_shape()), path)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from err
    return shapes


def load_into(model: torch.nn.Module, checkpoint_dir: str | Path, *, only: tuple[str, ...] | None = None) -> None:
    """Copy the checkpoint into `model` tensor by tensor (peak memory: the model plus one tensor).

    Missing, unexpected and mis-shaped keys are all reported, with their names, before any copy.
    ``only`` (key prefixes) copies just those tensors; the others are still checked by name and
    shape and may stay on the meta device (an exporter that streams the LLM weights later).
    """
    source = str(checkpoint_dir)
    found = checkpoint_shapes(checkpoint_dir)
    expected = model.state_dict()
    unused = {k for k in found if k.startswith(UNUSED_KEY_PREFIXES)}
    vision_prefix = "model.vision_tower.vision_tower.vision_model.encoder.layers."
    for key in found:  # SigLIP layers past the selected one are present and unused
        if key.startswith(vision_prefix) and key not in expected:
            unused.add(key)
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found if k not in expected and k not in unused)
    wrong_shape = sorted(
        f"{k}: checkpoint {found[k][0]} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in found and found[k][0] != tuple(expected[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_preview(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_preview(unexpected)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatches: {_preview(wrong_shape)}")
    if problems:
        raise CheckpointError(f"{source}: checkpoint does not match the Video-XL-2 model: " + "; ".join(problems))
    if unused:
        log.info("%s: %d unused keys ignored (e.g. %s)", source, len(unused), sorted(unused)[0])
    by_shard: dict[Path, list[str]] = {}
    for key in expected:
        if only is None or key.startswith(only):
            by_shard.setdefault(found[key][1], []).append(key)
    with torch.no_grad():
        for path, keys in by_shard.items():
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in keys:
                        expected[key].copy_(f.get_tensor(key).to(expected[key].dtype))
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from err


class LazyStateDict(Mapping):
    """key -> tensor read from its shard on each access: a whole checkpoint's weights, one tensor in memory.

    The exporter converts the LLM's ~15 GB of weights one tensor at a time through this mapping
    instead of loading the model first (which would hold every weight, then convert on top).
    """

    def __init__(self, checkpoint_dir: str | Path, keys: list[str] | None = None) -> None:
        found = checkpoint_shapes(checkpoint_dir)
        self._shard = {k: found[k][1] for k in (found if keys is None else keys)}
        self.shapes = {k: found[k][0] for k in self._shard}

    def __getitem__(self, key: str) -> torch.Tensor:
        path = self._shard[key]
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(key)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from err

    def __iter__(self) -> Iterator[str]:
        return iter(self._shard)

    def __len__(self) -> int:
        return len(self._shard)


def _preview(items: list[str], limit: int = 5) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def load_config(checkpoint_dir: str | Path) -> VideoXLConfig:
    return VideoXLConfig.from_checkpoint(checkpoint_dir)
