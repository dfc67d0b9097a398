"""The official evaluation settings, per benchmark, and its published dense-block selections.

The released evaluation (VectorSpaceLab/Video-XL, ``Video-XL-2/eval/lvu/w_chunk_bilevel``:
``scripts/*.sh`` for the frame budget, chunk size and window; ``selected_infos/*.json`` for
the decoding block size S and the selections; ``lmms_eval/models/videoxl2.py`` for how they
are read) is summarised in ``docs/official.md``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalPreset:
    """One benchmark's settings: frames sampled, prefill chunk C, window P, decoding block S."""

    max_frames: int  # max_frames_num in the script
    chunk_groups: int  # C: block_size_chosed (4 in every script)
    window_chunks: int  # P: prev_blocks_num
    block_groups: int  # S: selected_chunk_size of the benchmark's selection file
    fps: float = 1.0
    max_fps: float = 4.0


PRESETS: dict[str, EvalPreset] = {
    "mlvu": EvalPreset(max_frames=256, chunk_groups=4, window_chunks=3, block_groups=4),
    "longvideobench": EvalPreset(max_frames=400, chunk_groups=4, window_chunks=3, block_groups=6),
    "videomme": EvalPreset(max_frames=400, chunk_groups=4, window_chunks=3, block_groups=6),
    "lvbench": EvalPreset(max_frames=600, chunk_groups=4, window_chunks=11, block_groups=16),
}


class SelectionError(ValueError):
    """A selection file that cannot be read, or that has no entry for the question."""


@dataclass(frozen=True)
class UnitSelection:
    """One question's published selection: 8-frame unit ids and the block size S they assume."""

    units: tuple[int, ...]
    block_groups: int | None  # the file's selected_chunk_size (None when it gives none)
    key: str


def load_unit_selection(path: str | Path, keys: str | list[str]) -> UnitSelection:
    """The entry for the first of `keys` found in an official selection file.

    The file maps categories to ``null`` or ``{"config": {"selected_chunk_size": S,
    "compression": 4, ...}, "selected_unit_indices": {key: [units]}}``; keys are
    ``<video file name>_<question>`` (LVBench: the name without ``.mp4``). Officially a
    question without an entry runs a plain dense forward; here it is an error, since a key
    given on the command line that is not found is almost always a typo.
    """
    keys = [keys] if isinstance(keys, str) else list(keys)
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SelectionError(f"{path}: cannot read the selection file ({err})") from err
    if not isinstance(data, dict):
        raise SelectionError(f"{path}: not an official selection file (expected categories at the top level)")
    for key in keys:
        for category, entry in data.items():
            if not isinstance(entry, dict) or key not in entry.get("selected_unit_indices", {}):
                continue
            config = entry.get("config") or {}
            compression = config.get("compression", 4)
            if compression != 4:
                raise SelectionError(f"{path}: category {category!r} pools KV by {compression}; this model pools by 4")
            size = config.get("selected_chunk_size")
            units = entry["selected_unit_indices"][key]
            if not isinstance(units, list):
                raise SelectionError(f"{path}: entry {key!r} is not a list of unit ids")
            log.info("selection %r from %s (category %s, S=%s): units %s", key, path, category, size, units)
            return UnitSelection(tuple(units), None if size is None else int(size), key)
    tried = " or ".join(repr(k) for k in keys)
    raise SelectionError(
        f"{path}: no entry {tried} (officially such a question runs fully dense: --prefill dense --decode dense)"
    )
