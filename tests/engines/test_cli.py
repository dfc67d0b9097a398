"""`videoxl build` / `videoxl check` from the command line: flags, output, one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from videoxl.engines.cli import main
from videoxl.engines.profiles import parse_bytes
from videoxl.engines.trt_module import gpu_compute_capability


def test_build_command(trt, onnx_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "engines"
    code = main([
        "build", "--onnx", str(onnx_dir), "--out", str(out), "--max-frames", "48", "--chunk-groups", "2",
        "--window", "1", "--target", "sm_89", "--target", "sm_120", "--memory-budget", "1GiB", "--gpu-memory-budget", "1GiB", "--no-progress",
    ])
    assert code == 0
    assert f"engines written to {out}" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["compute_capabilities"] == ["sm_89", "sm_120"]
    assert manifest["limits"]["max_frames"] == 48 and manifest["memory"]["budget_bytes"] == 2**30
    assert manifest["memory"]["gpu_plan"]["budget_bytes"] == 2**30 and 0 < manifest["memory"]["gpu_plan"]["device_bytes"] <= 2**30
    assert manifest["precision"] == "fp16"  # no --fp16/--bf16/--fp32: the export's precision


def test_build_error_is_one_line(trt, onnx_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "engines"
    assert main(["build", "--onnx", str(onnx_dir), "--out", str(out), "--bf16"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("videoxl build: error: ") and err.count("\n") == 1
    assert not out.exists()


def test_a_build_needs_the_vision_pad_token(trt, onnx_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An export that names no <|vision_pad|> is refused in one line, before any build: a question (block
    scoring) and, with --decode-on-prefill, every decode step run on prefill_chunk need its embedding row."""
    manifest = json.loads((onnx_copy / "export_manifest.json").read_text())
    del manifest["special_tokens"]
    (onnx_copy / "export_manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "engines"
    assert main(["build", "--onnx", str(onnx_copy), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("videoxl build: error: ") and err.count("\n") == 1 and "special_tokens.vision_pad" in err
    assert not out.exists()


def test_build_refused_by_gpu_memory_budget_is_one_line(trt, onnx_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "engines"
    assert main(["build", "--onnx", str(onnx_dir), "--out", str(out), "--gpu-memory-budget", "5MiB", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("videoxl build: error: ") and err.count("\n") == 1
    assert "more than --gpu-memory-budget 5.00 MiB" in err and re.search(r"use --max-frames \d+ or less", err)
    assert not out.exists()


@pytest.mark.skipif(gpu_compute_capability() is not None, reason="this machine has a GPU")
def test_check_without_gpu_says_so(engines_without_plugins: Path, onnx_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["check", "--engines", str(engines_without_plugins), "--onnx", str(onnx_dir)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs an NVIDIA GPU" in err


def test_package_cli_has_both_commands() -> None:
    from videoxl.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["build", "--onnx", "a", "--out", "b", "--bf16", "--target", "8.6", "--memory-budget", "8GB",
                              "--gpu-memory-budget", "16GiB"])
    assert (args.precision, args.targets, args.memory_budget, args.use_plugins) == ("bf16", ["8.6"], 8 * 10**9, True)
    assert args.gpu_memory_budget == 16 * 2**30
    args = parser.parse_args(["check", "--engines", "e", "--onnx", "o", "--graph", "decode"])
    assert args.graphs == ["decode"] and callable(args.func)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("16GiB", 16 * 2**30), ("1.5 GB", 1_500_000_000), ("512MiB", 512 * 2**20), ("1073741824", 2**30), (42, 42)],
)
def test_parse_bytes(text, expected: int) -> None:
    assert parse_bytes(text) == expected


def test_parse_bytes_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="write e.g. 16GiB"):
        parse_bytes("lots")


def test_unified_memory_reaches_the_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from videoxl.engines import build

    seen = {}

    def fake_build(onnx_dir, out_dir, **kwargs):
        seen.update(kwargs)
        return Path(out_dir)

    monkeypatch.setattr(build, "build_engines", fake_build)
    for flags, unified in (([], False), (["--unified-memory"], True)):
        assert main(["build", "--onnx", "o", "--out", str(tmp_path / "e"), "--gpu-memory-budget", "16GiB", "--no-progress", *flags]) == 0
        assert seen["gpu_memory_budget_bytes"] == 16 * 2**30 and seen["unified_memory"] is unified
