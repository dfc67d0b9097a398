"""Session fixtures: the tiny checkpoint and a synthetic video are built once per run."""

from __future__ import annotations

from pathlib import Path

import pytest

from videoxl.tiny import write_tiny_checkpoint
from videoxl.video import write_synthetic_video


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Video-XL-2 checkpoint in the Hugging Face layout (2 shards)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "checkpoint")


@pytest.fixture(scope="session")
def synthetic_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 s at 8 fps, 160x120, MPEG-4; each frame's content encodes its index."""
    return write_synthetic_video(tmp_path_factory.mktemp("video") / "clip.mp4", seconds=10, fps=8)
