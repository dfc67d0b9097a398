"""Video ingest: which frames to sample, how to read them lazily, how to preprocess them.

One entry point, :func:`open_video`, for every kind of source:

    video file    -> timeline (container index, or one demux pass) -> plan (official rule)
                     -> seek + decode only the planned frames
    image         -> one group of 4 copies at 0.0 s
    image folder  -> plan -> Pillow reads the planned images
    frame arrays  -> plan (numpy; DLPack: CPU arrays viewed, GPU arrays kept as ``device_frames``)
    then, for all: planned frames (H, W, 3) uint8 -> preprocess -> batches

At most one batch of preprocessed frames (B, 3, s, s) float32 exists at a time, so an
hour-long video never sits in memory whole. No torch here: the runtime imports this module.
"""

from __future__ import annotations

import fractions
import logging
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})

# SigLIP image processor: rescale 1/255, then (x - 0.5) / 0.5 per channel.
_IMAGE_MEAN = 0.5
_IMAGE_STD = 0.5


class VideoError(ValueError):
    """A video source cannot be used; the message is one line naming the source and the problem."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.splitlines()))


# --- sampling plan (DESIGN §7, the official rule) ---------------------------------------------


@dataclass(frozen=True)
class SamplingPlan:
    frame_indices: np.ndarray  # (N,) int64 into the source's frames (presentation order), non-decreasing
    timestamps: np.ndarray  # (N,) float64 seconds from the first frame, rounded to 0.1 s as officially

    def __len__(self) -> int:
        return int(self.frame_indices.shape[0])


def _round_step(rate: float) -> int:
    # Python's round (halves to even), as the official code; at least 1 where the official code
    # would get a step of 0 and fail (a source slower than half the sampling rate): our extension.
    return max(1, round(rate))


def official_frame_indices(*, num_frames: int, video_fps: float, fps: float, max_fps: float,
                           max_frames: int) -> np.ndarray:
    """The frames Video-XL-2's evaluation wrapper samples (``load_video``, DESIGN §7).

    1. base step ``round(video_fps / fps)``, every step-th frame from frame 0;
    2. ``higher = min(max_frames // frames_at_base_rate, max_fps)`` (integer division); only if
       ``higher > fps``, resample with step ``round(video_fps / higher)``;
    3. if that still gives more than ``max_frames`` frames:
       ``np.linspace(0, num_frames - 1, max_frames, dtype=int)`` (truncation, not rounding).
    """
    step = _round_step(video_fps / fps)
    count = len(range(0, num_frames, step))
    higher = min(max_frames // count, max_fps)
    if higher > fps:
        step = _round_step(video_fps / higher)
        count = len(range(0, num_frames, step))
    if count > max_frames:
        return np.linspace(0, num_frames - 1, max_frames, dtype=int).astype(np.int64)
    return np.arange(0, num_frames, step, dtype=np.int64)


def round_seconds(seconds: np.ndarray) -> np.ndarray:
    """Python's ``round(t, 1)`` per element, as the official timestamps (numpy's round differs at ties)."""
    return np.array([round(float(t), 1) for t in seconds], dtype=np.float64)


def _check_sampling(*, fps: float, max_fps: float, max_frames: int) -> None:
    if not fps > 0 or not max_fps > 0:
        raise ValueError(f"fps and max_fps must be positive, got fps={fps}, max_fps={max_fps}")
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")


def plan_sampling(
    *, num_frames: int, video_fps: float, fps: float = 1.0, max_fps: float = 4.0, max_frames: int
) -> SamplingPlan:
    """The official plan for a constant-rate source: :func:`official_frame_indices`, timestamps
    ``round(index / video_fps, 1)``. The plan always has at least one frame."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if not video_fps > 0 or not math.isfinite(video_fps):
        raise ValueError(f"video_fps must be a positive number, got {video_fps}")
    _check_sampling(fps=fps, max_fps=max_fps, max_frames=max_frames)
    indices = official_frame_indices(num_frames=num_frames, video_fps=video_fps, fps=fps, max_fps=max_fps,
                                     max_frames=max_frames)
    return SamplingPlan(frame_indices=indices, timestamps=round_seconds(indices / float(video_fps)))


def plan_sampling_by_time(
    frame_times_s: np.ndarray, *, duration_s: float, fps: float = 1.0, max_fps: float = 4.0, max_frames: int
) -> SamplingPlan:
    """The official rule in seconds, for variable-frame-rate sources (our extension).

    The official code assumes a constant rate. Here the rule runs on a virtual constant-rate
    grid of the same frame count over the same duration (rate ``n / duration_s``); each grid
    point's time ``i / rate`` then takes the frame on screen at that time (the last frame
    presented at or before it). A frame is taken once (a frame held longer than the sampling
    period is not repeated). Timestamps are the taken frames' own presentation times. For a
    constant-rate source this is exactly :func:`plan_sampling`.
    """
    times = np.asarray(frame_times_s, dtype=np.float64)
    if times.ndim != 1 or len(times) < 1 or np.any(np.diff(times) < 0):
        raise ValueError("frame_times_s must be a non-empty ascending 1-D array")
    if not duration_s > times[-1] - times[0]:
        raise ValueError(f"duration_s ({duration_s}) must exceed the span of the frame times")
    _check_sampling(fps=fps, max_fps=max_fps, max_frames=max_frames)
    rate = len(times) / duration_s
    grid = official_frame_indices(num_frames=len(times), video_fps=rate, fps=fps, max_fps=max_fps,
                                  max_frames=max_frames)
    # 1 us of slack so that a frame exactly on a grid point is taken despite float rounding
    on_screen = np.searchsorted(times - times[0], grid / rate + 1e-6, side="right") - 1
    indices = np.unique(np.clip(on_screen, 0, len(times) - 1)).astype(np.int64)
    return SamplingPlan(frame_indices=indices, timestamps=round_seconds(times[indices] - times[0]))


# --- preprocessing ---------------------------------------------------------------------------


def preprocess_frames(frames_uint8_nhwc: np.ndarray, image_size: int) -> np.ndarray:
    """(B, H, W, 3) uint8 RGB -> (B, 3, s, s) float32 in [-1, 1], SigLIP processor semantics.

    Each frame is resized to exactly ``image_size`` x ``image_size`` with Pillow's bicubic
    filter (no aspect preservation, no crop), scaled by 1/255 and normalised with mean 0.5 and
    std 0.5 per channel. A frame already at ``image_size`` (the FFmpeg scaler) is not resampled.
    """
    frames = np.asarray(frames_uint8_nhwc)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise VideoError(
            f"frames must be uint8 (B, H, W, 3) RGB, got {frames.dtype} with shape {frames.shape}"
        )
    out = np.empty((frames.shape[0], 3, image_size, image_size), dtype=np.float32)
    for b, frame in enumerate(frames):
        if frame.shape[:2] == (image_size, image_size):
            resized = frame
        else:
            resized = Image.fromarray(frame).resize((image_size, image_size), Image.BICUBIC)
        pixels = np.asarray(resized, dtype=np.float32) * np.float32(1.0 / 255.0)
        out[b] = ((pixels - _IMAGE_MEAN) / _IMAGE_STD).transpose(2, 0, 1)
    return out


def pad_to_square(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (S, S, 3), S = max(H, W), centred on the processor's mean colour.

    The official wrapper does this to a still image (``expand2square`` with the SigLIP mean,
    int(0.5 * 255) = 127, offset (S - side) // 2) before the processor; video frames are not
    padded. Kept as the trained model's input convention.
    """
    height, width = rgb.shape[:2]
    side = max(height, width)
    if height == width:
        return rgb
    fill = int(_IMAGE_MEAN * 255)
    out = np.full((side, side, 3), fill, dtype=np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    out[top : top + height, left : left + width] = rgb
    return out


# --- sources ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameBatch:
    pixels: np.ndarray  # (B, 3, s, s) float32
    timestamps: np.ndarray  # (B,) float64 seconds


# Yields the planned frames, in plan order, as (H, W, 3) uint8 RGB.
FrameReader = Callable[[np.ndarray], Iterator[np.ndarray]]


class VideoSource:
    """A planned, lazily decoded video. Build one with :func:`open_video`.

    ``device_frames``: for frames handed in as a GPU array (torch/CuPy through DLPack), the
    original array, untouched: (N, H, W, 3) uint8 on its device. A GPU backend can take
    ``device_frames[plan.frame_indices]`` and preprocess on the device; ``iter_batches`` still
    works everywhere by copying the planned frames to the host. None for every other source.
    """

    def __init__(
        self,
        *,
        plan: SamplingPlan,
        source_num_frames: int,
        source_fps: float,
        image_size: int,
        source_description: str,
        read_frames: FrameReader,
        duration_s: float | None = None,
        device_frames: object | None = None,
    ) -> None:
        self.plan = plan
        self.source_num_frames = source_num_frames  # frames in the source, before sampling
        self.source_fps = source_fps  # average rate (frames / duration) for a variable-rate file
        self.image_size = image_size
        self.source_description = source_description
        self.device_frames = device_frames
        self._duration_s = duration_s
        self._read_frames = read_frames

    @property
    def num_frames(self) -> int:
        """Frames the model will see (sampled)."""
        return len(self.plan)

    @property
    def duration_s(self) -> float:
        if self._duration_s is not None:
            return self._duration_s
        return self.source_num_frames / self.source_fps

    def __repr__(self) -> str:
        return f"VideoSource({self.source_description}; sampling {self.num_frames} frames)"

    def iter_batches(self, batch_frames: int) -> Iterator[FrameBatch]:
        """Preprocessed frames in plan order, at most ``batch_frames`` per batch.

        Frames are read as the batches are consumed; a problem found mid-stream (a truncated
        file, an unreadable image) raises :class:`VideoError` from this iterator.
        """
        if batch_frames < 1:
            raise ValueError(f"batch_frames must be >= 1, got {batch_frames}")
        total = self.num_frames
        size = self.image_size
        done = 0  # frames already handed out
        filled = 0
        batch = np.empty((min(batch_frames, total), 3, size, size), dtype=np.float32)
        for frame in self._read_frames(self.plan.frame_indices):
            batch[filled] = preprocess_frames(frame[None], size)[0]
            filled += 1
            if filled == batch.shape[0]:
                yield FrameBatch(pixels=batch, timestamps=self.plan.timestamps[done : done + filled].copy())
                done += filled
                filled = 0
                batch = np.empty((min(batch_frames, total - done), 3, size, size), dtype=np.float32)
        if done + filled != total:
            raise VideoError(f"{self.source_description}: got {done + filled} of {total} planned frames")


SCALERS = ("pillow", "ffmpeg")


def open_video(
    source: str | Path | np.ndarray | Image.Image | object,
    *,
    image_size: int = 384,
    fps: float = 1.0,
    max_fps: float = 4.0,
    max_frames: int = 1024,
    source_fps: float | None = None,
    scaler: str = "pillow",
    hw_decode: str = "auto",
) -> VideoSource:
    """Plan the sampling of a video file, an image, an image folder or a frame array.

    - a video file: its own timing (see the README, "Frame sampling"); ``source_fps`` must be None.
    - an image file (``IMAGE_SUFFIXES``) or an in-memory image (a PIL image, or a (H, W, 3)
      uint8 array): one group of :data:`IMAGE_REPEATS` copies at time 0, as the official wrapper.
    - a directory of images (natural order of the file names, so ``frame_2.png`` comes before
      ``frame_10.png``): one frame per image, played at ``source_fps`` (default 1.0).
    - frames (N, H, W, 3) uint8 RGB: a numpy array, or any DLPack array (torch, CuPy); a CPU
      array is viewed without a copy, a GPU array is kept as ``VideoSource.device_frames``.
      ``source_fps`` is required.

    ``scaler`` (video files): "pillow" decodes to full-size RGB and resizes with Pillow's
    bicubic, exactly SigLIP's processor; "ffmpeg" lets FFmpeg's scaler convert and resize in
    one step (faster, not bit-exact). ``hw_decode``: "auto" tries NVDEC (FFmpeg's CUDA
    hwaccel) and Jetson's ``*_nvv4l2dec`` where this FFmpeg build has them and falls back to
    the software decoder; "off" never tries. Only metadata is read here; frames are decoded by
    :meth:`VideoSource.iter_batches`.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if scaler not in SCALERS:
        raise ValueError(f"scaler must be one of {SCALERS}, got {scaler!r}")
    if hw_decode not in ("auto", "off"):
        raise ValueError(f"hw_decode must be 'auto' or 'off', got {hw_decode!r}")
    sampling = {"fps": fps, "max_fps": max_fps, "max_frames": max_frames}
    if isinstance(source, Image.Image) or (isinstance(source, np.ndarray) and source.ndim == 3
                                           and source.shape[-1] == 3):
        _no_source_fps("an image", source_fps)
        return _open_single_image(source, image_size=image_size)
    if isinstance(source, np.ndarray):
        return _open_array(source, source_fps=source_fps, image_size=image_size, sampling=sampling)
    if not isinstance(source, (str, Path)) and hasattr(source, "__dlpack__"):
        return _open_dlpack(source, source_fps=source_fps, image_size=image_size, sampling=sampling)
    path = Path(source)
    if not path.exists():
        raise VideoError(f"{path}: no such file or directory")
    if path.is_dir():
        return _open_image_folder(path, source_fps=1.0 if source_fps is None else source_fps,
                                  image_size=image_size, sampling=sampling)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        _no_source_fps(str(path), source_fps)
        return _open_single_image(path, image_size=image_size)
    _no_source_fps(str(path), source_fps)
    return _open_video_file(path, image_size=image_size, sampling=sampling, scaler=scaler, hw_decode=hw_decode)


def _no_source_fps(what: str, source_fps: float | None) -> None:
    if source_fps is not None:
        raise VideoError(f"{what}: source_fps applies to image folders and arrays; "
                         "a video file has its own frame rate and an image has none")


def _check_source_fps(what: str, source_fps: float | None) -> float:
    if source_fps is None:
        raise VideoError(f"{what}: source_fps is required (frames per second of the array)")
    if not source_fps > 0 or not math.isfinite(source_fps):
        raise VideoError(f"{what}: source_fps must be a positive number, got {source_fps}")
    return float(source_fps)


# --- single images ---------------------------------------------------------------------------

IMAGE_REPEATS = 4  # frames per group (DESIGN §1): the official wrapper repeats an image into one group


def _open_single_image(image: Path | Image.Image | np.ndarray, *, image_size: int) -> VideoSource:
    """One image as one group: padded to a square as officially, repeated 4 times, time 0.0 s."""
    if isinstance(image, Path):
        with _open_image(image) as opened:
            try:
                rgb = np.asarray(opened.convert("RGB"))
            except OSError as err:
                raise VideoError(f"{image}: unreadable image ({err})") from err
        what = str(image)
    elif isinstance(image, Image.Image):
        rgb, what = np.asarray(image.convert("RGB")), f"image {image.mode} {image.width}x{image.height}"
    else:
        what = f"image array {image.dtype}{tuple(image.shape)}"
        if image.dtype != np.uint8 or 0 in image.shape:
            raise VideoError(f"{what}: expected a uint8 (H, W, 3) RGB image")
        rgb = image
    square = pad_to_square(rgb)
    # Officially the wrapper passes one frame and the model pads the group with copies of it;
    # handing out the four copies here gives the same pixels to every backend.
    plan = SamplingPlan(frame_indices=np.zeros(IMAGE_REPEATS, np.int64),
                        timestamps=np.zeros(IMAGE_REPEATS, np.float64))

    def read(indices: np.ndarray) -> Iterator[np.ndarray]:
        for _ in indices:
            yield square

    return VideoSource(plan=plan, source_num_frames=1, source_fps=1.0, image_size=image_size,
                       source_description=f"{what} (one image, repeated as a group of {IMAGE_REPEATS})",
                       read_frames=read, duration_s=0.0)


# --- frame arrays: numpy and DLPack ----------------------------------------------------------


def _open_array(frames: np.ndarray, *, source_fps: float | None, image_size: int, sampling: dict,
                what: str | None = None) -> VideoSource:
    what = what or f"array {frames.dtype}{tuple(frames.shape)}"
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise VideoError(f"{what}: expected uint8 frames of shape (N, H, W, 3) RGB")
    if frames.shape[0] == 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise VideoError(f"{what}: no frames")
    rate = _check_source_fps(what, source_fps)
    plan = plan_sampling(num_frames=frames.shape[0], video_fps=rate, **sampling)

    def read(indices: np.ndarray) -> Iterator[np.ndarray]:
        for index in indices:
            yield frames[index]

    return VideoSource(plan=plan, source_num_frames=frames.shape[0], source_fps=rate, image_size=image_size,
                       source_description=f"{what} at {rate:g} fps", read_frames=read)


# DLPack device types (dlpack.h): memory the host can read directly
_DL_CPU, _DL_CUDA_HOST = 1, 3


def _open_dlpack(frames: object, *, source_fps: float | None, image_size: int, sampling: dict) -> VideoSource:
    shape = tuple(getattr(frames, "shape", ()))
    dtype = str(getattr(frames, "dtype", "?"))
    what = f"{type(frames).__module__.split('.')[0]} array {dtype}{shape}"
    try:
        device_type, device_id = frames.__dlpack_device__()
    except (AttributeError, TypeError) as err:
        raise VideoError(f"{what}: not a DLPack array ({err})") from err
    if device_type in (_DL_CPU, _DL_CUDA_HOST):
        try:
            host = np.from_dlpack(frames)  # a view: no copy
        except (TypeError, ValueError, RuntimeError, BufferError) as err:
            raise VideoError(f"{what}: cannot be viewed as a host array ({err})") from err
        return _open_array(host, source_fps=source_fps, image_size=image_size, sampling=sampling, what=what)
    if not dtype.endswith("uint8") or len(shape) != 4 or shape[-1] != 3:
        raise VideoError(f"{what}: expected uint8 frames of shape (N, H, W, 3) RGB")
    if 0 in shape:
        raise VideoError(f"{what}: no frames")
    rate = _check_source_fps(what, source_fps)
    plan = plan_sampling(num_frames=shape[0], video_fps=rate, **sampling)
    log.info("%s on DLPack device %d:%d kept there as VideoSource.device_frames; iter_batches copies "
             "the %d planned frames to the host", what, device_type, device_id, len(plan))

    def read(indices: np.ndarray) -> Iterator[np.ndarray]:
        for index in indices:
            yield _device_frame_to_host(frames[int(index)], what)

    return VideoSource(plan=plan, source_num_frames=shape[0], source_fps=rate, image_size=image_size,
                       source_description=f"{what} on device {device_type}:{device_id} at {rate:g} fps",
                       read_frames=read, device_frames=frames)


def _device_frame_to_host(frame: object, what: str) -> np.ndarray:
    """One device frame -> host uint8 (H, W, 3), through DLPack when the producer can copy."""
    try:
        return np.from_dlpack(frame, device="cpu", copy=True)
    except (TypeError, ValueError, RuntimeError, BufferError, NotImplementedError):
        pass
    if hasattr(frame, "get"):  # CuPy
        return np.asarray(frame.get())
    if hasattr(frame, "cpu"):  # torch
        return frame.cpu().numpy()
    raise VideoError(f"{what}: cannot copy a frame to the host (the array's library offers no way)")


# --- image folders ---------------------------------------------------------------------------


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def _open_image_folder(folder: Path, *, source_fps: float, image_size: int, sampling: dict) -> VideoSource:
    rate = _check_source_fps(str(folder), source_fps)
    images = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                    key=_natural_key)
    if not images:
        raise VideoError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
    for image_path in images:  # header check only; pixels are read lazily
        with _open_image(image_path):
            pass
    plan = plan_sampling(num_frames=len(images), video_fps=rate, **sampling)

    def read(indices: np.ndarray) -> Iterator[np.ndarray]:
        for index in indices:
            with _open_image(images[index]) as image:
                try:
                    rgb = np.asarray(image.convert("RGB"))
                except OSError as err:
                    raise VideoError(f"{images[index]}: unreadable image ({err})") from err
            yield rgb

    return VideoSource(plan=plan, source_num_frames=len(images), source_fps=rate, image_size=image_size,
                       source_description=f"{folder} ({len(images)} images at {rate:g} fps)", read_frames=read)


def _open_image(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError) as err:
        raise VideoError(f"{path}: unreadable image ({err})") from err


# --- video files: metadata and the frame timeline --------------------------------------------


def _open_container(path: Path, **kwargs) -> av.container.InputContainer:
    try:
        return av.open(str(path), **kwargs)
    except av.FFmpegError as err:
        raise VideoError(f"{path}: not a readable video file ({err})") from err
    except OSError as err:
        raise VideoError(f"{path}: cannot open ({err})") from err


def _video_stream(path: Path, container: av.container.InputContainer) -> av.VideoStream:
    # Cover art in audio files shows up as a one-frame "video" stream marked attached_pic.
    streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not streams:
        kinds = ", ".join(sorted({"cover picture" if s.type == "video" else s.type for s in container.streams}))
        kinds = kinds or "nothing"
        raise VideoError(f"{path}: no video stream (the file holds {kinds})")
    return streams[0]


@dataclass(frozen=True)
class _Timeline:
    """Every frame's presentation time and the seek points, read without decoding."""

    pts: np.ndarray  # (n,) int64, ascending: presentation timestamps of the frames, stream time base
    key_pts: np.ndarray  # (k,) int64, ascending: presentation timestamps of the keyframes
    key_dts: np.ndarray  # (k,) int64: decode timestamps of the keyframes (<= their pts)
    time_base: fractions.Fraction
    duration: int  # first frame to the end of the last one, stream time base

    def seconds(self, pts: np.ndarray) -> np.ndarray:
        """Seconds from the first frame (the origin of the model's "Time t s")."""
        # exact integers over an exact integer: numpy's division is correctly rounded, as float(Fraction)
        ticks = (np.asarray(pts, dtype=np.int64) - self.pts[0]) * self.time_base.numerator
        return ticks.astype(np.float64) / float(self.time_base.denominator)


def _timeline_from_index(stream: av.VideoStream) -> _Timeline | None:
    """From the container's index (MP4/MOV, AVI): no file reading. Index times are decode
    times, so presentation times are exact only for a constant rate; the caller checks."""
    try:
        entries = [e for e in stream.index_entries if not e.is_discard]  # discard: cut by an edit list
    except (AttributeError, av.FFmpegError):
        return None
    if not entries or len(entries) != stream.frames:
        return None  # a partial index (Matroska cues hold keyframes only)
    dts = np.array([e.timestamp for e in entries], dtype=np.int64)
    keys = np.array([e.is_keyframe for e in entries], dtype=bool)
    order = np.argsort(dts, kind="stable")
    dts, keys = dts[order], keys[order]
    # First presentation time: the stream's start (FFmpeg applies the edit list to it).
    first = stream.start_time if stream.start_time is not None else int(dts[0])
    shift = first - int(dts[0])  # the decoder's reorder delay (B-frames)
    step = int(np.median(np.diff(dts))) if len(dts) > 1 else 1
    return _Timeline(pts=dts + shift, key_pts=dts[keys] + shift, key_dts=dts[keys],
                     time_base=fractions.Fraction(stream.time_base), duration=int(dts[-1] - dts[0]) + max(step, 1))


def _timeline_from_packets(path: Path, container: av.container.InputContainer,
                           stream: av.VideoStream) -> _Timeline | None:
    """One demux pass (no decoding): each packet's pts, dts and keyframe flag."""
    pts, dts, keys, durations = [], [], [], []
    try:
        for packet in container.demux(stream):
            if not packet.size or packet.is_discard:
                continue
            if packet.pts is None:
                return None  # no presentation times: the caller counts frames instead
            pts.append(packet.pts)
            dts.append(packet.pts if packet.dts is None else packet.dts)
            keys.append(packet.is_keyframe)
            durations.append(packet.duration or 0)
    except av.FFmpegError as err:
        raise VideoError(f"{path}: cannot read the video packets ({err})") from err
    if not pts:
        return _Timeline(pts=np.zeros(0, np.int64), key_pts=np.zeros(0, np.int64), key_dts=np.zeros(0, np.int64),
                         time_base=fractions.Fraction(stream.time_base), duration=0)
    pts_a, dts_a, keys_a = np.array(pts, np.int64), np.array(dts, np.int64), np.array(keys, bool)
    order = np.argsort(pts_a, kind="stable")
    sorted_pts = pts_a[order]
    # The last frame lasts the median frame interval: muxers often store 0 or 1 tick for it.
    last_duration = int(np.median(np.diff(sorted_pts))) if len(pts) > 1 else (durations[0] or 1)
    key_order = np.argsort(pts_a[keys_a], kind="stable")
    return _Timeline(pts=sorted_pts, key_pts=pts_a[keys_a][key_order], key_dts=dts_a[keys_a][key_order],
                     time_base=fractions.Fraction(stream.time_base),
                     duration=int(sorted_pts[-1] - sorted_pts[0]) + max(int(last_duration), 1))


def _is_constant_rate(times_s: np.ndarray, rate: float) -> bool:
    """Every frame within a quarter frame of ``index / rate``: the official index-based times hold."""
    return bool(np.max(np.abs(times_s - np.arange(len(times_s)) / rate)) <= 0.25 / rate)


def _count_frames(path: Path, container: av.container.InputContainer, stream: av.VideoStream, rate: float) -> int:
    """Frames in a stream without presentation times: the container's count, else duration, else packets."""
    if stream.frames > 0:
        return int(stream.frames)
    if stream.duration and stream.time_base:
        return int(round(float(stream.duration * stream.time_base) * rate))
    try:
        return sum(1 for packet in container.demux(stream) if packet.size)
    except av.FFmpegError as err:
        raise VideoError(f"{path}: cannot read the video packets ({err})") from err


def _open_video_file(path: Path, *, image_size: int, sampling: dict, scaler: str, hw_decode: str) -> VideoSource:
    with _open_container(path) as container:
        stream = _video_stream(path, container)
        rate_q = stream.average_rate or stream.guessed_rate or stream.base_rate
        codec = stream.codec_context.name
        width, height = stream.codec_context.width, stream.codec_context.height
        stream_index = stream.index
        timeline = _timeline_from_index(stream)
        if timeline is not None and rate_q and not _is_constant_rate(timeline.seconds(timeline.pts), float(rate_q)):
            timeline = None  # variable rate: decode times are not presentation times, read the packets
    if timeline is None:  # a fresh demuxer (seeking back fails on some files)
        with _open_container(path) as container:
            stream = container.streams[stream_index]
            timeline = _timeline_from_packets(path, container, stream)
    if timeline is None:  # no presentation times at all: count frames, trust the nominal rate
        if not rate_q or rate_q <= 0:
            raise VideoError(f"{path}: the video stream has no frame rate")
        with _open_container(path) as container:
            total = _count_frames(path, container, container.streams[stream_index], float(rate_q))
    else:
        total = len(timeline.pts)
    if total < 1:
        raise VideoError(f"{path}: the video stream has no frames")

    if timeline is None:
        rate, duration_s, timing = float(rate_q), total / float(rate_q), "no timestamps: frames counted"
        plan = plan_sampling(num_frames=total, video_fps=rate, **sampling)
    else:
        times_s = timeline.seconds(timeline.pts)
        duration_s = float(timeline.duration * timeline.time_base)
        rate = float(rate_q) if rate_q else total / duration_s
        if _is_constant_rate(times_s, rate):
            timing = "constant rate"
            plan = plan_sampling(num_frames=total, video_fps=rate, **sampling)  # the official indices
            # presentation times; equal to the official index / fps up to the time base's precision
            plan = SamplingPlan(frame_indices=plan.frame_indices, timestamps=round_seconds(times_s[plan.frame_indices]))
        else:
            timing = "variable rate: sampled on time"
            rate = total / duration_s
            plan = plan_sampling_by_time(times_s, duration_s=duration_s, **sampling)
    log.info("%s: %d frames, %.3f fps (%s), %.1f s, sampling %d", path, total, rate, timing, duration_s, len(plan))

    def read(indices: np.ndarray) -> Iterator[np.ndarray]:
        convert = _rgb_converter(scaler, image_size)
        if timeline is None:
            yield from _decode_counting(path, stream_index, indices, total, convert)
        else:
            yield from _decode_seeking(path, stream_index, timeline, indices, convert, hw_decode=hw_decode)

    description = f"{path} ({codec} {width}x{height}, {total} frames at {rate:g} fps, {duration_s:.1f} s)"
    return VideoSource(plan=plan, source_num_frames=total, source_fps=rate, image_size=image_size,
                       source_description=description, read_frames=read, duration_s=duration_s)


# --- video files: decoding -------------------------------------------------------------------


def _rgb_converter(scaler: str, image_size: int) -> Callable[[av.VideoFrame], np.ndarray]:
    if scaler == "ffmpeg":
        # swscale converts and resizes in one pass; close to, not equal to, Pillow's bicubic
        return lambda frame: frame.reformat(width=image_size, height=image_size, format="rgb24",
                                            interpolation="BICUBIC").to_ndarray()
    return lambda frame: frame.to_ndarray(format="rgb24")


def _open_for_decoding(path: Path, stream_index: int, hw_decode: str):
    """-> (container, stream, decoder context, description). Hardware first where offered."""
    if hw_decode == "auto" and "cuda" in av.codec.hwaccel.hwdevices_available():
        try:
            container = av.open(str(path), hwaccel=av.codec.hwaccel.HWAccel(
                device_type="cuda", allow_software_fallback=False))
        except (av.FFmpegError, OSError) as err:
            log.debug("%s: NVDEC not usable here (%s)", path, err)
        else:
            stream = container.streams[stream_index]
            if stream.codec_context.is_hwaccel:
                return container, stream, stream.codec_context, f"{stream.codec_context.name} on NVDEC (CUDA hwaccel)"
            container.close()
    container = _open_container(path)
    stream = container.streams[stream_index]
    if hw_decode == "auto":
        jetson = f"{stream.codec_context.name}_nvv4l2dec"
        if jetson in av.codecs_available:
            try:
                decoder = av.CodecContext.create(jetson, "r")
                decoder.extradata = stream.codec_context.extradata
                decoder.open()
            except (av.FFmpegError, OSError, ValueError) as err:
                log.debug("%s: %s not usable here (%s)", path, jetson, err)
            else:
                return container, stream, decoder, f"{jetson} (Jetson hardware decoder)"
    stream.thread_type = "AUTO"  # frame + slice threads
    return container, stream, stream.codec_context, f"{stream.codec_context.name} (software, frame threads)"


def _decode_seeking(path: Path, stream_index: int, timeline: _Timeline, indices: np.ndarray,
                    convert: Callable[[av.VideoFrame], np.ndarray], *, hw_decode: str) -> Iterator[np.ndarray]:
    """Decode only what the planned frames need; frames are identified by presentation time.

    Before each wanted frame: when its keyframe (the last one presented at or before it) lies
    beyond what the demuxer has read, seek there instead of decoding through; then decode
    forward. Packets that are not wanted are decoded with ``skip_frame`` NONREF, so frames no
    other frame refers to (most B-frames) cost nothing. A seek that lands past its target
    (a container whose index disagrees) switches to linear decoding from the start.
    """
    if len(indices) == 0:
        return
    targets = timeline.pts[indices].tolist()  # ascending, distinct
    wanted = set(targets)
    container, stream, context, label = _open_for_decoding(path, stream_index, hw_decode)
    log.info("%s: decoding with %s", path, label)
    k = 0  # next target
    read_dts = None  # decode time of the last packet read: where the demuxer is
    last_pts = None  # presentation time of the last frame out of the decoder
    # Demuxers seek by presentation time (MP4, Matroska) or near decode time (MPEG-TS): try pts;
    # after a seek lands past its frame, dts; after a second, decode linearly from the start.
    seek_by = [timeline.key_pts, timeline.key_dts]
    seeking = True
    seeks = packets_sent = 0  # for the summary below

    def position() -> str:
        done = 0 if last_pts is None else int(np.searchsorted(timeline.pts, last_pts, side="right"))
        return f"{done} of {len(timeline.pts)}"

    def keyframe_ahead(target: int) -> int | None:
        """The keyframe to seek to for `target`, when seeking skips work; else None."""
        key = int(np.searchsorted(timeline.key_pts, target, side="right")) - 1
        if not seeking or key < 0:
            return None
        if read_dts is None:
            return key if key > 0 else None  # at the start of the file, keyframe 0 is where we are
        return key if timeline.key_dts[key] > read_dts else None

    reposition = False  # after a seek overshot: seek again, whatever the demuxer read
    try:
        while k < len(targets):
            key = keyframe_ahead(targets[k])
            if reposition and seeking and key is None:
                key = max(0, int(np.searchsorted(timeline.key_pts, targets[k], side="right")) - 1)
            reposition = False
            sought = key is not None
            if sought:
                container.seek(int(seek_by[0][key]), stream=stream, backward=True, any_frame=False)
                context.flush_buffers()
                seeks += 1
            replan = False
            for packet in container.demux(stream):
                drain = False
                if packet.size:
                    packets_sent += 1
                    read_dts = packet.dts if packet.dts is not None else packet.pts
                    context.skip_frame = "DEFAULT" if packet.pts in wanted else "NONREF"
                    # The current target's packet, and the next target is a seek away (or there is
                    # none): drain the decoder now rather than feed it frames only to fill its delay.
                    drain = packet.pts == targets[k] and (k + 1 == len(targets)
                                                          or keyframe_ahead(targets[k + 1]) is not None)
                wanted_before = k
                for send in [packet if packet.size else None] + ([None] if drain else []):
                    for frame in context.decode(send):
                        if frame.pts is None:
                            continue
                        if sought and frame.pts > targets[k]:  # the seek overshot its frame
                            log.debug("%s: a seek to %d landed at %d", path, targets[k], frame.pts)
                            seek_by.pop(0)
                            seeking, replan, reposition = bool(seek_by), True, True
                            if not seeking:
                                container.seek(0, stream=stream, backward=True, any_frame=False)
                                read_dts = last_pts = None
                            context.flush_buffers()
                            break
                        sought = False
                        last_pts = frame.pts
                        if frame.pts > targets[k]:
                            raise VideoError(f"{path}: corrupt: frame {int(indices[k])} never came out of the "
                                             f"decoder (decoded {position()} frames)")
                        if frame.pts == targets[k]:
                            yield convert(frame)
                            k += 1
                            if k == len(targets):
                                log.debug("%s: %d planned frames, %d packets sent to the decoder of %d, %d seeks",
                                          path, len(targets), packets_sent, len(timeline.pts), seeks)
                                return
                            if keyframe_ahead(targets[k]) is not None:
                                replan = True  # seek rather than decode through
                                break
                    if replan:
                        break
                if drain and not replan:
                    if k == wanted_before:
                        raise VideoError(f"{path}: corrupt: frame {int(indices[k])} did not decode "
                                         f"(decoded {position()} frames)")
                    context.flush_buffers()
                    replan = True
                if replan:
                    break
            if not replan:  # the file ended first
                raise VideoError(f"{path}: truncated or corrupt: decoded {position()} expected frames "
                                 f"(frame {int(indices[k])} was planned)")
    except av.FFmpegError as err:
        raise VideoError(f"{path}: decoding failed after {position()} frames ({err})") from err
    finally:
        container.close()


def _decode_counting(path: Path, stream_index: int, indices: np.ndarray, total: int,
                     convert: Callable[[av.VideoFrame], np.ndarray]) -> Iterator[np.ndarray]:
    """For streams without presentation times: decode in order, count frames, keep the planned ones."""
    if len(indices) == 0:
        return
    container = _open_container(path)
    try:
        stream = container.streams[stream_index]
        stream.thread_type = "AUTO"
        wanted = iter(indices.tolist())
        next_index = next(wanted)
        decoded = 0
        try:
            for frame in container.decode(stream):
                while next_index is not None and decoded == next_index:
                    yield convert(frame)
                    next_index = next(wanted, None)
                if next_index is None:
                    return
                decoded += 1
        except av.FFmpegError as err:
            raise VideoError(f"{path}: decoding failed after {decoded} of {total} frames ({err})") from err
        raise VideoError(
            f"{path}: truncated or corrupt: decoded {decoded} of {total} expected frames "
            f"(frame {next_index} was planned)"
        )
    finally:
        container.close()


# --- synthetic videos for tests and demos ----------------------------------------------------

_DIGITS = 3  # base-16 digits of the frame index, one grey bar each: indices 0..4095
_LEVEL0, _LEVEL_STEP = 24, 13  # grey level of digit d: 24 + 13 * d (survives lossy coding)


def synthetic_frame(index: int, *, width: int = 160, height: int = 120) -> np.ndarray:
    """(height, width, 3) uint8 frame whose content encodes ``index`` (mod 4096).

    Top half: three grey bars, left to right the base-16 digits of the index (least
    significant first), digit d drawn at level 24 + 13 d. Bottom half: a white square that
    moves 4 px per frame, so consecutive frames are not identical.
    """
    frame = np.zeros((height, width, 3), dtype=np.uint8)
    for k in range(_DIGITS):
        digit = (index >> (4 * k)) & 15
        frame[: height // 2, k * width // _DIGITS : (k + 1) * width // _DIGITS] = _LEVEL0 + _LEVEL_STEP * digit
    side = max(2, height // 8)
    x = (4 * index) % max(1, width - side)
    y = height // 2 + height // 6
    frame[y : y + side, x : x + side] = 255
    return frame


def synthetic_frame_index(rgb: np.ndarray) -> int:
    """Read back the index (mod 4096) of a :func:`synthetic_frame`, at any resolution.

    ``rgb`` is (H, W, 3) or (H, W) with values on the 0..255 scale (uint8 or float).
    """
    image = np.asarray(rgb, dtype=np.float64)
    height, width = image.shape[:2]
    rows = slice(height // 10, height * 4 // 10)
    index = 0
    for k in range(_DIGITS):
        left, right = k * width // _DIGITS, (k + 1) * width // _DIGITS
        margin = (right - left) // 4
        level = image[rows, left + margin : right - margin].mean()
        digit = int(np.clip(round((level - _LEVEL0) / _LEVEL_STEP), 0, 15))
        index |= digit << (4 * k)
    return index


def write_synthetic_video(
    path: str | Path, *, seconds: float, fps: float, width: int = 160, height: int = 120, with_audio: bool = False,
    codec: str = "mpeg4", gop: int | None = None,
) -> Path:
    """Encode ``round(seconds * fps)`` :func:`synthetic_frame` frames with PyAV.

    The container follows the suffix (.mp4/.mov are written with the index up front, .mkv,
    .avi). A fractional ``fps`` is kept as a fraction (29.97 -> 2997/100). ``seconds=0`` with
    ``.avi`` writes a valid file whose video stream has no frames (.mp4 drops an empty track).
    ``with_audio`` adds a sine-tone track. ``codec``: "mpeg4" (MPEG-4 Part 2, no B-frames) or
    "libx264" (H.264 with 3 B-frames; MP4 then carries an edit list for the B-frame delay);
    ``gop``: frames between keyframes (the encoder's default when None).
    """
    path = Path(path)
    num_frames = int(round(seconds * fps))
    rate = fractions.Fraction(fps).limit_denominator(1001)
    options = {"movflags": "faststart"} if path.suffix.lower() in (".mp4", ".mov", ".m4v") else {}
    with av.open(str(path), "w", options=options) as container:
        video = container.add_stream(codec, rate=rate)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":  # near-lossless so the grey levels survive; scene cuts off: a fixed GOP
            video.options = {"crf": "4", "bf": "3", "sc_threshold": "0",
                             **({"g": str(gop), "keyint_min": str(gop)} if gop else {})}
        else:
            video.bit_rate = 4_000_000  # high enough that the grey levels survive within +-1
            if gop:
                video.codec_context.gop_size = gop
        audio_frames = []
        if with_audio:
            audio_frames = _sine_frames(container, seconds, codec="mp2" if path.suffix.lower() == ".avi" else "aac")
        container.start_encoding()
        for index in range(num_frames):
            frame = av.VideoFrame.from_ndarray(synthetic_frame(index, width=width, height=height), format="rgb24")
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        for stream, frame in audio_frames:
            container.mux(stream.encode(frame))
        if audio_frames:
            container.mux(audio_frames[0][0].encode(None))
    return path


def write_vfr_video(path: str | Path, frame_times_s: list[float], *, width: int = 96, height: int = 64) -> Path:
    """A variable-frame-rate file: frame i (a :func:`synthetic_frame`) presented at ``frame_times_s[i]``.

    MPEG-4 Part 2 in a millisecond time base (.mkv, or .mp4); the times are kept to the
    millisecond, and need not start at 0.
    """
    path = Path(path)
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=1000)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.codec_context.time_base = fractions.Fraction(1, 1000)
        video.bit_rate = 4_000_000
        for index, seconds in enumerate(frame_times_s):
            frame = av.VideoFrame.from_ndarray(synthetic_frame(index, width=width, height=height), format="rgb24")
            frame.pts, frame.time_base = int(round(seconds * 1000)), fractions.Fraction(1, 1000)
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
    return path


def _sine_frames(container: av.container.OutputContainer, seconds: float, *, codec: str,
                 sample_rate: int = 16000) -> list:
    stream = container.add_stream(codec, rate=sample_rate)
    stream.layout = "mono"
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    pcm = (0.3 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)[None]
    if pcm.shape[1] == 0:
        return []
    frame = av.AudioFrame.from_ndarray(pcm, format="fltp", layout="mono")
    frame.sample_rate = sample_rate
    return [(stream, frame)]


def write_audio_only_file(path: str | Path, *, seconds: float = 1.0, cover_art: bool = False) -> Path:
    """AAC audio (``.m4a``, ``.mp4``) with no video stream, for the error path.

    ``cover_art`` (``.mp4`` only) adds a JPEG cover, which FFmpeg exposes as a one-frame video
    stream marked ``attached_pic``: still not a video.
    """
    path = Path(path)
    with av.open(str(path), "w") as container:
        frames = _sine_frames(container, seconds, codec="aac")
        cover = None
        if cover_art:
            cover = container.add_stream("mjpeg", rate=1)
            cover.width, cover.height, cover.pix_fmt = 64, 48, "yuvj420p"
            cover.disposition = av.stream.Disposition.attached_pic
        container.start_encoding()
        if cover is not None:
            picture = av.VideoFrame.from_ndarray(synthetic_frame(0, width=64, height=48), format="rgb24")
            container.mux(cover.encode(picture))
            container.mux(cover.encode(None))
        for stream, frame in frames:
            container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
    return path
