"""`videoxl serve`: OpenAI-compatible chat completions about local videos (Starlette on uvicorn).

    client --POST /v1/chat/completions--> handler: parse, check the video path --> bounded queue (429 when full)
                                                                                      |
    one worker thread (the backend is not thread-safe): open video -> prepared-video cache or
    Pipeline.prepare -> Pipeline.ask, text pieces handed back to the event loop --> JSON or SSE chunks

The video is a ``video_url`` content part (a local path or ``file://`` URL under an ``--allow-dir``
directory; nothing is fetched from the network). Earlier user/assistant turns go into the prompt's
suffix, after the video (`videoxl.text.chat_question`), so a conversation never invalidates its
prepared video. A client that disconnects cancels its request: before it starts, or between two
answer tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from tokenizers import Tokenizer

from videoxl.runtime.artifacts import ArtifactError
from videoxl.backend import Backend
from videoxl.runtime.kv_store import HostMemoryError
from videoxl.runtime.pipeline import InferenceOptions, Pipeline
from videoxl.runtime.prepared_cache import PreparedCache, sampling_settings, video_content_hash
from videoxl.sampling import GenerationConfig
from videoxl.text import SYSTEM_PROMPT, chat_question
from videoxl.video import VideoError, open_video

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25  # how often a waiting handler asks whether its client is still there


@dataclass(frozen=True)
class ServeSettings:
    """What the server was started with; per-request fields override the sampling and block-choice defaults."""

    model_name: str
    allowed_dirs: tuple[Path, ...]
    queue_size: int = 8  # requests waiting (not counting the one running)
    options: InferenceOptions = InferenceOptions()
    fps: float | None = None  # None: the config's
    max_frames: int | None = None  # None: the artifacts' limit
    max_new_tokens: int = 128  # when a request gives no max_tokens

    def __post_init__(self) -> None:
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {self.queue_size}")
        if not self.allowed_dirs:
            raise ValueError("serve needs at least one allowed video directory")


class RequestError(Exception):
    """A request the server refuses: HTTP status and a one-line message for the client."""

    def __init__(self, status: int, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


class Cancelled(Exception):
    """The client went away; raised between tokens to stop decoding."""


# --- request parsing -----------------------------------------------------------------------------
def resolve_video_path(url: str, allowed_dirs: Sequence[Path]) -> Path:
    """The real path of a ``video_url``: a local absolute path or ``file://`` URL under an allowed directory.

    Symlinks and ``..`` are resolved before the check, so neither can lead outside; the
    containment check comes before the existence check, so files outside stay unprobed.
    """
    if url.startswith("file://"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise RequestError(400, f"file URL with a host ({parsed.netloc!r}): only local files are served", param="video_url")
        raw = unquote(parsed.path)
    elif "://" in url or url.startswith("data:"):
        raise RequestError(400, "video_url must be a local path or a file:// URL; nothing is fetched from the network",
                           param="video_url")
    else:
        raw = url
    path = Path(raw)
    if not path.is_absolute():
        raise RequestError(400, f"video path {raw!r} is not absolute", param="video_url")
    real = path.resolve()
    if not any(real == root or root in real.parents for root in allowed_dirs):
        raise RequestError(403, f"video {raw!r} is outside the directories this server may read", param="video_url")
    if not real.exists():
        raise RequestError(404, f"video {raw!r} does not exist", param="video_url")
    return real


def _text_of(content: Any, *, where: str) -> tuple[str, list[str]]:
    """(text, video urls) of one message's content: a string or a list of text / video_url parts."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise RequestError(400, f"{where}: content must be a string or a list of parts", param="messages")
    texts, videos = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "video_url" and isinstance(part.get("video_url"), dict) and isinstance(part["video_url"].get("url"), str):
            videos.append(part["video_url"]["url"])
        else:
            raise RequestError(400, f"{where}: unsupported content part {kind!r} (text and video_url are)", param="messages")
    return "\n".join(texts), videos


def _number(body: dict, name: str, kind: type, *, least: float | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise RequestError(400, f"{name} must be {'a number' if kind is float else 'an integer'}, got {value!r}", param=name)
    if least is not None and value < least:
        raise RequestError(400, f"{name} must be >= {least}, got {value}", param=name)
    return kind(value)


def _positive(value: float | None, name: str) -> float | None:
    if value is not None and value <= 0:
        raise RequestError(400, f"{name} must be > 0, got {value}", param=name)
    return value


@dataclass
class ChatRequest:
    """One parsed chat completion request."""

    video: Path
    question: str  # the suffix's {question}: earlier turns included
    options: InferenceOptions
    fps: float | None
    max_frames: int | None
    gen: GenerationConfig
    stream: bool
    include_usage: bool


def parse_chat_request(body: Any, settings: ServeSettings) -> ChatRequest:
    """The OpenAI request body -> ChatRequest; RequestError naming the first problem."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    if body.get("model") != settings.model_name:
        raise RequestError(404, f"model {body.get('model')!r} is not served here; this server serves {settings.model_name!r}",
                           param="model")
    if body.get("n") not in (None, 1):
        raise RequestError(400, "only n=1 is supported", param="n")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list", param="messages")
    turns, videos = [], []
    for number, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        text, urls = _text_of(message.get("content") if isinstance(message, dict) else None, where=f"messages[{number}]")
        if role == "system":
            # the system prompt sits in the prefix, before the video: another one would need another prefill
            if number != 0 or text.strip() != SYSTEM_PROMPT:
                raise RequestError(400, f"the system prompt is fixed to {SYSTEM_PROMPT!r} (it is part of the prepared video)",
                                   param="messages")
            continue
        if role not in ("user", "assistant"):
            raise RequestError(400, f"messages[{number}]: role {role!r} is not supported (system, user, assistant are)",
                               param="messages")
        if urls and (role != "user" or turns):
            raise RequestError(400, f"messages[{number}]: the video belongs in the first user message", param="messages")
        videos += urls
        turns.append((role, text))
    if len(videos) != 1:
        raise RequestError(400, f"a conversation needs exactly one video_url part, got {len(videos)}", param="messages")
    try:
        question = chat_question(turns)
    except ValueError as err:
        raise RequestError(400, str(err), param="messages") from err

    video = resolve_video_path(videos[0], settings.allowed_dirs)
    max_tokens = _number(body, "max_completion_tokens", int, least=1) or _number(body, "max_tokens", int, least=1)
    temperature = _number(body, "temperature", float, least=0)
    top_p = _number(body, "top_p", float)
    seed = _number(body, "seed", int)
    blocks = body.get("dense_blocks")
    if isinstance(blocks, list) and all(isinstance(b, int) and not isinstance(b, bool) for b in blocks):
        blocks = tuple(blocks)
    elif blocks is not None and not (blocks == "all" or (isinstance(blocks, int) and not isinstance(blocks, bool))):
        raise RequestError(400, f"dense_blocks must be an integer, a list of block numbers or 'all', got {blocks!r}",
                           param="dense_blocks")
    stream_options = body.get("stream_options") or {}
    try:  # InferenceOptions and GenerationConfig check the request's values
        options = dataclasses.replace(
            settings.options,
            dense_blocks=settings.options.dense_blocks if blocks is None else blocks,
            decode=body.get("decode") or settings.options.decode,
        )
        gen = GenerationConfig(
            max_new_tokens=max_tokens or settings.max_new_tokens,
            temperature=0.0 if temperature is None else temperature,  # greedy unless asked, as `videoxl run`
            top_p=1.0 if top_p is None else top_p, seed=seed or 0, stop_at_eos=not body.get("ignore_eos", False),
        )
    except ValueError as err:
        raise RequestError(400, str(err)) from err
    return ChatRequest(
        video=video, question=question, options=options, fps=_positive(_number(body, "fps", float), "fps"),
        max_frames=_number(body, "max_frames", int, least=1), gen=gen, stream=bool(body.get("stream", False)),
        include_usage=bool(isinstance(stream_options, dict) and stream_options.get("include_usage")),
    )


# --- metrics -------------------------------------------------------------------------------------
class Metrics:
    """Counters and gauges, rendered in the Prometheus text format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[int, int] = {}  # by HTTP status
        self.counters = {name: 0.0 for name in (
            "cancelled", "vision_seconds", "prefill_seconds", "decode_seconds", "prompt_tokens", "generated_tokens",
            "cache_hits_memory", "cache_hits_disk", "cache_misses",
        )}

    def count_request(self, status: int) -> None:
        with self._lock:
            self.requests[status] = self.requests.get(status, 0) + 1

    def add(self, **amounts: float) -> None:
        with self._lock:
            for name, amount in amounts.items():
                self.counters[name] += amount

    def render(self, *, queue_length: int, running: int, cache: PreparedCache) -> str:
        with self._lock:
            c, requests = dict(self.counters), dict(self.requests)
        lines = ["# HELP videoxl_requests_total Chat completion requests by HTTP status.", "# TYPE videoxl_requests_total counter"]
        lines += [f'videoxl_requests_total{{code="{code}"}} {count}' for code, count in sorted(requests.items())]

        def metric(name: str, kind: str, help_text: str, *samples: tuple[str, float]) -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
            lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

        metric("videoxl_requests_cancelled_total", "counter", "Requests whose client disconnected first.", ("", c["cancelled"]))
        metric("videoxl_queue_length", "gauge", "Requests waiting for the worker.", ("", queue_length))
        metric("videoxl_requests_running", "gauge", "Requests the worker is on (0 or 1).", ("", running))
        for stage in ("vision", "prefill", "decode"):
            metric(f"videoxl_{stage}_seconds_total", "counter", f"Seconds spent in {stage}.", ("", c[f"{stage}_seconds"]))
        metric("videoxl_prompt_tokens_total", "counter", "Prompt tokens of answered requests.", ("", c["prompt_tokens"]))
        metric("videoxl_generated_tokens_total", "counter", "Answer tokens generated.", ("", c["generated_tokens"]))
        metric("videoxl_prepared_cache_hits_total", "counter", "Prepared videos found in the cache.",
               ('{tier="memory"}', c["cache_hits_memory"]), ('{tier="disk"}', c["cache_hits_disk"]))
        metric("videoxl_prepared_cache_misses_total", "counter", "Videos prepared (decoded, vision, prefill).", ("", c["cache_misses"]))
        metric("videoxl_prepared_cache_corrupt_total", "counter", "Disk entries that failed their checks and were rebuilt.",
               ("", cache.stats.corrupt))
        metric("videoxl_prepared_cache_memory_bytes", "gauge", "Bytes of prepared videos kept in memory.",
               ("", cache.stats.memory_bytes))
        return "\n".join(lines) + "\n"


# --- the worker ----------------------------------------------------------------------------------
@dataclass
class Job:
    """One request on its way through the worker; events go back to the handler's event loop."""

    request: ChatRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    finished: bool = False

    def emit(self, *event: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancel.set()


class Worker:
    """The one thread that owns the backend: prepares videos (through the cache) and answers, one request at a time."""

    def __init__(self, pipeline: Pipeline, cache: PreparedCache, settings: ServeSettings, metrics: Metrics) -> None:
        self.pipeline, self.cache, self.settings, self.metrics = pipeline, cache, settings, metrics
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=settings.queue_size)
        self.running = 0
        self._thread = threading.Thread(target=self._loop, name="videoxl-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        while True:  # drop what still waits: nobody will read its answer
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel.set()
        self.queue.put(None)
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        """Queue `job`; queue.Full when `queue_size` requests already wait."""
        self.queue.put_nowait(job)

    def _loop(self) -> None:
        while (job := self.queue.get()) is not None:
            self.running = 1
            try:
                self._run(job)
            except Cancelled:
                self.metrics.add(cancelled=1)
                log.info("request cancelled: the client disconnected")
            except RequestError as err:
                job.emit("error", err.status, err.message)
            except (VideoError, ArtifactError, HostMemoryError) as err:
                job.emit("error", 400, str(err))
            except Exception as err:  # reported to the client and logged; the worker keeps serving
                log.exception("request failed")
                job.emit("error", 500, f"internal error: {type(err).__name__}: {err}")
            finally:
                job.finished = True
                self.running = 0

    def _run(self, job: Job) -> None:
        if job.cancel.is_set():
            raise Cancelled
        request, pipeline, backend = job.request, self.pipeline, self.pipeline.backend
        sampling = sampling_settings(
            backend, fps=request.fps if request.fps is not None else self.settings.fps,
            max_frames=request.max_frames if request.max_frames is not None else self.settings.max_frames,
        )
        video = open_video(request.video, **sampling)
        backend.check_frames(video.num_frames)
        key = self.cache.key(video_hash=video_content_hash(request.video), sampling=sampling, options=request.options)
        prepared, tier = self.cache.get(key, backend)
        if prepared is None:
            prepared = pipeline.prepare(video, options=request.options)
            self.metrics.add(cache_misses=1, vision_seconds=prepared.report.vision_s, prefill_seconds=prepared.report.prefill_s)
            self.cache.put(key, prepared, to_disk=False)  # written after the answer: the disk write is off the first token's path
        else:
            self.metrics.add(**{f"cache_hits_{tier}": 1})
        # the entry is shared by every block choice and decode mode: this request's own on a shallow copy
        prepared = dataclasses.replace(prepared, options=request.options)
        job.emit("ready", tier)

        def on_text(piece: str) -> None:
            if job.cancel.is_set():
                raise Cancelled
            job.emit("text", piece)

        try:
            if job.cancel.is_set():
                raise Cancelled
            answer = pipeline.ask(prepared, request.question, gen=request.gen, on_text=on_text)
            self.metrics.add(decode_seconds=answer.report.decode_s, prompt_tokens=answer.report.prompt_tokens,
                             generated_tokens=answer.report.new_tokens)
            job.emit("done", answer, tier)
        finally:
            if tier != "disk":  # a cancelled request's video is worth keeping too
                try:
                    self.cache.save(key, prepared)
                except OSError:  # the answer stands; the next request prepares the video again
                    log.exception("could not write the prepared-video cache entry %s", key[:16])


# --- HTTP ----------------------------------------------------------------------------------------
def _error(status: int, message: str, *, param: str | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}
    body = {"error": {"message": message, "type": kind.get(status, "server_error"), "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


class ChatService:
    """The routes, bound to one pipeline, cache and worker."""

    def __init__(self, pipeline: Pipeline, cache: PreparedCache, settings: ServeSettings) -> None:
        self.pipeline, self.cache, self.settings = pipeline, cache, settings
        self.metrics = Metrics()
        self.worker = Worker(pipeline, cache, settings, self.metrics)
        self.created = int(time.time())

    def _reply(self, response: Response) -> Response:
        self.metrics.count_request(response.status_code)
        return response

    async def chat_completions(self, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return self._reply(_error(400, "the request body is not JSON"))
        try:
            parsed = parse_chat_request(body, self.settings)
        except RequestError as err:
            return self._reply(_error(err.status, err.message, param=err.param))
        job = Job(parsed, asyncio.get_running_loop())
        try:
            self.worker.submit(job)
        except queue.Full:
            return self._reply(_error(429, f"the server is busy: {self.settings.queue_size} requests are already waiting"))
        # Wait until the video is prepared, so that a bad video is an HTTP error even when streaming.
        first = await self._next_event(job, request)
        if first is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        if first[0] == "error":
            return self._reply(_error(first[1], first[2]))
        if parsed.stream:
            return self._reply(StreamingResponse(self._sse(job, request, parsed), media_type="text/event-stream"))
        pieces = []
        while (event := await self._next_event(job, request)) is not None:
            if event[0] == "text":
                pieces.append(event[1])
            elif event[0] == "error":
                return self._reply(_error(event[1], event[2]))
            else:
                _, answer, tier = event
                return self._reply(JSONResponse(self._completion(answer, tier, parsed)))
        return Response(status_code=499)

    async def _next_event(self, job: Job, request: Request) -> tuple | None:
        """The job's next event; None (and the job cancelled) once the client has disconnected."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel.set()
                    return None

    def _chunk(self, ident: str, delta: dict, finish_reason: str | None = None, **extra: Any) -> str:
        body = {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()), "model": self.settings.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    async def _sse(self, job: Job, request: Request, parsed: ChatRequest) -> AsyncIterator[str]:
        ident = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            yield self._chunk(ident, {"role": "assistant", "content": ""})
            while True:
                event = await job.events.get()  # a disconnect cancels this await (Starlette watches the socket)
                if event[0] == "text":
                    yield self._chunk(ident, {"content": event[1]})
                elif event[0] == "error":
                    yield f"data: {json.dumps({'error': {'message': event[2], 'code': event[1]}})}\n\n"
                    return
                else:
                    _, answer, _ = event
                    yield self._chunk(ident, {}, self._finish_reason(answer, parsed))
                    if parsed.include_usage:
                        body = {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()),
                                "model": self.settings.model_name, "choices": [], "usage": self._usage(answer)}
                        yield f"data: {json.dumps(body)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
        finally:
            if not job.finished:
                job.cancel.set()

    @staticmethod
    def _finish_reason(answer, parsed: ChatRequest) -> str:
        return "length" if len(answer.token_ids) >= parsed.gen.max_new_tokens else "stop"

    @staticmethod
    def _usage(answer) -> dict[str, int]:
        prompt, completion = answer.report.prompt_tokens, answer.report.new_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _completion(self, answer, tier: str | None, parsed: ChatRequest) -> dict:
        report = answer.report
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.settings.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                         "finish_reason": self._finish_reason(answer, parsed)}],
            "usage": self._usage(answer),
            # not in the OpenAI schema (clients keep unknown fields): where the prepared video came from
            "videoxl": {"prepared_from": tier or "prepared", "frames": report.frames, "dense_blocks": report.dense_blocks,
                        "first_token_s": report.first_token_s},
        }

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.settings.model_name, "object": "model", "created": self.created, "owned_by": "videoxl"}]})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "queue_length": self.worker.queue.qsize(), "running": self.worker.running})

    async def prometheus(self, request: Request) -> Response:
        text = self.metrics.render(queue_length=self.worker.queue.qsize(), running=self.worker.running, cache=self.cache)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


def create_app(backend: Backend, tokenizer: Tokenizer, settings: ServeSettings, cache: PreparedCache) -> Starlette:
    """The ASGI app: one worker thread starts with the app and stops with it."""
    missing = [str(d) for d in settings.allowed_dirs if not Path(d).is_dir()]
    if missing:
        raise ValueError(f"allowed video directories that are not directories: {', '.join(missing)}")
    settings = dataclasses.replace(settings, allowed_dirs=tuple(Path(d).resolve() for d in settings.allowed_dirs))
    service = ChatService(Pipeline(backend, tokenizer), cache, settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service.worker.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, service.worker.stop)

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", service.chat_completions, methods=["POST"]),
            Route("/v1/models", service.models, methods=["GET"]),
            Route("/health", service.health, methods=["GET"]),
            Route("/metrics", service.prometheus, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.service = service
    return app

