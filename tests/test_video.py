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
    preprocess_frames,
    synthetic_frame,
    synthetic_frame_index,
    write_audio_only_file,
    write_synthetic_video,
)


def decoded_indices(pixels: np.ndarray) -> list[int]:
    """Frame indices encoded in preprocessed (B, 3, s, s) synthetic frames."""
    return [synthetic_frame_index((frame.transpose(1, 2, 0) + 1.0) * 127.5) for frame in pixels]


def read_all(source, batch_frames: int = 16) -> tuple[np.ndarray, np.ndarray]:
    batches = list(source.iter_batches(batch_frames))
    return np.concatenate([b.pixels for b in batches]), np.concatenate([b.timestamps for b in batches])


# --- the sampling rule, pure ------------------------------------------------------------------


def test_short_video_is_sampled_up_to_max_fps():
    # 5 s at 30 fps: f = min(4, 1024 / 5) = 4 -> step round(7.5) = 8 -> 19 frames (3.75 fps).
    plan = plan_sampling(num_frames=150, video_fps=30.0, max_frames=1024)
    np.testing.assert_array_equal(plan.frame_indices, np.arange(0, 150, 8))
    np.testing.assert_allclose(plan.timestamps, np.arange(0, 150, 8) / 30.0)
    assert plan.frame_indices.dtype == np.int64 and plan.timestamps.dtype == np.float64


def test_short_video_rate_is_limited_by_the_budget():
    # 20 s at 30 fps with a budget of 40 frames: f = 40 / 20 = 2 -> step 15 -> 40 frames.
    plan = plan_sampling(num_frames=600, video_fps=30.0, max_frames=40)
    np.testing.assert_array_equal(plan.frame_indices, np.arange(0, 600, 15))


def test_medium_video_is_paced_by_the_budget_above_fps():
    # 10 min at 30 fps: f = max(1, min(4, 1024 / 600)) = 1.707 -> step round(17.58) = 18.
    plan = plan_sampling(num_frames=600 * 30, video_fps=30.0, max_frames=1024)
    np.testing.assert_array_equal(plan.frame_indices, np.arange(0, 18000, 18))
    assert len(plan) == 1000


def test_long_video_is_sampled_uniformly():
    # 2 h at 25 fps: 7200 s * 1 fps > 1024.
    num_frames = 2 * 3600 * 25
    plan = plan_sampling(num_frames=num_frames, video_fps=25.0, max_frames=1024)
    assert len(plan) == 1024
    np.testing.assert_array_equal(plan.frame_indices, np.round(np.linspace(0, num_frames - 1, 1024)).astype(np.int64))
    assert plan.frame_indices[0] == 0 and plan.frame_indices[-1] == num_frames - 1
    np.testing.assert_allclose(plan.timestamps, plan.frame_indices / 25.0)


@pytest.mark.parametrize(
    ("num_frames", "video_fps", "step"),
    [
        (1798, 29.97, 7),  # 60 s: f = 4, 29.97 / 4 = 7.49
        (17982, 29.97, 18),  # 600 s: f = 1024 / 600 = 1.707, 29.97 / 1.707 = 17.56
        (125, 12.5, 3),  # 10 s: f = 4, 12.5 / 4 = 3.125
        (3750, 12.5, 4),  # 300 s: f = 1024 / 300 = 3.41, 12.5 / 3.41 = 3.66
    ],
)
def test_odd_frame_rates(num_frames, video_fps, step):
    plan = plan_sampling(num_frames=num_frames, video_fps=video_fps, max_frames=1024)
    np.testing.assert_array_equal(plan.frame_indices, np.arange(0, num_frames, step))
    np.testing.assert_allclose(plan.timestamps, np.arange(0, num_frames, step) / video_fps)


def test_odd_frame_rate_whose_rounded_step_overshoots_goes_uniform():
    # 1000 s at 12.5 fps: f = 1.024 -> step round(12.2) = 12 -> 1042 frames > 1024: rather
    # than cutting the last ~18 s, the budget is spread over the whole video.
    plan = plan_sampling(num_frames=12500, video_fps=12.5, max_frames=1024)
    np.testing.assert_array_equal(plan.frame_indices, np.round(np.linspace(0, 12499, 1024)).astype(np.int64))
    assert plan.frame_indices[-1] == 12499 and len(plan) == 1024


def test_video_exactly_at_the_budget():
    # 1024 s at 25 fps: duration * fps == max_frames -> not uniform, 1 fps, step 25.
    at_budget = plan_sampling(num_frames=1024 * 25, video_fps=25.0, max_frames=1024)
    np.testing.assert_array_equal(at_budget.frame_indices, np.arange(0, 1024 * 25, 25))
    # One frame more tips it over: uniform.
    over = plan_sampling(num_frames=1024 * 25 + 1, video_fps=25.0, max_frames=1024)
    np.testing.assert_array_equal(over.frame_indices, np.round(np.linspace(0, 1024 * 25, 1024)).astype(np.int64))


def test_rate_never_drops_below_fps():
    # max_fps below fps: the base rate wins (10 s at 30 fps, 2 fps -> step 15).
    plan = plan_sampling(num_frames=300, video_fps=30.0, fps=2.0, max_fps=1.0, max_frames=1024)
    np.testing.assert_array_equal(plan.frame_indices, np.arange(0, 300, 15))


def test_low_frame_rate_source_takes_every_frame_and_one_frame_is_enough():
    np.testing.assert_array_equal(plan_sampling(num_frames=20, video_fps=2.0, max_frames=1024).frame_indices,
                                  np.arange(20))
    single = plan_sampling(num_frames=1, video_fps=30.0, max_frames=1024)
    np.testing.assert_array_equal(single.frame_indices, [0])
    np.testing.assert_array_equal(single.timestamps, [0.0])


def test_sampling_invariants_over_random_inputs():
    rng = np.random.default_rng(0)
    for _ in range(400):
        num_frames = int(rng.integers(1, 300_000))
        video_fps = float(rng.choice([0.5, 1, 5, 12.5, 23.976, 24, 25, 29.97, 30, 59.94, 60, 120]))
        max_frames = int(rng.integers(1, 2048))
        fps = float(rng.choice([0.5, 1.0, 2.0]))
        plan = plan_sampling(num_frames=num_frames, video_fps=video_fps, fps=fps, max_fps=4.0, max_frames=max_frames)
        indices = plan.frame_indices
        assert 1 <= len(indices) <= max_frames
        assert indices[0] == 0 and indices[-1] < num_frames
        assert np.all(np.diff(indices) > 0)
        np.testing.assert_allclose(plan.timestamps, indices / video_fps)
        if num_frames / video_fps * fps > max_frames:  # uniform: covers the whole video
            assert indices[-1] == num_frames - 1


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
    np.testing.assert_allclose(timestamps, np.arange(0, 80, 2) / 8.0)
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
    np.testing.assert_allclose(timestamps, expected / fps, rtol=1e-4)


def test_longer_file_paced_and_uniform(tmp_path):
    # 40 s at 25 fps (1000 frames). Budget 64: f = 1.6 -> step 16. Budget 16: uniform.
    path = write_synthetic_video(tmp_path / "long.mkv", seconds=40, fps=25, width=96, height=64)
    paced = open_video(path, image_size=32, max_frames=64)
    assert paced.source_num_frames == 1000  # .mkv declares no frame count: packets counted
    np.testing.assert_array_equal(paced.plan.frame_indices, np.arange(0, 1000, 16))
    assert decoded_indices(read_all(paced)[0]) == list(range(0, 1000, 16))

    uniform = open_video(path, image_size=32, max_frames=16)
    expected = np.round(np.linspace(0, 999, 16)).astype(int)
    np.testing.assert_array_equal(uniform.plan.frame_indices, expected)
    assert decoded_indices(read_all(uniform)[0]) == [i % 4096 for i in expected]


@pytest.mark.parametrize("suffix", [".mp4", ".avi", ".mkv", ".ts"])
def test_containers_agree(tmp_path, suffix):
    # Frame count from: the index (.mp4, .avi), packets (.mkv), the stream duration (.ts).
    path = write_synthetic_video(tmp_path / f"clip{suffix}", seconds=3, fps=8, width=64, height=48)
    source = open_video(path, image_size=32)
    assert source.source_num_frames == 24 and source.source_fps == pytest.approx(8.0)
    pixels, timestamps = read_all(source)
    assert decoded_indices(pixels) == list(range(0, 24, 2))
    np.testing.assert_allclose(timestamps, np.arange(0, 24, 2) / 8.0)


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
    np.testing.assert_allclose(timestamps, np.arange(0, 13, 2) / 8.0)


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
