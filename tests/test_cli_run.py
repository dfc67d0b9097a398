"""The command line: a run prints a streamed answer and a report; bad input is one clear line."""

from __future__ import annotations

import io

import pytest

from videoxl.cli import main
from videoxl.runtime.device import gpu_usable
from videoxl.video import write_synthetic_video


def test_run_onnxruntime_prints_answer_and_report(tiny_onnx, synthetic_video, capsys):
    code = main([
        "run", "--onnx", str(tiny_onnx), "--video", str(synthetic_video), "--question", "What colour?",
        "--max-frames", "24", "--chunk-groups", "2", "--window", "1", "--block-groups", "2",
        "--dense-blocks", "1", "--max-new-tokens", "8", "--no-progress",
    ])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("Q: What colour?\nA: ")
    # the official sampling rule: 10 s at 8 fps with a budget of 24 takes every 4th frame, 20 of them
    for field in ("backend           onnxruntime", "frames            20 (5 groups of 4)", "prefill", "tokens/s", "KV cache          dense"):
        assert field in out


def test_follow_up_questions_print_one_answer_each(tiny_onnx, synthetic_video, capsys):
    code = main([
        "run", "--onnx", str(tiny_onnx), "--video", str(synthetic_video), "--max-frames", "24",
        "--question", "What colour?", "--question", "What moves?", "--max-new-tokens", "4", "--no-progress",
    ])
    out = capsys.readouterr().out
    assert code == 0
    first, second = out.split("\n\nQ: What moves?\nA: ")
    assert first.startswith("Q: What colour?\nA: ") and "vision            " in first and "reused" not in first
    assert "vision, prefill   reused (done once for this video)" in second and "prefill           " not in second


def test_ctrl_c_ends_without_a_traceback(tiny_onnx, synthetic_video, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("videoxl.runtime.pipeline.Pipeline.prepare", interrupted)
    assert main(["run", "--onnx", str(tiny_onnx), "--video", str(synthetic_video), "--no-progress"]) == 130
    assert capsys.readouterr().err == "\nvideoxl run: interrupted\n"


@pytest.mark.skipif(gpu_usable(), reason="checks the behaviour on a machine without a usable GPU")
def test_engines_without_a_gpu_fall_back_to_onnxruntime_only_when_given_graphs(tiny_onnx, synthetic_video, tmp_path, capsys):
    engines = tmp_path / "engines"  # never opened: no GPU, so the choice is made before
    assert main(["run", "--engines", str(engines), "--video", str(synthetic_video)]) != 0
    assert "TensorRT backend unavailable" in capsys.readouterr().err
    code = main([
        "run", "--engines", str(engines), "--onnx", str(tiny_onnx), "--video", str(synthetic_video),
        "--max-frames", "8", "--max-new-tokens", "2", "--no-progress",
    ])
    captured = capsys.readouterr()
    assert code == 0 and "running on ONNX Runtime instead" in captured.err
    assert "backend           onnxruntime" in captured.out


def test_explicit_block_list(tiny_onnx, synthetic_video, capsys):
    code = main([
        "run", "--onnx", str(tiny_onnx), "--video", str(synthetic_video), "--max-frames", "32",
        "--block-groups", "1", "--dense-blocks", "3,4", "--max-new-tokens", "2", "--no-progress",
    ])
    out = capsys.readouterr().out
    assert code == 0
    assert "dense blocks [0, 1, 3, 4, 7] of 8" in out  # 27 frames (the official rule at a budget of 32): 7 groups


def test_corrupt_video_is_one_line(tiny_onnx, tmp_path, capsys):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00not a video" * 100)
    assert main(["run", "--onnx", str(tiny_onnx), "--video", str(bad), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("videoxl run: error:") and str(bad) in err and "\n" not in err


def test_video_longer_than_export_limit(tiny_onnx, tmp_path, capsys):
    long_video = write_synthetic_video(tmp_path / "long.mp4", seconds=300, fps=2, width=64, height=48)
    assert main(["run", "--onnx", str(tiny_onnx), "--video", str(long_video), "--max-frames", "1000", "--no-progress"]) == 2
    assert "exported for at most 256" in capsys.readouterr().err


def test_missing_onnx_dir(tmp_path, synthetic_video, capsys):
    assert main(["run", "--onnx", str(tmp_path / "nope"), "--video", str(synthetic_video)]) == 2
    assert "no export_manifest.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-frames", "0", "argument --max-frames: must be >= 1, got 0"),
        ("--fps", "0", "argument --fps: must be > 0, got 0"),
        ("--chunk-groups", "0", "argument --chunk-groups: must be >= 1, got 0"),
        ("--window", "-1", "argument --window: must be >= 0, got -1"),
        ("--block-groups", "0", "argument --block-groups: must be >= 1, got 0"),
        ("--dense-blocks", "-2", "argument --dense-blocks: must be >= 0, got -2"),
        ("--max-new-tokens", "0", "argument --max-new-tokens: must be >= 1, got 0"),
        ("--threads", "-1", "argument --threads: must be >= 0, got -1"),
        ("--matmul-accuracy-level", "5", "argument --matmul-accuracy-level: invalid choice: 5"),
    ],
)
def test_out_of_range_flags_are_refused_not_defaulted(tiny_onnx, synthetic_video, capsys, flag, value, message):
    """A 0 is a value the user gave: refused with its name, never read as "use the default"."""
    assert main(["run", "--onnx", str(tiny_onnx), "--video", str(synthetic_video), flag, value, "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Q:" not in captured.out


def test_onnxruntime_flags_reach_the_backend(tiny_onnx, synthetic_video, capsys, monkeypatch):
    from videoxl.runtime import ort_backend

    seen = {}

    class Recording(ort_backend.OnnxRuntimeBackend):
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(ort_backend, "OnnxRuntimeBackend", Recording)
    code = main(["run", "--onnx", str(tiny_onnx), "--video", str(synthetic_video), "--max-frames", "8",
                 "--max-new-tokens", "2", "--threads", "1", "--matmul-accuracy-level", "0", "--no-progress"])
    assert code == 0 and "backend           onnxruntime" in capsys.readouterr().out
    assert seen == {"threads": 1, "matmul_accuracy_level": 0}


@pytest.mark.parametrize("argv", [["run"], ["export", "--checkpoint", "x"]])
def test_usage_errors(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"videoxl {argv[0]}: error: the following arguments are required") and err.count("\n") == 1


def test_export_then_torch_and_onnxruntime_agree(tiny_checkpoint, synthetic_video, tmp_path, capsys):
    out = tmp_path / "onnx"
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--max-frames", "64"]) == 0
    assert (out / "export_manifest.json").is_file()
    common = ["--video", str(synthetic_video), "--max-frames", "16", "--chunk-groups", "1", "--window", "1",
              "--block-groups", "1", "--dense-blocks", "1", "--max-new-tokens", "6", "--no-progress"]
    capsys.readouterr()
    assert main(["run", "--backend", "torch", "--checkpoint", str(tiny_checkpoint), *common]) == 0
    torch_out = capsys.readouterr().out
    assert main(["run", "--onnx", str(out), *common]) == 0
    ort_out = capsys.readouterr().out
    answer = lambda text: text.split("\n\n")[0]  # noqa: E731  "Q: ...\nA: ..." before the report
    assert "backend           torch" in torch_out and "backend           onnxruntime" in ort_out
    assert answer(torch_out) == answer(ort_out)


def test_cached_export_follows_the_weights(tiny_checkpoint, tmp_path):
    import os
    import shutil

    from videoxl.cli import checkpoint_fingerprint

    copy = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    before = checkpoint_fingerprint(copy)
    assert checkpoint_fingerprint(copy) == before
    shard = next(copy.glob("*.safetensors"))
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1_000_000))  # retrained in place
    assert checkpoint_fingerprint(copy) != before


def test_run_from_checkpoint_exports_once_into_the_cache(tiny_checkpoint, synthetic_video, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    argv = ["run", "--checkpoint", str(tiny_checkpoint), "--video", str(synthetic_video), "--max-frames", "8",
            "--max-new-tokens", "2", "--no-progress"]
    assert main(argv) == 0
    assert "exporting" in capsys.readouterr().err
    (cached,) = (tmp_path / "videoxl" / "onnx").iterdir()
    assert (cached / "export_manifest.json").is_file()
    assert main(argv) == 0
    assert "exporting" not in capsys.readouterr().err  # reused


def test_demo_runs_end_to_end(tmp_path, capsys):
    """`make demo`'s command: tiny checkpoint and video written, exported, answered."""
    assert main(["demo", "--workdir", str(tmp_path / "demo"), "--seconds", "8"]) == 0
    out = capsys.readouterr().out
    assert "synthetic video" in out and "ONNX graphs" in out
    assert "Q: What happens in this video?\nA: " in out and "backend           onnxruntime" in out
    assert (tmp_path / "demo" / "onnx" / "export_manifest.json").is_file()


def test_run_cache_skips_preparing_the_same_video_again(tiny_onnx, synthetic_video, tmp_path, capsys):
    argv = ["run", "--onnx", str(tiny_onnx), "--video", str(synthetic_video), "--question", "What colour?",
            "--max-frames", "16", "--max-new-tokens", "6", "--no-progress", "--cache", str(tmp_path)]
    outputs = []
    for _ in range(2):
        assert main(argv) == 0
        captured = capsys.readouterr()
        outputs.append((captured.out, captured.err))
    assert "saved to the cache" in outputs[0][1] and "loaded from the cache" in outputs[1][1]
    answer = lambda text: text.split("\n\n")[0]  # noqa: E731
    assert answer(outputs[0][0]) == answer(outputs[1][0])
    assert main([*argv, "--fps", "2"]) == 0  # other sampling settings: another entry
    assert "saved to the cache" in capsys.readouterr().err
