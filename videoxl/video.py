"""Video ingest: which frames to sample, how to read them lazily, how to preprocess them.

Three kinds of source share one entry point, :func:`open_video`:

    video file  --PyAV demux/decode-->  \\
    image folder --Pillow, by name---->  > planned frames (uint8 HxWx3) -> preprocess -> batches
    numpy array (N, H, W, 3) uint8 --->  /

Frames are decoded in order and only the planned ones are kept; at most one batch of
preprocessed frames (B, 3, s, s) float32 exists at a time, so an hour-long video never sits
in memory whole. No torch here: the runtime imports this module.
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


# --- sampling plan (DESIGN §1) ---------------------------------------------------------------


@dataclass(frozen=True)
class SamplingPlan:
    frame_indices: np.ndarray  # (N,) int64, strictly increasing, into the source's frames
    timestamps: np.ndarray  # (N,) float64 seconds: frame_indices / video_fps

    def __len__(self) -> int:
        return int(self.frame_indices.shape[0])


def plan_sampling(
    *, num_frames: int, video_fps: float, fps: float = 1.0, max_fps: float = 4.0, max_frames: int
) -> SamplingPlan:
    """Which source frames the model sees (Video-XL-2's sampler, DESIGN §1).

    With ``duration = num_frames / video_fps``:

    - if ``duration * fps > max_frames`` (even the base rate overflows the budget): sample
      ``max_frames`` frames uniformly, ``round(linspace(0, num_frames - 1, max_frames))``;
    - otherwise sample at ``f = max(fps, min(max_fps, max_frames / duration))``, i.e. as fast
      as ``max_fps`` while the budget allows and never slower than ``fps``, taking every
      ``step = max(1, round(video_fps / f))``-th frame from frame 0 (Python's round: halves
      go to even); if the rounded step still yields more than ``max_frames`` frames, sample
      uniformly as above, so the end of the video is never dropped.

    Because ``step`` is rounded, the effective rate is ``video_fps / step``, not exactly ``f``
    (a 30 fps clip at f = 4 uses step 8, i.e. 3.75 fps). Timestamps are
    ``frame_index / video_fps`` seconds. The plan always has at least one frame.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if not video_fps > 0 or not math.isfinite(video_fps):
        raise ValueError(f"video_fps must be a positive number, got {video_fps}")
    if not fps > 0 or not max_fps > 0:
        raise ValueError(f"fps and max_fps must be positive, got fps={fps}, max_fps={max_fps}")
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")

    duration_s = num_frames / video_fps
    indices = None
    if duration_s * fps <= max_frames:
        rate = max(fps, min(max_fps, max_frames / duration_s))
        step = max(1, round(video_fps / rate))
        indices = np.arange(0, num_frames, step, dtype=np.int64)
    if indices is None or len(indices) > max_frames:
        # Over the budget (also when a rounded-down step overshoots it): spread the budget over
        # the whole video rather than drop its end. np.unique guards against repeats when the
        # source has fewer frames than the budget (only possible when fps > video_fps).
        indices = np.unique(np.round(np.linspace(0, num_frames - 1, max_frames)).astype(np.int64))
    return SamplingPlan(frame_indices=indices, timestamps=indices / float(video_fps))


# --- preprocessing ---------------------------------------------------------------------------


def preprocess_frames(frames_uint8_nhwc: np.ndarray, image_size: int) -> np.ndarray:
    """(B, H, W, 3) uint8 RGB -> (B, 3, s, s) float32 in [-1, 1], SigLIP processor semantics.

    Each frame is resized to exactly ``image_size`` x ``image_size`` with Pillow's bicubic
    filter (no aspect preservation, no crop), scaled by 1/255 and normalised with mean 0.5 and
    std 0.5 per channel.
    """
    frames = np.asarray(frames_uint8_nhwc)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise VideoError(
            f"frames must be uint8 (B, H, W, 3) RGB, got {frames.dtype} with shape {frames.shape}"
        )
    out = np.empty((frames.shape[0], 3, image_size, image_size), dtype=np.float32)
    for b, frame in enumerate(frames):
        resized = Image.fromarray(frame).resize((image_size, image_size), Image.BICUBIC)
        pixels = np.asarray(resized, dtype=np.float32) * np.float32(1.0 / 255.0)
        out[b] = ((pixels - _IMAGE_MEAN) / _IMAGE_STD).transpose(2, 0, 1)
    return out


# --- sources ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameBatch:
    pixels: np.ndarray  # (B, 3, s, s) float32
    timestamps: np.ndarray  # (B,) float64 seconds


# Yields the planned frames, in plan order, as (H, W, 3) uint8 RGB.
FrameReader = Callable[[np.ndarray], Iterator[np.ndarray]]


class VideoSource:
    """A planned, lazily decoded video. Build one with :func:`open_video`."""

    def __init__(
        self,
        *,
        plan: SamplingPlan,
        source_num_frames: int,
        source_fps: float,
        image_size: int,
        source_description: str,
        read_frames: FrameReader,
    ) -> None:
        self.plan = plan
        self.source_num_frames = source_num_frames  # frames in the source, before sampling
        self.source_fps = source_fps
        self.image_size = image_size
        self.source_description = source_description
        self._read_frames = read_frames

    @property
    def num_frames(self) -> int:
        """Frames the model will see (sampled)."""
        return len(self.plan)

    @property
    def duration_s(self) -> float:
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


def open_video(
    source: str | Path | np.ndarray,
    *,
    image_size: int = 384,
    fps: float = 1.0,
    max_fps: float = 4.0,
    max_frames: int = 1024,
    source_fps: float | None = None,
) -> VideoSource:
    """Plan the sampling of a video file, an image folder or a frame array.

    - a video file: its own frame rate; ``source_fps`` must be None.
    - a directory of images (``IMAGE_SUFFIXES``, natural order of the file names, so
      ``frame_2.png`` comes before ``frame_10.png``): one frame per image, played at
      ``source_fps`` frames per second (default 1.0, i.e. one image per second).
    - a numpy array (N, H, W, 3) uint8 RGB: ``source_fps`` is required.

    Only metadata is read here; frames are decoded by :meth:`VideoSource.iter_batches`.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    sampling = {"fps": fps, "max_fps": max_fps, "max_frames": max_frames}
    if isinstance(source, np.ndarray):
        return _open_array(source, source_fps=source_fps, image_size=image_size, sampling=sampling)
    path = Path(source)
    if not path.exists():
        raise VideoError(f"{path}: no such file or directory")
    if path.is_dir():
        return _open_image_folder(path, source_fps=1.0 if source_fps is None else source_fps,
                                  image_size=image_size, sampling=sampling)
    if source_fps is not None:
        raise VideoError(f"{path}: source_fps applies to image folders and arrays; a video file has its own frame rate")
    return _open_video_file(path, image_size=image_size, sampling=sampling)


def _check_source_fps(what: str, source_fps: float | None) -> float:
    if source_fps is None:
        raise VideoError(f"{what}: source_fps is required (frames per second of the array)")
    if not source_fps > 0 or not math.isfinite(source_fps):
        raise VideoError(f"{what}: source_fps must be a positive number, got {source_fps}")
    return float(source_fps)


def _open_array(frames: np.ndarray, *, source_fps: float | None, image_size: int, sampling: dict) -> VideoSource:
    what = f"array {frames.dtype}{tuple(frames.shape)}"
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


def _open_container(path: Path) -> av.container.InputContainer:
    try:
        return av.open(str(path))
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


def _count_frames(path: Path, container: av.container.InputContainer, stream: av.VideoStream, rate: float) -> int:
    """Frames in the stream: the container's count, else the stream's duration, else packets."""
    if stream.frames > 0:
        return int(stream.frames)
    if stream.duration and stream.time_base:
        return int(round(float(stream.duration * stream.time_base) * rate))
    try:  # demux only, no decoding: one pass over the file
        return sum(1 for packet in container.demux(stream) if packet.size)
    except av.FFmpegError as err:
        raise VideoError(f"{path}: cannot read the video packets ({err})") from err


def _open_video_file(path: Path, *, image_size: int, sampling: dict) -> VideoSource:
    with _open_container(path) as container:
        stream = _video_stream(path, container)
        rate_q = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate_q or rate_q <= 0:
            raise VideoError(f"{path}: the video stream has no frame rate")
        rate = float(rate_q)
        total = _count_frames(path, container, stream, rate)
        codec = stream.codec_context.name
        width, height = stream.codec_context.width, stream.codec_context.height
        stream_index = stream.index
    if total < 1:
        raise VideoError(f"{path}: the video stream has no frames")
    plan = plan_sampling(num_frames=total, video_fps=rate, **sampling)
    log.info("%s: %d frames at %.3f fps, sampling %d", path, total, rate, len(plan))

    def read(indices: np.ndarray) -> Iterator[np.ndarray]:
        yield from _decode_planned(path, stream_index, indices, total)

    description = f"{path} ({codec} {width}x{height}, {total} frames at {rate:g} fps, {total / rate:.1f} s)"
    return VideoSource(plan=plan, source_num_frames=total, source_fps=rate, image_size=image_size,
                       source_description=description, read_frames=read)


def _decode_planned(path: Path, stream_index: int, indices: np.ndarray, total: int) -> Iterator[np.ndarray]:
    """Decode sequentially and keep the planned frames, counted in presentation order."""
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
                if decoded == next_index:
                    yield frame.to_ndarray(format="rgb24")
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
    path: str | Path, *, seconds: float, fps: float, width: int = 160, height: int = 120, with_audio: bool = False
) -> Path:
    """Encode ``round(seconds * fps)`` :func:`synthetic_frame` frames with PyAV (MPEG-4 Part 2).

    The container follows the suffix (.mp4/.mov are written with the index up front, .mkv,
    .avi). A fractional ``fps`` is kept as a fraction (29.97 -> 2997/100). ``seconds=0`` with
    ``.avi`` writes a valid file whose video stream has no frames (.mp4 drops an empty track).
    ``with_audio`` adds a sine-tone track.
    """
    path = Path(path)
    num_frames = int(round(seconds * fps))
    rate = fractions.Fraction(fps).limit_denominator(1001)
    options = {"movflags": "faststart"} if path.suffix.lower() in (".mp4", ".mov", ".m4v") else {}
    with av.open(str(path), "w", options=options) as container:
        video = container.add_stream("mpeg4", rate=rate)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.bit_rate = 4_000_000  # high enough that the grey levels survive within +-1
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
