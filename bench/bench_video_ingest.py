"""Video ingest: time to sample 1,024 frames from long 1080p H.264 files, before and after.

    .venv/bin/python bench/bench_video_ingest.py                    # legacy timed on the 10-min file only
    .venv/bin/python bench/bench_video_ingest.py --legacy all       # also on the 2-h file (~50 min more here)
    .venv/bin/python bench/bench_video_ingest.py --scaler-tokens    # Pillow vs FFmpeg scaler: pixels, tiny-model tokens
    .venv/bin/python bench/bench_video_ingest.py --out bench/RESULTS.md

The test files are written once into ``--workdir`` (default: a folder in the system's temp
directory) and reused:

1. ten seconds of 1920x1080 30 fps content (moving gradients, shapes and a textured band),
   encoded with libx264 (preset veryfast, CRF 23, a keyframe every 2 s, 3 B-frames: a
   typical streaming GOP);
2. the same packets repeated with shifted timestamps (a remux, no re-encoding) into a
   10-minute and a 2-hour MP4 (18,000 and 216,000 frames).

Measured, each once (wall seconds, this machine):

- **decoder floor**: sequential decoding of the first 60 s (no colour conversion) -> the
  decoder's frames/s, and the implied time to decode the whole file, which is what any
  reader that decodes every frame pays at least;
- **legacy**: the reader as it was before seeking (``videoxl/video.py`` at commit
  ``LEGACY_COMMIT``, loaded from git history): decode every frame up to the last planned one,
  full-size RGB, Pillow resize;
- **now**: :func:`videoxl.video.open_video` + ``iter_batches`` with the default Pillow
  resize (exact parity with SigLIP's processor), and with ``scaler="ffmpeg"``.

The two readers plan different frames (the old sampler vs the official rule); where both
plans take the same frame, the script checks that the pixels agree exactly.
"""

from __future__ import annotations

import argparse
import fractions
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from videoxl.video import open_video  # noqa: E402

LEGACY_COMMIT = "2fabf7a"  # last commit with the sequential reader
FPS = 30
WIDTH, HEIGHT = 1920, 1080
PATTERN_SECONDS = 10
FRAMES = 1024


def _pattern_frame(index: int) -> np.ndarray:
    """A 1080p RGB frame with motion everywhere (so every frame costs the decoder real work)."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    t = index / FPS
    frame = np.empty((HEIGHT, WIDTH, 3), np.uint8)
    frame[..., 0] = ((x + 40 * t * 8) % 256).astype(np.uint8)
    frame[..., 1] = ((y + 25 * t * 8) % 256).astype(np.uint8)
    frame[..., 2] = (((x + y) // 4 + index) % 256).astype(np.uint8)
    rng = np.random.default_rng(0)  # the same texture every frame, scrolled
    texture = rng.integers(0, 256, size=(200, WIDTH + 400, 3), dtype=np.uint8)
    shift = (index * 6) % 400
    frame[440:640] = texture[:, shift : shift + WIDTH]
    for k in range(6):  # moving squares
        cx = int((200 * k + 300 * t * (k + 1)) % (WIDTH - 160))
        cy = int(100 + 150 * k)
        frame[cy : cy + 120, cx : cx + 160] = (255 - 30 * k, 40 * k, 128)
    return frame


def write_pattern(path: Path) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23", "g": str(2 * FPS), "keyint_min": str(2 * FPS),
                          "bf": "3", "sc_threshold": "0"}
        for index in range(PATTERN_SECONDS * FPS):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(_pattern_frame(index), format="rgb24")))
        container.mux(stream.encode(None))


def write_long(pattern: Path, path: Path, *, seconds: int) -> None:
    """Repeat the pattern's packets with shifted timestamps: a long file with no re-encoding."""
    with av.open(str(pattern)) as source:
        in_stream = source.streams.video[0]
        packets = [(p.pts, p.dts, p.is_keyframe, bytes(p)) for p in source.demux(in_stream) if p.size]
        period = int(round(PATTERN_SECONDS / in_stream.time_base))
        with av.open(str(path), "w") as out:
            out_stream = out.add_stream_from_template(in_stream)
            for rep in range(seconds // PATTERN_SECONDS):
                offset = rep * period
                for pts, dts, key, data in packets:
                    packet = av.Packet(data)
                    packet.pts, packet.dts = pts + offset, dts + offset
                    packet.is_keyframe = key
                    packet.time_base = in_stream.time_base
                    packet.stream = out_stream
                    out.mux(packet)


def prepare_files(workdir: Path) -> dict[str, Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    pattern = workdir / "pattern_1080p30.mp4"
    if not pattern.exists():
        print(f"encoding {PATTERN_SECONDS} s of 1080p30 H.264 ...", flush=True)
        write_pattern(pattern)
    files = {"10 min": workdir / "h264_1080p30_10min.mp4", "2 h": workdir / "h264_1080p30_2h.mp4"}
    for (label, path), seconds in zip(files.items(), (600, 7200)):
        if not path.exists():
            print(f"writing the {label} file by repeating packets ...", flush=True)
            write_long(pattern, path, seconds=seconds)
    return files


def load_legacy():
    """videoxl/video.py as it was at LEGACY_COMMIT, imported under another name."""
    source = subprocess.run(["git", "show", f"{LEGACY_COMMIT}:videoxl/video.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    legacy_file = Path(tempfile.mkdtemp()) / "video_legacy.py"
    legacy_file.write_text(source)
    spec = importlib.util.spec_from_file_location("video_legacy", legacy_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def decoder_floor(path: Path, seconds: int = 60) -> float:
    """Frames/s of plain sequential decoding (frame threads, no colour conversion)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        limit = seconds * FPS
        started = time.perf_counter()
        decoded = 0
        for _ in container.decode(stream):
            decoded += 1
            if decoded == limit:
                break
        return decoded / (time.perf_counter() - started)


def sample(open_fn, path: Path, keep: set[int], **kwargs) -> tuple[float, np.ndarray, dict[int, np.ndarray]]:
    """-> (seconds to plan and read every planned frame, planned indices, pixels of the `keep` indices)."""
    started = time.perf_counter()
    source = open_fn(path, max_frames=FRAMES, **kwargs)
    kept = {}
    done = 0
    for batch in source.iter_batches(32):
        for k in range(len(batch.pixels)):
            index = int(source.plan.frame_indices[done + k])
            if index in keep:
                kept[index] = batch.pixels[k].copy()
        done += len(batch.pixels)
    return time.perf_counter() - started, source.plan.frame_indices, kept


def scaler_tokens(path: Path) -> str:
    """Pillow vs FFmpeg scaler on 8 frames: pixel differences, and visual tokens of the tiny model
    (PyTorch vision path: SigLIP, DTS compressor, projector) on a random tiny checkpoint."""
    import torch

    from videoxl.export.model import VideoXLModel
    from videoxl.tiny import write_tiny_checkpoint

    model = VideoXLModel.from_pretrained(write_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny"))
    size = model.cfg.image_size

    def pixels(scaler: str) -> np.ndarray:
        source = open_video(path, image_size=size, max_frames=8, scaler=scaler)
        return np.concatenate([b.pixels for b in source.iter_batches(8)])

    pillow, ffmpeg = pixels("pillow"), pixels("ffmpeg")
    diff = np.abs(pillow - ffmpeg) * 127.5
    with torch.no_grad():
        a = model.encode_frames(torch.from_numpy(pillow)).numpy()
        b = model.encode_frames(torch.from_numpy(ffmpeg)).numpy()
    relative = np.linalg.norm(a - b) / np.linalg.norm(a)
    cosine = ((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).min()
    return (f"FFmpeg bicubic vs Pillow bicubic at {size}x{size} (8 frames of the 10-min file): pixel difference "
            f"max {diff.max():.0f}, mean {diff.mean():.2f}, 99th percentile {np.percentile(diff, 99):.0f} "
            f"(0-255 scale); tiny-model visual tokens {a.shape}: relative L2 difference {relative:.3f}, "
            f"lowest cosine {cosine:.4f}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "videoxl_bench_ingest")
    parser.add_argument("--legacy", choices=("none", "short", "all"), default="short",
                        help="files to time the legacy reader on: none, the 10-min one (default), all (~50 min more)")
    parser.add_argument("--make-only", action="store_true", help="write the test files and stop")
    parser.add_argument("--scaler-tokens", action="store_true",
                        help="only compare the scalers' pixels and tiny-model visual tokens")
    parser.add_argument("--out", type=Path, help="append the results table to this markdown file")
    args = parser.parse_args()

    files = prepare_files(args.workdir)
    if args.make_only:
        return
    if args.scaler_tokens:
        print(scaler_tokens(files["10 min"]))
        return
    legacy = load_legacy()
    rows = []
    for label, path in files.items():
        with av.open(str(path)) as container:
            total = container.streams.video[0].frames
        run_legacy = args.legacy == "all" or (args.legacy == "short" and label == "10 min")
        new_plan = open_video(path, max_frames=FRAMES).plan.frame_indices
        old_plan = legacy.open_video(path, max_frames=FRAMES).plan.frame_indices
        common = set(sorted(set(new_plan.tolist()) & set(old_plan.tolist()))[::50][:8])
        floor_fps = decoder_floor(path)
        new_s, new_idx, new_px = sample(open_video, path, common)
        ff_s, _, _ = sample(open_video, path, set(), scaler="ffmpeg")
        legacy_s = None
        if run_legacy:
            legacy_s, _, old_px = sample(legacy.open_video, path, common)
            same = all(np.array_equal(old_px[i], new_px[i]) for i in common)
            print(f"{label}: {len(common)} frames both plans take have the same pixels: {same}", flush=True)
        rows.append((label, total, len(old_plan), len(new_idx), floor_fps, legacy_s, new_s, ff_s))
        print(rows[-1], flush=True)

    lines = [
        "",
        "## Video ingest: sampling up to 1,024 frames from 1080p H.264 (CPU)",
        "",
        f"`.venv/bin/python bench/bench_video_ingest.py --legacy {args.legacy}` ({time.strftime('%Y-%m-%d')}, "
        "a 2-core CPU machine shared with other jobs, one run, wall seconds). libx264 veryfast CRF 23, "
        "keyframe every 2 s, 3 B-frames, 30 fps; the long files repeat a 10-s pattern's packets. "
        "Decoder floor = every frame decoded at the measured sequential rate (frame threads, no colour "
        "conversion): a lower bound for the legacy reader, which decodes every frame up to the last "
        "planned one (the last frame, for a uniform plan). The legacy plan is the old sampler's, the "
        "new one the official rule's, so frame counts differ.",
        "",
        "| file | frames | planned legacy / now | decoder fps | full-decode floor s | legacy s | now s (Pillow) "
        "| legacy / now | now s (FFmpeg scaler) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, total, old_n, new_n, floor_fps, legacy_s, new_s, ff_s in rows:
        floor_s = total / floor_fps
        if legacy_s is not None:
            legacy_text, ratio = f"{legacy_s:.1f}", f"{legacy_s / new_s:.1f}x"
        else:
            legacy_text, ratio = f">= {floor_s:.0f} (floor, not run)", f">= {floor_s / new_s:.1f}x"
        lines.append(f"| {label} | {total} | {old_n} / {new_n} | {floor_fps:.0f} | {floor_s:.0f} | {legacy_text} | "
                     f"{new_s:.1f} | {ratio} | {ff_s:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with args.out.open("a") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
