"""Video ingest: the sampling rule, preprocessing, lazy batches, every source and error."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from videoxl.video import (
    VideoError,
    open_video,
    plan_sampling,
    plan_sampling_by_time,
    preprocess_frames,
    synthetic_frame,
    synthetic_frame_index,
    write_audio_only_file,
    write_synthetic_video,
    write_vfr_video,
)


def decoded_indices(pixels: np.ndarray) -> list[int]:
    """Frame indices encoded in preprocessed (B, 3, s, s) synthetic frames."""
    return [synthetic_frame_index((frame.transpose(1, 2, 0) + 1.0) * 127.5) for frame in pixels]


def official_times(indices, fps: float) -> list[float]:
    return [round(int(i) / fps, 1) for i in indices]


def read_all(source, batch_frames: int = 16) -> tuple[np.ndarray, np.ndarray]:
    batches = list(source.iter_batches(batch_frames))
    return np.concatenate([b.pixels for b in batches]), np.concatenate([b.timestamps for b in batches])


# --- the sampling rule, pure ------------------------------------------------------------------


def official_rule(num_frames: int, video_fps: float, max_frames: int, fps: float = 1.0, max_fps: float = 4.0):
    """Video-XL-2's load_video (lmms_eval/models/videoxl2.py), written out step by step."""
    step = round(video_fps / fps)
    frame_idx = [i for i in range(0, num_frames, step)]
    higher_fps = min(max_frames // len(frame_idx), max_fps)
    if higher_fps > fps:
        higher_steps = round(video_fps / higher_fps)
        frame_idx = [i for i in range(0, num_frames, higher_steps)]
    if len(frame_idx) > max_frames:
        frame_idx = np.linspace(0, num_frames - 1, max_frames, dtype=int).tolist()
    return frame_idx, [round(i / video_fps, 1) for i in frame_idx]


def _case_table() -> list[tuple[float, float, int]]:
    """(duration s, source fps, budget): hand-picked edges plus 200 drawn cases."""
    cases = [(20, 24, 48), (5, 30, 1024), (20, 30, 40), (600, 30, 1024), (7200, 30, 1024), (7200, 25, 1024),
             (60, 29.97, 1024), (600, 30000 / 1001, 1024), (10, 12.5, 1024), (1000, 12.5, 1024),
             (1024, 25, 1024), (1024.04, 25, 1024), (10, 10, 1024), (3, 8, 256), (0.5, 60, 8)]
    rng = np.random.default_rng(11)
    for _ in range(200):
        cases.append((float(rng.choice([2, 7, 20, 33.3, 60, 95, 300, 601, 1800, 3600, 7250])),
                      float(rng.choice([12.5, 23.976, 24, 25, 29.97, 30, 50, 59.94, 60])),
                      int(rng.choice([8, 16, 32, 48, 64, 100, 256, 512, 1000, 1024, 2048]))))
    return cases


def test_sampling_follows_the_official_rule_on_a_table_of_cases():
    for seconds, video_fps, budget in _case_table():
        num_frames = max(1, int(seconds * video_fps))
        expected_idx, expected_ts = official_rule(num_frames, video_fps, budget)
        plan = plan_sampling(num_frames=num_frames, video_fps=video_fps, max_frames=budget)
        case = (seconds, video_fps, budget)
        assert plan.frame_indices.tolist() == expected_idx, case
        assert plan.timestamps.tolist() == expected_ts, case
        assert plan.frame_indices.dtype == np.int64 and plan.timestamps.dtype == np.float64


def test_short_video_at_a_budget_steps_by_an_integer_rate():
    # 20 s at 24 fps, budget 48: 20 frames at 1 fps; higher = min(48 // 20, 4) = 2 -> step 12 -> 40 frames.
    plan = plan_sampling(num_frames=480, video_fps=24.0, max_frames=48)
    np.testing.assert_array_equal(plan.frame_indices, np.arange(0, 480, 12))
    assert len(plan) == 40


def test_rounding_is_pythons_half_to_even():
    # 10 fps at max_fps 4: round(2.5) = 2 (not 3); 30 fps: round(7.5) = 8.
    assert plan_sampling(num_frames=100, video_fps=10.0, max_frames=1024).frame_indices.tolist() == list(range(0, 100, 2))
    assert plan_sampling(num_frames=150, video_fps=30.0, max_frames=1024).frame_indices.tolist() == list(range(0, 150, 8))
    # Frame 16500 at 30000/1001 fps is 550.55 s: Python's round gives 550.5, numpy's 550.6.
    plan = plan_sampling(num_frames=18000, video_fps=30000 / 1001, max_frames=1000)  # step 30
    assert plan.frame_indices[550] == 16500 and plan.timestamps[550] == 550.5


def test_long_video_is_sampled_uniformly_with_truncation():
    num_frames = 2 * 3600 * 25
    plan = plan_sampling(num_frames=num_frames, video_fps=25.0, max_frames=1024)
    truncated = np.linspace(0, num_frames - 1, 1024).astype(np.int64)
    np.testing.assert_array_equal(plan.frame_indices, truncated)
    assert not np.array_equal(truncated, np.round(np.linspace(0, num_frames - 1, 1024)))  # the case matters
    assert plan.frame_indices[-1] == num_frames - 1


def test_slow_sources_take_every_frame_where_the_official_step_would_be_zero():
    # 2 fps source at max_fps 4: round(2 / 4) = 0 officially (range() fails); here step 1.
    np.testing.assert_array_equal(plan_sampling(num_frames=20, video_fps=2.0, max_frames=1024).frame_indices,
                                  np.arange(20))
    single = plan_sampling(num_frames=1, video_fps=30.0, max_frames=1024)
    np.testing.assert_array_equal(single.frame_indices, [0])
    np.testing.assert_array_equal(single.timestamps, [0.0])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_frames": 0, "video_fps": 30.0, "max_frames": 8},
        {"num_frames": 10, "video_fps": 0.0, "max_frames": 8},
        {"num_frames": 10, "video_fps": 30.0, "max_frames": 0},
        {"num_frames": 10, "video_fps": 30.0, "fps": -1.0, "max_frames": 8},
    ],
)
def test_sampling_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        plan_sampling(**kwargs)


def test_sampling_by_time_equals_the_official_rule_on_a_constant_grid():
    for seconds, video_fps, budget in _case_table()[:60]:
        num_frames = max(1, int(seconds * video_fps))
        times = np.arange(num_frames) / video_fps
        by_time = plan_sampling_by_time(times, duration_s=num_frames / video_fps, max_frames=budget)
        expected_idx, expected_ts = official_rule(num_frames, video_fps, budget)
        assert by_time.frame_indices.tolist() == expected_idx, (seconds, video_fps, budget)
        assert by_time.timestamps.tolist() == expected_ts


def test_sampling_by_time_takes_the_frame_on_screen():
    # 16 frames over 5.12 s, bunched: the rule runs at 16 / 5.12 = 3.125 fps -> every grid
    # point; each takes the frame shown at that time, once.
    times = np.array([0, 0.1, 0.2, 0.3, 0.4, 1.51, 1.6, 1.7, 2.5, 2.6, 3.0, 3.1, 4.0, 4.5, 5.0, 5.0 + 0.08])
    plan = plan_sampling_by_time(times, duration_s=5.12, max_frames=1024)
    grid = np.arange(16) / 3.125
    expected = sorted({int(np.searchsorted(times, t + 1e-6, side="right") - 1) for t in grid})
    assert plan.frame_indices.tolist() == expected
    assert plan.timestamps.tolist() == [round(float(times[i]), 1) for i in expected]
    with pytest.raises(ValueError):
        plan_sampling_by_time(times[::-1], duration_s=6.0, max_frames=8)


# --- sampling on real files -------------------------------------------------------------------


def test_synthetic_video_samples_the_planned_frames(synthetic_video):
    source = open_video(synthetic_video)  # 10 s at 8 fps, 80 frames: 4 fps -> every 2nd frame
    assert source.source_num_frames == 80 and source.source_fps == pytest.approx(8.0)
    assert source.duration_s == pytest.approx(10.0)
    np.testing.assert_array_equal(source.plan.frame_indices, np.arange(0, 80, 2))
    assert source.num_frames == 40
    pixels, timestamps = read_all(source)
    assert pixels.shape == (40, 3, 384, 384) and pixels.dtype == np.float32
    assert decoded_indices(pixels) == list(range(0, 80, 2))
    assert timestamps.tolist() == official_times(range(0, 80, 2), 8.0)
    assert "clip.mp4" in source.source_description


@pytest.mark.parametrize(("seconds", "fps", "step"), [(4, 29.97, 7), (8, 12.5, 3)])
def test_odd_frame_rate_files(tmp_path, seconds, fps, step):
    path = write_synthetic_video(tmp_path / "odd.mp4", seconds=seconds, fps=fps, width=96, height=64)
    source = open_video(path, image_size=64)
    num_frames = round(seconds * fps)
    assert source.source_num_frames == num_frames
    assert source.source_fps == pytest.approx(fps, abs=1e-3)
    expected = np.arange(0, num_frames, step)
    pixels, timestamps = read_all(source)
    assert decoded_indices(pixels) == expected.tolist()
    assert timestamps.tolist() == official_times(expected, fps)


def test_longer_file_paced_and_uniform(tmp_path):
    # 40 s at 25 fps (1000 frames). Budget 64: 40 frames at 1 fps, higher = 64 // 40 = 1 -> stays
    # at step 25. Budget 16: uniform, truncated linspace.
    path = write_synthetic_video(tmp_path / "long.mkv", seconds=40, fps=25, width=96, height=64)
    paced = open_video(path, image_size=32, max_frames=64)
    assert paced.source_num_frames == 1000  # .mkv declares no frame count: packets counted
    np.testing.assert_array_equal(paced.plan.frame_indices, np.arange(0, 1000, 25))
    assert decoded_indices(read_all(paced)[0]) == list(range(0, 1000, 25))

    uniform = open_video(path, image_size=32, max_frames=16)
    expected = np.linspace(0, 999, 16, dtype=int)
    np.testing.assert_array_equal(uniform.plan.frame_indices, expected)
    pixels, timestamps = read_all(uniform)
    assert decoded_indices(pixels) == [i % 4096 for i in expected]
    assert timestamps.tolist() == official_times(expected, 25.0)


@pytest.mark.parametrize("suffix", [".mp4", ".avi", ".mkv", ".ts"])
def test_containers_agree(tmp_path, suffix):
    # Frame count from: the index (.mp4, .avi), packets (.mkv), the stream duration (.ts).
    path = write_synthetic_video(tmp_path / f"clip{suffix}", seconds=3, fps=8, width=64, height=48)
    source = open_video(path, image_size=32)
    assert source.source_num_frames == 24 and source.source_fps == pytest.approx(8.0)
    pixels, timestamps = read_all(source)
    assert decoded_indices(pixels) == list(range(0, 24, 2))
    assert timestamps.tolist() == official_times(range(0, 24, 2), 8.0)


def test_file_with_audio_uses_the_video_stream(tmp_path):
    path = write_synthetic_video(tmp_path / "av.mp4", seconds=2, fps=8, with_audio=True)
    with av.open(str(path)) as container:
        assert len(container.streams.audio) == 1
    source = open_video(path, image_size=48)
    assert source.source_num_frames == 16
    assert decoded_indices(read_all(source)[0]) == list(range(0, 16, 2))


# --- preprocessing ----------------------------------------------------------------------------


def test_preprocessing_matches_pil_bicubic_and_siglip_normalisation():
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, size=(2, 77, 50, 3), dtype=np.uint8)  # odd, non-square
    out = preprocess_frames(frames, 384)
    assert out.shape == (2, 3, 384, 384) and out.dtype == np.float32
    for frame, got in zip(frames, out):
        resized = np.asarray(Image.fromarray(frame).resize((384, 384), Image.BICUBIC), dtype=np.float64)
        expected = ((resized / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert out.min() >= -1.0 and out.max() <= 1.0


def test_preprocessing_range_and_channel_order():
    frame = np.zeros((1, 10, 10, 3), dtype=np.uint8)
    frame[..., 0] = 255  # pure red
    out = preprocess_frames(frame, 16)
    np.testing.assert_array_equal(out[0, 0], np.ones((16, 16), np.float32))
    np.testing.assert_array_equal(out[0, 1:], -np.ones((2, 16, 16), np.float32))


def test_preprocessing_rejects_bad_frames():
    with pytest.raises(VideoError):
        preprocess_frames(np.zeros((1, 8, 8, 3), dtype=np.float32), 16)
    with pytest.raises(VideoError):
        preprocess_frames(np.zeros((8, 8, 3), dtype=np.uint8), 16)


def test_file_pixels_equal_preprocessing_of_the_decoded_frame(synthetic_video):
    with av.open(str(synthetic_video)) as container:
        first = next(container.decode(video=0)).to_ndarray(format="rgb24")
    batch = next(open_video(synthetic_video).iter_batches(1))
    np.testing.assert_array_equal(batch.pixels, preprocess_frames(first[None], 384))


# --- batches ----------------------------------------------------------------------------------


def test_batches_are_bounded_and_cover_the_plan(synthetic_video):
    source = open_video(synthetic_video, image_size=32)
    batches = list(source.iter_batches(7))
    assert [len(b.pixels) for b in batches] == [7, 7, 7, 7, 7, 5]
    assert all(len(b.timestamps) == len(b.pixels) for b in batches)
    np.testing.assert_array_equal(np.concatenate([b.timestamps for b in batches]), source.plan.timestamps)
    # iterating again reads the file again and gives the same pixels
    np.testing.assert_array_equal(next(source.iter_batches(7)).pixels, batches[0].pixels)
    with pytest.raises(ValueError):
        next(source.iter_batches(0))


def test_batches_are_produced_lazily(tmp_path):
    # A file truncated at 60 %: the first batch arrives before the decoder reaches the cut.
    path = write_synthetic_video(tmp_path / "cut.mp4", seconds=10, fps=8)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])
    source = open_video(path, image_size=32)  # the index up front still says 80 frames
    batches = source.iter_batches(4)
    first = next(batches)
    assert decoded_indices(first.pixels) == [0, 2, 4, 6]
    with pytest.raises(VideoError, match=r"decoded \d+ of 80 expected frames") as err:
        list(batches)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_image_folder_is_read_lazily(tmp_path):
    for i in range(8):
        Image.fromarray(synthetic_frame(i, width=32, height=24)).save(tmp_path / f"f{i}.png")
    batches = open_video(tmp_path, image_size=32).iter_batches(2)
    assert decoded_indices(next(batches).pixels) == [0, 1]
    for i in range(2, 8):
        (tmp_path / f"f{i}.png").unlink()
    with pytest.raises(VideoError, match="f2.png"):
        next(batches)


# --- image folders and arrays -----------------------------------------------------------------


def test_image_folder_in_natural_order_at_source_fps(tmp_path):
    for i in range(12):  # frame_1 .. frame_12: natural order puts frame_10 after frame_9
        Image.fromarray(synthetic_frame(i, width=48, height=32)).save(tmp_path / f"frame_{i + 1}.png")
    Image.fromarray(synthetic_frame(12, width=48, height=32)).convert("RGBA").save(tmp_path / "frame_13.png")
    (tmp_path / "notes.txt").write_text("not an image")

    default = open_video(tmp_path, image_size=32)  # 1 image per second: every image
    assert default.source_fps == 1.0 and default.source_num_frames == 13
    pixels, timestamps = read_all(default)
    assert decoded_indices(pixels) == list(range(13))
    np.testing.assert_array_equal(timestamps, np.arange(13, dtype=np.float64))

    fast = open_video(tmp_path, image_size=32, source_fps=8.0)  # 1.6 s at 8 fps: step 2
    pixels, timestamps = read_all(fast)
    assert decoded_indices(pixels) == [0, 2, 4, 6, 8, 10, 12]
    assert timestamps.tolist() == official_times(range(0, 13, 2), 8.0)


def test_array_source():
    frames = np.stack([synthetic_frame(i, width=40, height=30) for i in range(20)])
    source = open_video(frames, source_fps=2.0, image_size=32)  # 10 s at 2 fps: every frame
    assert source.duration_s == 10.0
    pixels, timestamps = read_all(source, batch_frames=6)
    assert decoded_indices(pixels) == list(range(20))
    np.testing.assert_allclose(timestamps, np.arange(20) / 2.0)
    np.testing.assert_array_equal(pixels[3:4], preprocess_frames(frames[3:4], 32))


# --- errors -----------------------------------------------------------------------------------


def _random_bytes(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path


def _empty_folder(root: Path) -> Path:
    (root / "empty_dir").mkdir()
    (root / "empty_dir" / "readme.txt").write_text("no images here")
    return root / "empty_dir"


def _folder_with_a_bad_image(root: Path) -> Path:
    (root / "bad_dir").mkdir()
    Image.fromarray(synthetic_frame(0, width=16, height=16)).save(root / "bad_dir" / "0000.png")
    _random_bytes(root / "bad_dir" / "0001.png")
    return root / "bad_dir"


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda d: d / "missing.mp4", "no such file"),
        (lambda d: write_audio_only_file(d / "voice.m4a"), "no video stream"),
        (lambda d: write_audio_only_file(d / "song.mp4", cover_art=True),
         r"no video stream \(the file holds audio, cover picture\)"),
        (lambda d: _random_bytes(d / "noise.mp4"), "not a readable video"),
        (lambda d: write_synthetic_video(d / "empty.avi", seconds=0, fps=8), "no frames"),
        (_empty_folder, "no images"),
        (_folder_with_a_bad_image, "0001.png: unreadable image"),
    ],
    ids=["missing", "audio-only", "cover-art-only", "random-bytes", "zero-frames", "empty-folder", "unreadable-image"],
)
def test_unusable_sources_give_one_line_errors(tmp_path, make, match):
    path = make(tmp_path)
    with pytest.raises(VideoError, match=match) as err:
        open_video(path)
    message = str(err.value)
    assert "\n" not in message
    assert path.name in message


@pytest.mark.parametrize(
    ("frames", "kwargs", "match"),
    [
        (np.zeros((4, 8, 8, 3), np.float32), {"source_fps": 1.0}, "uint8"),
        (np.zeros((4, 8, 8), np.uint8), {"source_fps": 1.0}, r"\(N, H, W, 3\)"),
        (np.zeros((0, 8, 8, 3), np.uint8), {"source_fps": 1.0}, "no frames"),
        (np.zeros((4, 8, 8, 3), np.uint8), {}, "source_fps is required"),
    ],
)
def test_bad_arrays_give_one_line_errors(frames, kwargs, match):
    with pytest.raises(VideoError, match=match) as err:
        open_video(frames, **kwargs)
    assert "\n" not in str(err.value)


def test_video_file_rejects_source_fps(synthetic_video):
    with pytest.raises(VideoError, match="own frame rate"):
        open_video(synthetic_video, source_fps=30.0)


def test_synthetic_frame_index_round_trips():
    for index in (0, 1, 15, 16, 255, 256, 4095):
        assert synthetic_frame_index(synthetic_frame(index)) == index
    assert not np.array_equal(synthetic_frame(1), synthetic_frame(17))


# --- timing from presentation times, seeking, scalers, decoders -------------------------------

needs_x264 = pytest.mark.skipif("libx264" not in av.codecs_available, reason="this FFmpeg build has no libx264")


def _sequential_frames(path: Path, indices) -> np.ndarray:
    """Every frame decoded in order (no seeking, no skipping), the planned ones kept: the reference."""
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return np.stack([frames[i] for i in indices])


@needs_x264
@pytest.mark.parametrize("suffix", [".mp4", ".mkv", ".ts"])
def test_seeking_decoder_gives_the_sequential_pixels_and_decodes_less(tmp_path, suffix, caplog):
    # H.264 with 3 B-frames, a keyframe every 10 frames; MP4 carries an edit list for the
    # B-frame delay, MPEG-TS starts at 1.4 s: timestamps still count from the first frame.
    path = write_synthetic_video(tmp_path / f"b{suffix}", seconds=12, fps=10, width=64, height=48,
                                 codec="libx264", gop=10)
    for budget in (16, 30):  # uniform over keyframes and between them; 1 fps
        source = open_video(path, image_size=48, max_frames=budget)
        expected_idx, expected_ts = official_rule(120, 10.0, budget)
        assert source.plan.frame_indices.tolist() == expected_idx
        with caplog.at_level("DEBUG", logger="videoxl.video"):
            pixels, timestamps = read_all(source)
        assert timestamps.tolist() == expected_ts
        np.testing.assert_array_equal(pixels, preprocess_frames(_sequential_frames(path, expected_idx), 48))
    summary = [r.getMessage() for r in caplog.records if "packets sent" in r.getMessage()]
    sent = [int(m.split(" packets sent")[0].split()[-1]) for m in summary]
    # keyframe targets: one packet each (MPEG-TS seeks land near, not on, the keyframe: a few more)
    assert sent[0] <= (12 if suffix != ".ts" else 30) and all(n < 120 for n in sent), summary


def test_variable_frame_rate_file_is_timed_by_presentation_time(tmp_path):
    # 16 frames over ~5.1 s, bunched (the issue's case): timestamps are the frames' own times.
    times = [0, 0.1, 0.2, 0.3, 0.4, 0.5, 1.51, 1.6, 1.7, 2.5, 2.6, 3.0, 5.0, 5.04, 5.08, 5.12]
    path = write_vfr_video(tmp_path / "vfr.mkv", times)
    source = open_video(path, image_size=32)
    expected = plan_sampling_by_time(np.array(times), duration_s=5.22, max_frames=1024)  # + median interval
    assert source.plan.frame_indices.tolist() == expected.frame_indices.tolist()
    pixels, timestamps = read_all(source)
    assert decoded_indices(pixels) == expected.frame_indices.tolist()
    assert timestamps.tolist() == [round(times[i], 1) for i in expected.frame_indices]
    # frame 7 is shown at 1.6 s (a count-based reader at the container's nominal rate said 0.3 s)
    assert dict(zip(expected.frame_indices.tolist(), timestamps.tolist()))[7] == 1.6
    assert source.duration_s == pytest.approx(5.22)


def test_variable_rate_file_with_a_late_start_counts_from_its_first_frame(tmp_path):
    times = [2.0 + t for t in (0, 0.5, 0.6, 0.7, 2.0, 2.1, 4.0, 4.04)]
    path = write_vfr_video(tmp_path / "late.mkv", times)
    source = open_video(path, image_size=32)
    pixels, timestamps = read_all(source)
    assert timestamps[0] == 0.0
    assert timestamps.tolist() == [round(times[i] - 2.0, 1) for i in decoded_indices(pixels)]


def test_ffmpeg_scaler_is_close_to_pillow_but_not_equal(synthetic_video):
    pillow = read_all(open_video(synthetic_video, max_frames=8))[0]
    ffmpeg = read_all(open_video(synthetic_video, max_frames=8, scaler="ffmpeg"))[0]
    difference = np.abs(pillow - ffmpeg) * 127.5  # on the 0..255 scale
    assert decoded_indices(ffmpeg) == decoded_indices(pillow)
    assert 0 < difference.max() <= 64 and difference.mean() < 4
    with pytest.raises(ValueError, match="scaler"):
        open_video(synthetic_video, scaler="area")


def test_hardware_decoding_falls_back_to_software_and_says_so(synthetic_video, caplog):
    with caplog.at_level("INFO", logger="videoxl.video"):
        auto = read_all(open_video(synthetic_video, max_frames=4, image_size=32))[0]
    used = [r.getMessage() for r in caplog.records if "decoding with" in r.getMessage()]
    assert used and ("software" in used[0] or "NVDEC" in used[0] or "nvv4l2dec" in used[0])
    off = read_all(open_video(synthetic_video, max_frames=4, image_size=32, hw_decode="off"))[0]
    np.testing.assert_array_equal(auto, off)
    with pytest.raises(ValueError, match="hw_decode"):
        open_video(synthetic_video, hw_decode="cuda")


# --- images ------------------------------------------------------------------------------------


def test_single_image_is_one_group_of_four_padded_to_a_square(tmp_path):
    picture = synthetic_frame(5, width=60, height=40)
    expected = np.full((60, 60, 3), 127, np.uint8)  # the official pad: SigLIP's mean colour, centred
    expected[10:50] = picture
    Image.fromarray(picture).save(tmp_path / "still.png")
    for source in (open_video(tmp_path / "still.png", image_size=32), open_video(Image.fromarray(picture), image_size=32),
                   open_video(picture, image_size=32)):
        assert source.num_frames == 4 and source.plan.timestamps.tolist() == [0.0] * 4
        pixels, timestamps = read_all(source)
        np.testing.assert_array_equal(pixels, preprocess_frames(np.stack([expected] * 4), 32))
    with pytest.raises(VideoError, match="source_fps"):
        open_video(tmp_path / "still.png", source_fps=2.0)


# --- arrays through DLPack ---------------------------------------------------------------------


def test_cpu_torch_frames_are_viewed_without_a_copy():
    torch = pytest.importorskip("torch")
    frames = np.stack([synthetic_frame(i, width=40, height=30) for i in range(20)])
    tensor = torch.from_numpy(frames.copy())
    source = open_video(tensor, source_fps=2.0, image_size=32)
    assert source.device_frames is None
    first = next(source._read_frames(np.array([3])))
    assert np.shares_memory(first, tensor.numpy())  # a view of the tensor's memory
    np.testing.assert_array_equal(read_all(source)[0], read_all(open_video(frames, source_fps=2.0, image_size=32))[0])


class _FakeDeviceArray:
    """Stands in for a CUDA tensor: DLPack says device 2 (CUDA); frames copy to the host with .cpu()."""

    def __init__(self, frames: np.ndarray) -> None:
        self._frames, self.shape, self.dtype = frames, frames.shape, "torch.uint8"

    def __dlpack__(self, **_):
        raise BufferError("device memory")

    def __dlpack_device__(self):
        return (2, 0)

    def __getitem__(self, index):
        frame = self._frames[index]
        return type("Frame", (), {"__dlpack__": self.__dlpack__, "__dlpack_device__": self.__dlpack_device__,
                                  "cpu": lambda _self: type("Host", (), {"numpy": lambda _s: frame})()})()


def test_device_frames_stay_on_the_device_and_batches_still_work():
    frames = np.stack([synthetic_frame(i, width=40, height=30) for i in range(20)])
    device = _FakeDeviceArray(frames)
    source = open_video(device, source_fps=2.0, image_size=32)
    assert source.device_frames is device
    assert decoded_indices(read_all(source)[0]) == list(range(20))
    with pytest.raises(VideoError, match=r"\(N, H, W, 3\)"):
        open_video(_FakeDeviceArray(frames[..., 0]), source_fps=2.0)
