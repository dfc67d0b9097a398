"""`videoxl serve` on loopback: time to first token cold vs cached (memory, disk), and a bounded load run.

    .venv/bin/python bench/bench_serve.py [--frames 256 1024] [--requests 50] [--clients 4] [--deadline-s 300]

Writes the random tiny checkpoint, exports it (ONNX fp32), writes synthetic 1 fps videos of N
frames, and starts `videoxl serve` as a subprocess on 127.0.0.1 (a free port) with a disk cache.
Time to first token = from sending a streaming request (openai client) to its first content
chunk: cold (the video decoded, vision, prefill), memory (the same video, another question),
disk (after a server restart: the entry loaded from disk). Then a load run: `--requests`
non-streaming requests from `--clients` threads over the prepared videos, stopped at
`--deadline-s`, with latency percentiles and the server's RSS before and after. Prints markdown.
Loopback only; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import openai

from videoxl.export.onnx_export import export_onnx
from videoxl.tiny import write_tiny_checkpoint
from videoxl.video import write_synthetic_video

MODEL = "video-xl-2"
QUESTIONS = ("What happens in this video?", "Which colour does the square have at the end?",
             "Does anything move?", "Describe the first seconds.")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`videoxl serve` in a subprocess; ready once /health answers."""

    def __init__(self, onnx_dir: Path, videos: Path, cache: Path, max_frames: int) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "videoxl.cli", "serve", "--onnx", str(onnx_dir), "--allow-dir", str(videos),
             "--cache", str(cache), "--port", str(self.port), "--max-frames", str(max_frames), "--max-new-tokens", "16",
             "--queue-size", "16"],
            stderr=subprocess.DEVNULL,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2).read()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("videoxl serve did not start")
                time.sleep(0.2)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=600)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def messages(video: Path, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{video}"}},
                                         {"type": "text", "text": question}]}]


def first_token_s(server: Server, video: Path, question: str) -> float:
    started = time.perf_counter()
    stream = server.client.chat.completions.create(model=MODEL, messages=messages(video, question), stream=True,
                                                   max_tokens=16, extra_body={"ignore_eos": True})
    with stream:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                return time.perf_counter() - started
    return time.perf_counter() - started  # an empty answer: the end of the stream


def load_run(server: Server, videos: list[Path], *, requests: int, clients: int, deadline_s: float) -> dict:
    latencies, errors, lock = [], [], threading.Lock()
    remaining = iter(range(requests))
    stop_at = time.monotonic() + deadline_s

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop_at:
            with lock:
                if next(remaining, None) is None:
                    return
            started = time.perf_counter()
            try:
                server.client.chat.completions.create(
                    model=MODEL, messages=messages(rng.choice(videos), rng.choice(QUESTIONS)), max_tokens=16)
            except openai.APIError as err:
                with lock:
                    errors.append(type(err).__name__)
                continue
            with lock:
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=deadline_s + 60)
    wall = time.perf_counter() - started
    cuts = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) >= 2 else [float("nan")] * 99
    return {"done": len(latencies), "errors": errors, "wall_s": wall, "p50": cuts[49], "p90": cuts[89],
            "p99": cuts[98], "max": max(latencies, default=float("nan"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--deadline-s", type=float, default=300.0, help="the load run stops here whatever is left")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = write_tiny_checkpoint(work / "checkpoint")
        onnx_dir = export_onnx(checkpoint, work / "onnx", max_frames=max(args.frames))
        videos_dir = work / "videos"
        videos_dir.mkdir()
        videos = {n: write_synthetic_video(videos_dir / f"v{n}.mp4", seconds=n, fps=1) for n in args.frames}
        cache = work / "cache"
        server = Server(onnx_dir, videos_dir, cache, max(args.frames))
        ttft = {}
        try:
            for n, video in videos.items():
                cold = first_token_s(server, video, QUESTIONS[0])
                memory = min(first_token_s(server, video, q) for q in QUESTIONS[1:])
                ttft[n] = [cold, memory]
                print(f"{n} frames: cold {cold:.2f} s, memory {memory:.3f} s", file=sys.stderr)
        finally:
            server.stop()
        server = Server(onnx_dir, videos_dir, cache, max(args.frames))  # a restart: only the disk entries are left
        try:
            for n, video in videos.items():
                ttft[n].append(first_token_s(server, video, QUESTIONS[1]))
                print(f"{n} frames: disk {ttft[n][-1]:.3f} s", file=sys.stderr)
            load_videos = [videos[min(videos)], videos[max(videos)]]
            for video in load_videos:  # into memory, so the load run measures answering, not preparing
                first_token_s(server, video, QUESTIONS[0])
            rss_before = server.rss_bytes()
            load = load_run(server, load_videos, requests=args.requests, clients=args.clients, deadline_s=args.deadline_s)
            rss_after = server.rss_bytes()
        finally:
            server.stop()

    print("Time to first token (streaming, 16 tokens at most, greedy):\n")
    print("| frames | cold s | memory s | disk s (after a restart) | cold / memory | cold / disk |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, (cold, memory, disk) in ttft.items():
        print(f"| {n} | {cold:.2f} | {memory:.3f} | {disk:.3f} | {cold / memory:.0f}x | {cold / disk:.0f}x |")
    mib = 2**20
    print(f"\nLoad: {args.requests} requests from {args.clients} clients over {len(load_videos)} prepared videos "
          f"({', '.join(str(n) for n in (min(videos), max(videos)))} frames), 16 tokens each:\n")
    print("| done | errors | wall s | requests/s | p50 s | p90 s | p99 s | max s | server RSS before MiB | after MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {load['done']} | {len(load['errors'])} | {load['wall_s']:.1f} | {load['done'] / load['wall_s']:.2f} "
          f"| {load['p50']:.3f} | {load['p90']:.3f} | {load['p99']:.3f} | {load['max']:.3f} "
          f"| {rss_before / mib:.0f} | {rss_after / mib:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
