"""`videoxl serve` with the official openai client on a loopback port: answers, streaming, conversations,
disconnects, a full queue, path checks and a corrupted prepared-video cache entry."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from videoxl.cli import main  # noqa: E402
from videoxl.video import write_synthetic_video  # noqa: E402

MODEL = "video-xl-2"
# the same flags for `videoxl serve` and `videoxl run`: their answers must be equal
SHARED_FLAGS = ["--max-frames", "24", "--chunk-groups", "2", "--window", "1", "--block-groups", "2",
                "--dense-blocks", "1", "--max-new-tokens", "8"]
LONG = {"max_tokens": 3000, "extra_body": {"ignore_eos": True}}  # decodes for seconds: time to disconnect


class LoopbackServer:
    """`videoxl serve`'s app on 127.0.0.1 and a free port, in a thread (uvicorn.run is captured, not called)."""

    def __init__(self, argv: list[str]) -> None:
        captured = {}
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(uvicorn, "run", lambda app, **kwargs: captured.update(app=app, **kwargs))
            assert main(["serve", *argv]) == 0
        assert captured["host"] == "127.0.0.1"
        self.app = captured["app"]
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return response.read().decode()

    def metric(self, name: str) -> float:
        for line in self.get("/metrics").splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


def _user(video: Path, text: str) -> dict:
    return {"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{video}"}},
                                        {"type": "text", "text": text}]}


def _ask(server: LoopbackServer, messages: list[dict], **kwargs):
    return server.client.chat.completions.create(model=MODEL, messages=messages, **kwargs)


@pytest.fixture(scope="module")
def videos(tmp_path_factory, synthetic_video) -> Path:
    root = tmp_path_factory.mktemp("allowed")
    shutil.copy(synthetic_video, root / "a.mp4")
    write_synthetic_video(root / "b.mp4", seconds=7, fps=8, width=96, height=64)
    return root


@pytest.fixture(scope="module")
def server(tiny_onnx, videos, tmp_path_factory):
    started = LoopbackServer(["--onnx", str(tiny_onnx), "--allow-dir", str(videos), "--queue-size", "1",
                              "--cache", str(tmp_path_factory.mktemp("cache")), *SHARED_FLAGS])
    yield started
    started.close()


def _run_answer(tiny_onnx, video: Path, question: str, capsys, *extra: str) -> str:
    capsys.readouterr()
    assert main(["run", "--onnx", str(tiny_onnx), "--video", str(video), "--question", question, "--no-progress",
                 *SHARED_FLAGS, *extra]) == 0
    out = capsys.readouterr().out
    return out[out.index("\nA: ") + 4 : out.index("\n\nbackend")]


def test_answers_equal_videoxl_run_streaming_and_not(server, tiny_onnx, videos, capsys):
    expected = _run_answer(tiny_onnx, videos / "a.mp4", "What colour is the square?", capsys)
    messages = [_user(videos / "a.mp4", "What colour is the square?")]
    completion = _ask(server, messages)
    assert completion.choices[0].message.content == expected
    assert completion.choices[0].finish_reason in ("stop", "length") and completion.usage.completion_tokens <= 8
    assert completion.model_extra["videoxl"]["frames"] == 20  # the official sampling rule at a budget of 24
    chunks = list(_ask(server, messages, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens
    assert server.metric('videoxl_prepared_cache_hits_total{tier="memory"}') >= 1  # the second request reused the video


def test_two_conversations_about_two_videos_interleaved(server, tiny_onnx, videos):
    from videoxl.runtime.ort_backend import OnnxRuntimeBackend
    from videoxl.runtime.pipeline import InferenceOptions, Pipeline
    from videoxl.sampling import GenerationConfig
    from videoxl.text import chat_question, load_tokenizer
    from videoxl.video import open_video

    conversations = {"a.mp4": ["What moves?", "And then?"], "b.mp4": ["Describe it.", "Why?"]}
    history = {name: [] for name in conversations}
    replies = {name: [] for name in conversations}
    for turn in range(2):
        for name, questions in conversations.items():  # a, b, a, b
            history[name].append(_user(videos / name, questions[0]) if turn == 0 else {"role": "user", "content": questions[1]})
            completion = _ask(server, history[name])
            replies[name].append(completion)
            history[name].append({"role": "assistant", "content": completion.choices[0].message.content})
            assert completion.model_extra["videoxl"]["prepared_from"] in (("prepared", "memory") if turn == 0 else ("memory",))

    backend = OnnxRuntimeBackend(tiny_onnx)
    pipeline = Pipeline(backend, load_tokenizer(tiny_onnx))
    options = InferenceOptions(dense_blocks=1, chunk_groups=2, window_chunks=1, block_groups=2)
    for name, (first, second) in replies.items():
        cfg = backend.config
        video = open_video(videos / name, image_size=cfg.image_size, fps=cfg.fps, max_fps=cfg.max_fps, max_frames=24)
        prepared = pipeline.prepare(video, options=options)
        turns = [("user", conversations[name][0]), ("assistant", first.choices[0].message.content),
                 ("user", conversations[name][1])]
        direct = pipeline.ask(prepared, chat_question(turns), gen=GenerationConfig(max_new_tokens=8))
        assert second.choices[0].message.content == direct.text, name
        assert second.usage.prompt_tokens == direct.report.prompt_tokens > first.usage.prompt_tokens  # earlier turns in the prompt


def test_disconnect_mid_stream_cancels_and_the_server_goes_on(server, videos):
    before = server.metric("videoxl_requests_cancelled_total")
    stream = _ask(server, [_user(videos / "a.mp4", "Go on and on.")], stream=True, **LONG)
    pieces = 0
    for chunk in stream:
        pieces += bool(chunk.choices and chunk.choices[0].delta.content)
        if pieces == 3:
            break
    stream.close()
    deadline = time.monotonic() + 10
    while server.metric("videoxl_requests_cancelled_total") == before:
        assert time.monotonic() < deadline, "the disconnected request was not cancelled"
        time.sleep(0.1)
    assert _ask(server, [_user(videos / "b.mp4", "Still there?")]).choices[0].finish_reason in ("stop", "length")


def test_full_queue_is_429_and_the_waiting_request_is_answered(server, videos):
    busy = _ask(server, [_user(videos / "a.mp4", "Keep talking.")], stream=True, **LONG)
    next(iter(busy))  # the worker is on it
    waiting: dict = {}
    thread = threading.Thread(target=lambda: waiting.update(c=_ask(server, [_user(videos / "b.mp4", "Next?")])))
    thread.start()
    deadline = time.monotonic() + 10
    while json.loads(server.get("/health"))["queue_length"] < 1:
        assert time.monotonic() < deadline, "the second request never queued"
        time.sleep(0.05)
    with pytest.raises(openai.RateLimitError):
        _ask(server, [_user(videos / "a.mp4", "One too many.")])
    busy.close()
    thread.join(timeout=30)
    assert waiting["c"].choices[0].message.role == "assistant"


def test_videos_outside_the_allowed_directories_are_refused(server, videos, synthetic_video, tmp_path):
    outside = shutil.copy(synthetic_video, tmp_path / "secret.mp4")
    link = videos / "link.mp4"
    link.symlink_to(outside)
    try:
        for url in (str(outside), f"file://{videos}/../{tmp_path.name}/secret.mp4", str(link)):
            with pytest.raises(openai.PermissionDeniedError, match="outside the directories"):
                _ask(server, [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}]}])
    finally:
        link.unlink()
    for url, error in (("http://127.0.0.1:9/v.mp4", openai.BadRequestError), ("clip.mp4", openai.BadRequestError),
                       (str(videos / "missing.mp4"), openai.NotFoundError)):
        with pytest.raises(error):
            _ask(server, [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}]}])
    with pytest.raises(openai.NotFoundError, match="not served here"):
        server.client.chat.completions.create(model="other", messages=[_user(videos / "a.mp4", "Hi")])


def test_models_health_and_metrics(server):
    assert [m.id for m in server.client.models.list()] == [MODEL]
    assert json.loads(server.get("/health"))["status"] == "ok"
    text = server.get("/metrics")
    for name in ("videoxl_requests_total{code=\"200\"}", "videoxl_queue_length", "videoxl_vision_seconds_total",
                 "videoxl_prefill_seconds_total", "videoxl_decode_seconds_total", "videoxl_generated_tokens_total",
                 "videoxl_prepared_cache_hits_total{tier=\"memory\"}", "videoxl_prepared_cache_misses_total"):
        assert f"\n{name} " in text, name
    assert server.metric("videoxl_prefill_seconds_total") > 0


def test_corrupted_cache_entry_is_rebuilt_after_a_restart(tiny_onnx, videos, tmp_path):
    argv = ["--onnx", str(tiny_onnx), "--allow-dir", str(videos), "--cache", str(tmp_path), *SHARED_FLAGS]
    messages = [_user(videos / "b.mp4", "What is shown?")]
    answers = []
    for restart in range(3):  # prepared and saved; corrupt entry rebuilt; loaded from disk
        server = LoopbackServer(argv)
        try:
            completion = _ask(server, messages)
            answers.append((completion.choices[0].message.content, completion.model_extra["videoxl"]["prepared_from"],
                            server.metric("videoxl_prepared_cache_corrupt_total")))
        finally:
            server.close()
        if restart == 0:
            (entry,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
            data = entry / "data.bin"
            raw = bytearray(data.read_bytes())
            raw[-7] ^= 0x40  # one flipped bit in the last KV array
            data.write_bytes(raw)
    assert [a[1:] for a in answers] == [("prepared", 0), ("prepared", 1), ("disk", 0)]
    assert answers[0][0] == answers[1][0] == answers[2][0]


def test_readme_openai_client_example_runs(server, videos, capsys):
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (code,) = re.findall(r"```py\n(.*?)```", readme, flags=re.S)
    code = code.replace("http://127.0.0.1:8000/v1", server.url + "/v1").replace(
        "file:///data/videos/talk.mp4", f"file://{videos / 'a.mp4'}")
    assert server.url in code and str(videos) in code
    before = server.metric('videoxl_requests_total{code="200"}')
    exec(compile(code, "README.md", "exec"), {})
    assert server.metric('videoxl_requests_total{code="200"}') == before + 1


@pytest.mark.parametrize(("extra", "message"), [
    ({"fps": 0}, "fps must be > 0"),
    ({"dense_blocks": "x"}, "dense_blocks must be"),
    ({"decode": "sparse"}, "decode mode 'sparse'"),
    ({"max_tokens": 0}, "max_tokens must be >= 1"),
    ({"n": 2}, "only n=1"),
])
def test_bad_request_fields_are_one_line_400s(server, videos, extra, message):
    with pytest.raises(openai.BadRequestError, match=message):
        _ask(server, [_user(videos / "a.mp4", "Hi")], extra_body=extra)


def test_a_changed_system_prompt_is_refused(server, videos):
    with pytest.raises(openai.BadRequestError, match="system prompt is fixed"):
        _ask(server, [{"role": "system", "content": "Talk like a pirate."}, _user(videos / "a.mp4", "Hi")])
