"""What `pip install` pulls in: one ONNX Runtime wheel at a time."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

PYPROJECT = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].strip().lower() for r in requirements}


def test_gpu_extra_installs_onnxruntime_gpu_instead_of_the_cpu_wheel():
    """Installed together, the CPU wheel's module shadows the GPU one and the CUDA provider disappears."""
    base = names(PYPROJECT["project"]["dependencies"])
    extras = {k: names(v) for k, v in PYPROJECT["project"]["optional-dependencies"].items()}
    assert "onnxruntime" not in base and "onnxruntime-gpu" not in base
    assert "onnxruntime-gpu" in extras["gpu"] and "onnxruntime" not in extras["gpu"]
    assert "onnxruntime" in extras["cpu"] and "onnxruntime-gpu" not in extras["cpu"]
    for extra, requirements in extras.items():  # no other extra drags the CPU wheel in beside the GPU one
        if extra != "cpu":
            assert "onnxruntime" not in requirements, extra
