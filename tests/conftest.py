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


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint: Path):
    """The PyTorch reference model loaded from the tiny checkpoint (fp32)."""
    from videoxl.export.model import VideoXLModel

    return VideoXLModel.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_checkpoint: Path):
    from videoxl.text import load_tokenizer

    return load_tokenizer(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_onnx(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint exported to ONNX (fp32), once per run."""
    from videoxl.export.onnx_export import export_onnx

    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("onnx") / "tiny", max_frames=256)


@pytest.fixture(scope="session")
def make_layout(tiny_tokenizer, tiny_model):
    """make_layout(groups, question=...) -> TokenLayout via the real prompt builder (a group every 4 s)."""
    from videoxl.text import build_prompt

    def make(groups: int, question: str = "What is shown?"):
        times = [4.0 * g for g in range(groups)]
        layout, _ = build_prompt(tiny_tokenizer, question, times, tokens_per_group=tiny_model.cfg.tokens_per_group)
        return layout

    return make


@pytest.fixture(scope="session")
def tiny_onnx_quantized(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """quantized(format) -> the tiny checkpoint exported with --weights int8 or int4 (block 32), once each."""
    from videoxl.export.onnx_export import export_onnx
    from videoxl.weight_format import WeightFormat

    exports: dict[str, Path] = {}

    def quantized(name: str) -> Path:
        if name not in exports:
            # the tiny model's linears are 64 and 128 wide: int4 blocks of 32 (128 needs the real widths)
            fmt = WeightFormat.parse(name, 32 if name == "int4" else None)
            exports[name] = export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("onnx_q") / name, max_frames=256, weights=fmt)
        return exports[name]

    return quantized
