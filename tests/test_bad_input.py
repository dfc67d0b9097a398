"""Bad input and file-system faults through the CLI: exit status, one line, files before and after.

Each case checks three things: the exit status, a single stderr line without a traceback, and
that the file system holds exactly what it held before (nothing lost, nothing left behind).
Cases run in-process through ``main(argv)``; only signals and locks use real subprocesses.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest

from videoxl.cli import _cache_dir, checkpoint_fingerprint, main
from videoxl.runtime.artifacts import MANIFEST, load_onnx_artifacts

RUN_FAST = ["--max-frames", "8", "--max-new-tokens", "2", "--no-progress"]


# --- helpers ---------------------------------------------------------------------------------------
def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` (hidden ones included) -> (size, mtime_ns); directories size 0."""
    if not root.exists():
        return {}
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            stat = path.lstat()
            out[str(path.relative_to(root))] = (0 if path.is_dir() else stat.st_size, stat.st_mtime_ns)
    return out


def one_line_error(capsys, code: int, expected_code: int, *needles: str) -> str:
    """The stderr of a failed command: exactly one line, no traceback, naming ``needles``."""
    err = capsys.readouterr().err
    assert code == expected_code, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    """A folder with someone's files, which no command may delete."""
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("precious")
    (folder / "sub" / "data.bin").write_bytes(b"\1" * 100)
    return folder


@pytest.fixture
def export_copy(tiny_onnx: Path, tmp_path: Path) -> Path:
    """A private copy of the session's export, to damage."""
    return Path(shutil.copytree(tiny_onnx, tmp_path / "onnx"))


def _rewrite_manifest(root: Path, change) -> None:
    manifest = json.loads((root / MANIFEST).read_text())
    change(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest))


# --- 1. export --out: nothing the user did not create is deleted --------------------------------
def _export(ckpt: Path, out, *extra: str) -> int:
    return main(["export", "--checkpoint", str(ckpt), "--out", str(out), *extra])


def test_export_refuses_a_non_empty_folder(tiny_checkpoint, user_dir, capsys):
    before = tree(user_dir.parent)
    one_line_error(capsys, _export(tiny_checkpoint, user_dir), 2, "--out", "has no export_manifest.json", "refusing")
    assert tree(user_dir.parent) == before


def test_export_refuses_a_previous_export_holding_a_users_file(export_copy, tiny_checkpoint, capsys):
    (export_copy / "my-notes.txt").write_text("keep me")
    before = tree(export_copy.parent)
    one_line_error(capsys, _export(tiny_checkpoint, export_copy), 2, "my-notes.txt", "did not write")
    assert tree(export_copy.parent) == before


@pytest.mark.parametrize("where", ["checkpoint itself", "inside it", "its parent"])
def test_export_refuses_an_out_overlapping_the_checkpoint(tiny_checkpoint, tmp_path, capsys, where):
    ckpt = Path(shutil.copytree(tiny_checkpoint, tmp_path / "parent" / "ckpt"))
    out = {"checkpoint itself": ckpt, "inside it": ckpt / "onnx", "its parent": ckpt.parent}[where]
    before = tree(tmp_path)
    one_line_error(capsys, _export(ckpt, out), 2, "overlaps --checkpoint")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("out", [".", "x/.."])
def test_export_refuses_the_current_directory(tiny_checkpoint, user_dir, monkeypatch, capsys, out):
    (user_dir / "x").mkdir()
    monkeypatch.chdir(user_dir)
    before = tree(user_dir.parent)
    one_line_error(capsys, _export(tiny_checkpoint, out), 2, f"--out {out}", "current directory")
    assert tree(user_dir.parent) == before


def test_export_refuses_x_dotdot_resolving_to_a_users_folder(tiny_checkpoint, user_dir, capsys):
    before = tree(user_dir.parent)
    one_line_error(capsys, _export(tiny_checkpoint, user_dir / "sub" / ".."), 2, f"(= {user_dir})", "refusing")
    assert tree(user_dir.parent) == before


def test_export_refuses_a_file_as_out(tiny_checkpoint, user_dir, capsys):
    before = tree(user_dir)
    one_line_error(capsys, _export(tiny_checkpoint, user_dir / "notes.txt"), 2, "is not a directory")
    assert tree(user_dir) == before


def test_export_opset_above_the_supported_is_refused_before_work(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("videoxl.export.model.VideoXLModel.from_pretrained", _never("the model loaded"))
    one_line_error(capsys, _export(tiny_checkpoint, tmp_path / "out", "--opset", "99"), 2, "--opset 99 unsupported")
    assert tree(tmp_path) == {}


def test_export_of_a_truncated_checkpoint_names_the_shard(tiny_checkpoint, tmp_path, capsys):
    ckpt = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    shard = next(ckpt.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:5000])
    before = tree(tmp_path)
    one_line_error(capsys, _export(ckpt, tmp_path / "out"), 2, shard.name, "unreadable safetensors file (truncated or damaged header)")
    assert tree(tmp_path) == before


def test_export_of_a_checkpoint_without_config(tiny_checkpoint, tmp_path, capsys):
    ckpt = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    (ckpt / "config.json").unlink()
    before = tree(tmp_path)
    one_line_error(capsys, _export(ckpt, tmp_path / "out"), 2, "config.json")
    assert tree(tmp_path) == before


def _never(what: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what}, but the request should have been refused first")
    return fail


# --- 3. file-system failures are one line, checked before the model loads ---------------------
@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS, errno.ENOSPC])
def test_export_write_probe_failure(tiny_checkpoint, tmp_path, monkeypatch, capsys, code):
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if str(path).endswith(".write-probe"):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr("videoxl.outdir.os.open", refusing_open)
    monkeypatch.setattr("videoxl.export.model.VideoXLModel.from_pretrained", _never("the model loaded"))
    err = one_line_error(capsys, _export(tiny_checkpoint, tmp_path / "out"), 2, "--out", "cannot write there")
    assert errno.errorcode[code] in err
    assert tree(tmp_path) == {}


def test_export_needs_free_space_for_its_estimated_size(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("videoxl.outdir.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
    monkeypatch.setattr("videoxl.export.model.VideoXLModel.from_pretrained", _never("the model loaded"))
    one_line_error(capsys, _export(tiny_checkpoint, tmp_path / "out"), 2, "MiB needed", "0 MiB free")
    assert tree(tmp_path) == {}


def test_export_under_a_file(tiny_checkpoint, user_dir, capsys):
    before = tree(user_dir)
    one_line_error(capsys, _export(tiny_checkpoint, user_dir / "notes.txt" / "out"), 2, "not a directory")
    assert tree(user_dir) == before


def test_disk_full_mid_export_keeps_the_previous_export(tiny_checkpoint, export_copy, monkeypatch, capsys):
    def disk_full(model, path, opset, **_):
        path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("videoxl.export.onnx_export.export_vision", disk_full)
    before = tree(export_copy.parent)
    one_line_error(capsys, _export(tiny_checkpoint, export_copy), 1, "no space left", "vision.onnx")
    assert tree(export_copy.parent) == before


def test_demo_with_a_workdir_under_a_file(user_dir, capsys):
    before = tree(user_dir)
    one_line_error(capsys, main(["demo", "--workdir", str(user_dir / "notes.txt" / "demo")]), 1, "not a directory")
    assert tree(user_dir) == before


@pytest.mark.parametrize("seconds", ["0", "-3", "nan", "inf"])
def test_demo_seconds_must_be_positive(tmp_path, capsys, seconds):
    code = main(["demo", "--workdir", str(tmp_path / "demo"), "--seconds", seconds])
    one_line_error(capsys, code, 2, "videoxl demo: error: argument --seconds")
    assert tree(tmp_path) == {}


def test_empty_or_relative_xdg_cache_home_counts_as_unset(monkeypatch):
    for value in ("", "relative/cache"):
        monkeypatch.setenv("XDG_CACHE_HOME", value)
        assert _cache_dir() == Path.home() / ".cache" / "videoxl"
    monkeypatch.setenv("XDG_CACHE_HOME", "/srv/cache")
    assert _cache_dir() == Path("/srv/cache/videoxl")


def test_cache_under_a_file_is_one_line(tiny_checkpoint, synthetic_video, user_dir, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(user_dir / "notes.txt"))
    before = tree(user_dir)
    code = main(["run", "--checkpoint", str(tiny_checkpoint), "--video", str(synthetic_video), *RUN_FAST])
    one_line_error(capsys, code, 1, "not a directory")
    assert tree(user_dir) == before


# --- 4. everything knowable before the vision tower is checked before it ------------------------
@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--temperature", "nan", "argument --temperature: must be a finite number, got 'nan'"),
        ("--temperature", "-1", "argument --temperature: must be >= 0, got -1"),
        ("--fps", "inf", "argument --fps: must be a finite number, got 'inf'"),
        ("--top-p", "0", "argument --top-p: must be in (0, 1], got 0"),
        ("--top-p", "1.5", "argument --top-p: must be in (0, 1], got 1.5"),
        ("--seed", "-1", "argument --seed: must be >= 0, got -1"),
        ("--max-frames", "many", "argument --max-frames: expected an integer, got 'many'"),
        ("--dense-blocks", "some", "argument --dense-blocks: expected a count K >= 0"),
        ("--dense-blocks", "1,-2", "argument --dense-blocks: expected a count K >= 0"),
        ("--gpu-memory-budget", "lots", "argument --gpu-memory-budget: cannot read a byte size from 'lots'"),
        ("--gpu-memory-budget", "0GiB", "argument --gpu-memory-budget: must be a positive size"),
        ("--backend", "cuda", "argument --backend: invalid choice: 'cuda'"),
    ],
)
def test_run_flag_refused_at_parse_time(tiny_onnx, synthetic_video, capsys, flag, value, message):
    code = main(["run", "--onnx", str(tiny_onnx), "--video", str(synthetic_video), flag, value])
    one_line_error(capsys, code, 2, f"videoxl run: error: {message}")


def test_export_flags_refused_at_parse_time(tiny_checkpoint, tmp_path, capsys):
    code = main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "o"), "--max-frames", "0"])
    one_line_error(capsys, code, 2, "videoxl export: error: argument --max-frames: must be >= 1, got 0")
    assert tree(tmp_path) == {}


@pytest.fixture
def no_vision(monkeypatch):
    """Fails the test if the vision tower runs."""
    monkeypatch.setattr("videoxl.runtime.pipeline.Pipeline._encoded_batches", _never("the vision tower ran"))


def test_dense_block_list_out_of_range_before_vision(tiny_onnx, synthetic_video, capsys, no_vision):
    code = main(["run", "--onnx", str(tiny_onnx), "--video", str(synthetic_video), "--dense-blocks", "3,99", *RUN_FAST])
    one_line_error(capsys, code, 2, "--dense-blocks [3, 99] out of range", "blocks 0..1")


def test_huge_max_new_tokens_fails_the_memory_check_before_vision(tiny_onnx, synthetic_video, capsys, no_vision):
    code = main(["run", "--onnx", str(tiny_onnx), "--video", str(synthetic_video), "--max-frames", "8",
                 "--max-new-tokens", str(10**12), "--no-progress"])
    one_line_error(capsys, code, 2, "lower --max-new-tokens")


def test_bf16_with_onnxruntime_is_refused_before_exporting(tiny_checkpoint, synthetic_video, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    code = main(["run", "--checkpoint", str(tiny_checkpoint), "--video", str(synthetic_video), "--dtype", "bf16", *RUN_FAST])
    one_line_error(capsys, code, 2, "--dtype bf16", "fp32")
    assert tree(tmp_path) == {}


def test_interactive_with_no_input_says_so(tiny_onnx, synthetic_video, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code = main(["run", "--onnx", str(tiny_onnx), "--video", str(synthetic_video), "--interactive", *RUN_FAST])
    one_line_error(capsys, code, 2, "--interactive: no question given")


# --- 5. artifacts are what the manifest says --------------------------------------------------------
def _run_onnx(onnx_dir: Path, video: Path) -> int:
    return main(["run", "--onnx", str(onnx_dir), "--video", str(video), *RUN_FAST])


def test_truncated_graph_names_the_file(export_copy, synthetic_video, capsys):
    graph = export_copy / "decode.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    before = tree(export_copy)
    one_line_error(capsys, _run_onnx(export_copy, synthetic_video), 2, "decode.onnx:", "bytes, the export wrote")
    assert tree(export_copy) == before


def test_same_size_damage_is_found_by_the_hash(export_copy, synthetic_video, capsys):
    graph = export_copy / "kv_gather.onnx"
    data = bytearray(graph.read_bytes())
    data[-10] ^= 0xFF
    graph.write_bytes(bytes(data))
    one_line_error(capsys, _run_onnx(export_copy, synthetic_video), 2, "kv_gather.onnx", "sha256 mismatch")


def test_hashes_are_checked_once_per_file_version(export_copy, monkeypatch):
    load_onnx_artifacts(export_copy)  # verifies and records
    monkeypatch.setattr("videoxl.runtime.artifacts.file_sha256", _never("a verified file was hashed again"))
    load_onnx_artifacts(export_copy)
    graph = export_copy / "vision.onnx"
    os.utime(graph, ns=(graph.stat().st_atime_ns, graph.stat().st_mtime_ns + 1))
    with pytest.raises(AssertionError, match="hashed again"):
        load_onnx_artifacts(export_copy)  # touched: hashed again


def test_truncated_protobuf_with_an_old_manifest(export_copy, synthetic_video, capsys):
    """A manifest without sizes (older exports) lets a broken graph reach ONNX Runtime: still one line."""
    from videoxl.files import file_sha256

    graph = export_copy / "kv_gather.onnx"
    graph.write_bytes(graph.read_bytes()[:200])

    def old_style(manifest):
        del manifest["files"]
        manifest["graphs"]["kv_gather"]["sha256"] = file_sha256(graph)

    _rewrite_manifest(export_copy, old_style)
    one_line_error(capsys, _run_onnx(export_copy, synthetic_video), 2, "kv_gather.onnx: cannot load a graph")


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.onnx", "link.onnx"])
def test_manifest_paths_stay_inside_the_folder(export_copy, synthetic_video, capsys, name):
    (export_copy.parent / "outside.onnx").write_bytes((export_copy / "vision.onnx").read_bytes())
    (export_copy / "link.onnx").symlink_to(export_copy.parent / "outside.onnx")
    _rewrite_manifest(export_copy, lambda m: m["graphs"]["vision"].update(file=name))
    err = one_line_error(capsys, _run_onnx(export_copy, synthetic_video), 2, repr(name))
    assert "not a relative path" in err or "leads outside" in err


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / MANIFEST).unlink(), "no export_manifest.json"),
        (lambda d: (d / MANIFEST).write_text("{not json"), "unreadable manifest"),
        (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json"),
        (lambda d: (d / "prefill_chunk.onnx").unlink(), "prefill_chunk.onnx"),
        (lambda d: (d / "config.json").write_text((d / "config.json").read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 3')),
         "does not match the graphs"),
    ],
    ids=["no-manifest", "junk-manifest", "no-tokenizer", "no-graph", "config-mismatch"],
)
def test_damaged_export_is_one_line(export_copy, synthetic_video, capsys, damage, message):
    damage(export_copy)
    before = tree(export_copy)
    one_line_error(capsys, _run_onnx(export_copy, synthetic_video), 2, message)
    assert tree(export_copy) == before


def test_damaged_cache_entry_is_rebuilt(tiny_checkpoint, tiny_onnx, synthetic_video, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    entry = tmp_path / "videoxl" / "onnx" / f"{checkpoint_fingerprint(tiny_checkpoint)}-fp32"
    shutil.copytree(tiny_onnx, entry)
    graph = entry / "vision.onnx"
    graph.write_bytes(graph.read_bytes()[:1000])
    assert main(["run", "--checkpoint", str(tiny_checkpoint), "--video", str(synthetic_video), *RUN_FAST]) == 0
    assert "cached export is damaged" in capsys.readouterr().err
    load_onnx_artifacts(entry)  # whole again
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name]  # nothing aside, nothing staged


# --- 6. no tracebacks from inputs -----------------------------------------------------------------
def _late_index_mp4(path: Path) -> Path:
    """An mp4 with its index (moov) after the data, as cameras write them."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        for i in range(80):
            frame = av.VideoFrame.from_ndarray(np.full((120, 160, 3), i * 3, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def _png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(20):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def _video_case(tmp_path: Path, kind: str) -> Path:
    if kind == "late-index-cut-95%":
        whole = _late_index_mp4(tmp_path / "whole.mp4").read_bytes()
        (tmp_path / "cut.mp4").write_bytes(whole[: len(whole) * 95 // 100])
        (tmp_path / "whole.mp4").unlink()
        return tmp_path / "cut.mp4"
    if kind == "30000x30000-image":
        (tmp_path / "frames").mkdir()
        (tmp_path / "frames" / "0001.png").write_bytes(_png_header(30000, 30000))
        return tmp_path / "frames"
    if kind == "audio-only":
        return _audio_only(tmp_path / "speech.m4a")
    if kind == "empty-file":
        (tmp_path / "empty.mp4").write_bytes(b"")
        return tmp_path / "empty.mp4"
    if kind == "garbage":
        (tmp_path / "bad.mp4").write_bytes(b"\0not a video" * 100)
        return tmp_path / "bad.mp4"
    if kind == "missing":
        return tmp_path / "nope.mp4"
    if kind == "folder-without-images":
        (tmp_path / "docs").mkdir()
        (tmp_path / "docs" / "readme.txt").write_text("hi")
        return tmp_path / "docs"
    if kind == "broken-image":
        (tmp_path / "frames").mkdir()
        (tmp_path / "frames" / "0001.jpg").write_bytes(b"\xff\xd8\xff broken")
        return tmp_path / "frames"
    raise KeyError(kind)


@pytest.mark.parametrize(
    "kind", ["late-index-cut-95%", "30000x30000-image", "audio-only", "empty-file", "garbage", "missing",
             "folder-without-images", "broken-image"],
)
def test_bad_video_is_one_line(tiny_onnx, tmp_path, capsys, kind):
    video = _video_case(tmp_path, kind)
    before = tree(tmp_path)
    code = main(["run", "--onnx", str(tiny_onnx), "--video", str(video), *RUN_FAST])
    one_line_error(capsys, code, 2, "videoxl run: error:", video.name)
    assert tree(tmp_path) == before


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip().startswith("videoxl ")


# --- engines: the same out-dir rules and path confinement ----------------------------------------
def test_build_out_dir_rules(tmp_path, user_dir):
    from videoxl.engines.build import _check_out_dir
    from videoxl.engines.errors import EngineBuildError

    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    with pytest.raises(EngineBuildError, match="refusing to replace"):
        _check_out_dir(user_dir, onnx_dir)
    with pytest.raises(EngineBuildError, match="overlaps --onnx"):
        _check_out_dir(onnx_dir / "engines", onnx_dir)
    (user_dir / "manifest.json").write_text("{}")
    assert _check_out_dir(user_dir / "sub" / "..", onnx_dir) == user_dir


def test_engine_manifest_paths_stay_inside(tmp_path):
    from videoxl.engines.manifest import _onnx_problems

    (tmp_path / "onnx").mkdir()
    problems = _onnx_problems(tmp_path / "onnx", {"../secret.onnx": {"bytes": 1, "mtime_ns": 0, "sha256": ""}})
    assert len(problems) == 1 and "not a relative path" in problems[0]


# --- 1, 2: real processes: SIGTERM mid-export, stale staging, two runs sharing the cache ----------
def _cli(*argv: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "videoxl.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})},
    )


def test_sigterm_mid_export_leaves_nothing(tiny_checkpoint, tmp_path):
    out = tmp_path / "parent" / "onnx"
    process = _cli("export", "--checkpoint", str(tiny_checkpoint), "--out", str(out))
    deadline = time.monotonic() + 120

    def staging_started() -> bool:
        return out.parent.is_dir() and any(p.name.startswith(".onnx.staging-") for p in out.parent.iterdir())

    while not staging_started():
        assert process.poll() is None and time.monotonic() < deadline, "the export never started staging"
        time.sleep(0.05)
    time.sleep(2)  # into the model load and graph writing
    assert process.poll() is None, "the export ended before it could be interrupted"
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert err.strip() == "videoxl export: terminated"
    assert tree(out.parent) == {}


def test_stale_staging_of_a_dead_process_is_removed_and_an_export_is_replaced(tiny_checkpoint, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "onnx"
    assert _export(tiny_checkpoint, out) == 0
    first_manifest = (out / MANIFEST).stat().st_ino
    assert (out.stat().st_mode & 0o777) == 0o777 & ~_umask()  # an ordinary folder, not mkdtemp's 0700
    stale = tmp_path / f".onnx.staging-{dead.pid}-0bad"
    (stale / "sub").mkdir(parents=True)
    live = tmp_path / f".onnx.staging-{os.getppid()}-0001"  # a live process's staging is left alone
    live.mkdir()
    assert _export(tiny_checkpoint, out, "--max-frames", "32") == 0
    assert json.loads((out / MANIFEST).read_text())["max_frames"] == 32
    assert (out / MANIFEST).stat().st_ino != first_manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["onnx", live.name])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_previous_export_of_a_process_killed_between_renames_is_restored(tmp_path):
    from videoxl.outdir import remove_stale

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    previous = tmp_path / f".onnx.previous-{dead.pid}-0bad"
    previous.mkdir()
    (previous / MANIFEST).write_text("{}")
    remove_stale(tmp_path / "onnx")
    assert (tmp_path / "onnx" / MANIFEST).is_file() and not previous.exists()


def test_two_runs_sharing_the_cache_export_once(tiny_checkpoint, synthetic_video, tmp_path):
    argv = ("run", "--checkpoint", str(tiny_checkpoint), "--video", str(synthetic_video), *RUN_FAST)
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    first, second = _cli(*argv, env=env), _cli(*argv, env=env)
    results = [p.communicate(timeout=300) for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], results
    errs = [err for _, err in results]
    assert sum(f"exporting {tiny_checkpoint}" in err for err in errs) == 1, errs
    assert all("Traceback" not in err for err in errs)
    (entry,) = (tmp_path / "videoxl" / "onnx").iterdir()
    load_onnx_artifacts(entry)
