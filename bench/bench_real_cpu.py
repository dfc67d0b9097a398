"""The real-size 8B model answers on a CPU: int4 export -> ONNX Runtime -> streamed tokens, measured.

Each step runs in its own process, niced, under a hard address-space cap (``--cap-gib``, default
20); its peak RSS comes from ``os.wait4``:

    export   videoxl export --dtype fp32 --weights int4 (external data)    wall, peak RSS, bytes per graph
    video    an H.264 .mp4 of synthetic moving content (PyAV)
    run      Pipeline on OnnxRuntimeBackend: artifact check, each session's load time and memory,
             vision s/frame, prefill tokens/s, the question pass, decode ms/token, the streamed
             tokens, peak RSS and PSS, the memory at the end (smaps_rollup)

RSS counts every resident page of every mapping, file-backed ones included (ONNX Runtime
memory-maps float initializers in external data: the 2.18 GB embedding table counts in RSS as far
as it was touched, though the page cache holds it once and the kernel may drop it). PSS divides
shared pages among the processes mapping them; ``Anonymous`` is the memory that is this process's
alone (ONNX Runtime's repacked int4 weights, activations, the KV cache).

Not part of ``make test``: with the full-size synthetic checkpoint (``python -m videoxl.synthetic``)
the export takes ~15 min and ~8.5 GB of disk, the run ~10 min on 2 cores.

    python bench/bench_real_cpu.py --checkpoint CKPT --workdir DIR [--steps export,video,run] [--frames 16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real_size import graph_bytes, run_step  # noqa: E402 (the sibling script's step runner)

GIB = 2**30
QUESTION = "What happens in this video?"


def smaps_rollup(pid: int | str = "self") -> dict[str, int]:
    """Rss, Pss, Pss_Anon, Pss_File, Anonymous, ... of a process in bytes (Linux)."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


class PeakSampler:
    """Samples smaps_rollup every ``interval`` s on a thread: the peaks of PSS and anonymous memory."""

    def __init__(self, interval: float = 0.5) -> None:
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True)
        self._thread.start()

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.sample()

    def sample(self) -> dict[str, int]:
        now = smaps_rollup()
        for key in ("Rss", "Pss", "Pss_Anon", "Pss_File", "Anonymous"):
            self.peak[key] = max(self.peak.get(key, 0), now.get(key, 0))
        return now

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        self.sample()
        return self.peak


def memory_summary(m: dict[str, int]) -> dict[str, float]:
    return {f"{k.lower()}_gib": round(m.get(k, 0) / GIB, 3) for k in ("Rss", "Pss", "Pss_Anon", "Pss_File", "Anonymous")}


def run_worker(args) -> int:
    """The answer, end to end, in this process (started by ``main`` under the cap)."""
    import numpy as np
    import onnxruntime as ort

    from videoxl.runtime.artifacts import load_onnx_artifacts
    from videoxl.runtime.ort_backend import OnnxRuntimeBackend
    from videoxl.runtime.pipeline import InferenceOptions, Pipeline
    from videoxl.sampling import GenerationConfig
    from videoxl.text import load_tokenizer
    from videoxl.runtime.prepared_cache import sampling_settings
    from videoxl.video import open_video

    result: dict = {"memory": {"start": memory_summary(smaps_rollup())}, "loadavg_start": Path("/proc/loadavg").read_text().split()[:3]}
    sampler = PeakSampler()

    def save() -> None:
        Path(args.result).write_text(json.dumps(result, indent=2) + "\n")

    started = time.perf_counter()
    artifacts = load_onnx_artifacts(args.onnx)  # first use hashes every file once (then stamped)
    result["artifact_check_s"] = round(time.perf_counter() - started, 2)

    sessions: dict[str, dict] = {}
    real_session = ort.InferenceSession

    def measured_session(path, *a, **k):  # each session's load time and what it adds to memory
        before, t0 = smaps_rollup(), time.perf_counter()
        session = real_session(path, *a, **k)
        after = smaps_rollup()
        sessions[Path(path).stem] = {
            "load_s": round(time.perf_counter() - t0, 2),
            **{f"added_{k.lower()}_gib": round((after.get(k, 0) - before.get(k, 0)) / GIB, 3) for k in ("Rss", "Pss", "Anonymous")},
        }
        print(f"loaded {Path(path).name}: {sessions[Path(path).stem]}", file=sys.stderr, flush=True)
        return session

    ort.InferenceSession = measured_session
    started = time.perf_counter()
    backend = OnnxRuntimeBackend(artifacts, threads=args.threads, matmul_accuracy_level=args.accuracy_level,
                                 share_llm_session=not args.separate_decode)
    result["backend_load_s"] = round(time.perf_counter() - started, 2)
    result["sessions"] = sessions
    result["memory"]["after_load"] = memory_summary(sampler.sample())
    save()

    calls: dict[str, list] = {"encode_frames": [], "prefill_chunk": [], "decode": [], "score": []}

    def timed(name, count):
        method = getattr(backend, name)

        def call(*a, **k):
            t0, cpu0 = time.perf_counter(), time.process_time()
            out = method(*a, **k)
            calls[name].append((count(*a, **k), time.perf_counter() - t0, time.process_time() - cpu0))
            return out

        setattr(backend, name, call)

    timed("encode_frames", lambda pixels: len(pixels))
    timed("prefill_chunk", lambda cache, ids, visual, vis: vis.end - vis.start)
    timed("decode", lambda cache, ids: len(ids))
    timed("score", lambda cache, ids: len(ids))

    pipeline = Pipeline(backend, load_tokenizer(args.onnx))
    video = open_video(args.video, **sampling_settings(backend, fps=None, max_frames=args.frames))
    options = InferenceOptions(dense_blocks=args.dense_blocks, block_groups=args.block_groups)
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens)
    started = time.perf_counter()
    prepared = pipeline.prepare(video, options=options, max_new_tokens=gen.max_new_tokens)
    result["prepare_s"] = round(time.perf_counter() - started, 2)
    result["memory"]["after_prefill"] = memory_summary(sampler.sample())
    pieces: list[str] = []

    def on_text(text: str) -> None:
        pieces.append(text)
        print(text, end="", flush=True)

    print(f"Q: {QUESTION}\nA: ", end="", flush=True)
    started = time.perf_counter()
    answer = pipeline.ask(prepared, QUESTION, gen=gen, on_text=on_text)
    result["answer_s"] = round(time.perf_counter() - started, 2)
    print(flush=True)
    peak = sampler.stop()
    report = answer.report
    def totals(name: str, skip: int = 0) -> tuple[int, float, float]:
        rows = calls[name][skip:]
        return sum(r[0] for r in rows), sum(r[1] for r in rows), sum(r[2] for r in rows)

    # cores: CPU seconds of all this process's threads per wall second (2 = both cores, undisturbed)
    frames, vision_s, vision_cpu = totals("encode_frames")
    prefill_tokens, prefill_s, prefill_cpu = totals("prefill_chunk")
    question_tokens, question_s, question_cpu = calls["decode"][0]
    steps = [s for _, s, _ in calls["decode"][1:]]
    _, decode_s, decode_cpu = totals("decode", skip=1)
    result.update({
        "frames": report.frames, "groups": report.groups, "prompt_tokens": report.prompt_tokens, "chunks": report.chunks,
        "vision": {"frames_encoded": frames, "seconds": round(vision_s, 2), "s_per_frame": round(vision_s / frames, 2),
                   "cores": round(vision_cpu / vision_s, 2), "calls": [(n, round(s, 2)) for n, s, _ in calls["encode_frames"]]},
        "prefill": {"tokens": prefill_tokens, "seconds": round(prefill_s, 2), "tokens_per_s": round(prefill_tokens / prefill_s, 1),
                    "cores": round(prefill_cpu / prefill_s, 2), "calls": [(n, round(s, 2)) for n, s, _ in calls["prefill_chunk"]]},
        "question_pass": {"tokens": question_tokens, "seconds": round(question_s, 2), "cores": round(question_cpu / question_s, 2)},
        "decode": {"tokens": len(steps), "ms_per_token": round(1e3 * sum(steps) / max(len(steps), 1), 1),
                   "ms_per_token_median": round(1e3 * float(np.median(steps)), 1) if steps else None,
                   "cores": round(decode_cpu / decode_s, 2) if steps else None},
        "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
        "score": {"calls": len(calls["score"]), "seconds": round(sum(r[1] for r in calls["score"]), 2)},
        "dense_blocks": report.dense_blocks, "num_blocks": report.num_blocks,
        "first_token_s": round(report.first_token_s, 2) if report.first_token_s is not None else None,
        "answer_text": answer.text, "answer_token_ids": answer.token_ids, "streamed": pieces,
        "vm_hwm_gib": round(vm_hwm() / GIB, 3),
    })
    result["memory"]["end"] = memory_summary(smaps_rollup())
    result["memory"]["peak_sampled"] = memory_summary(peak)
    save()
    print("\n".join(report.lines()), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="full-size checkpoint (the export step)")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--steps", default="export,video,run")
    parser.add_argument("--cap-gib", type=float, default=20.0)
    parser.add_argument("--frames", type=int, default=16, help="frames sampled from the video (8-16)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--accuracy-level", type=int, default=None, help="MatMulNBits accuracy level (default: ONNX Runtime's, 4)")
    parser.add_argument("--separate-decode", action="store_true", help="decode on decode.onnx's own session (one more LLM weight copy)")
    parser.add_argument("--block-groups", type=int, default=None,
                        help="groups per bi-level block (default: the config's); 1 with --dense-blocks 1 makes 16 frames choose a block")
    parser.add_argument("--dense-blocks", type=int, default=4, help="top-k blocks chosen by the question (default 4)")
    parser.add_argument("--worker", choices=["run"], help=argparse.SUPPRESS)
    parser.add_argument("--onnx", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--video", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker == "run":
        return run_worker(args)

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    steps = set(args.steps.split(","))
    onnx_dir, video = work / "onnx_int4_fp32", work / "moving_h264.mp4"
    results_path = work / "results_cpu.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=2) + "\n")

    py = sys.executable
    if "export" in steps:
        if args.checkpoint is None:
            parser.error("the export step needs --checkpoint")
        step = run_step("export int4 fp32", [py, "-m", "videoxl.cli", "-v", "export", "--checkpoint", str(args.checkpoint),
                                             "--out", str(onnx_dir), "--dtype", "fp32", "--weights", "int4"],
                        cap_gib=args.cap_gib, log_path=work / "export_int4_fp32.log")
        if step["exit"] == 0:
            step["graphs"] = graph_bytes(onnx_dir)
            step["files"] = {p.name: p.stat().st_size for p in sorted(onnx_dir.iterdir()) if p.is_file()}
        results["export"] = step
        save()
    if "video" in steps:
        from videoxl.video import write_synthetic_video

        # 20 s of moving synthetic content, 640x360 at 24 fps, H.264: sampled at 1 fps, then 16 by linspace
        write_synthetic_video(video, seconds=20, fps=24, width=640, height=360, codec="libx264")
        results["video"] = {"file": video.name, "bytes": video.stat().st_size, "seconds": 20, "fps": 24, "size": "640x360", "codec": "h264"}
        save()
    if "run" in steps:
        result_file = work / "run_result.json"
        result_file.unlink(missing_ok=True)
        step = run_step("run", [py, str(Path(__file__).resolve()), "--workdir", str(work), "--worker", "run", "--onnx", str(onnx_dir),
                                "--video", str(video), "--result", str(result_file), "--frames", str(args.frames),
                                "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads),
                                *(["--accuracy-level", str(args.accuracy_level)] if args.accuracy_level is not None else []),
                                *(["--separate-decode"] if args.separate_decode else []),
                                *(["--block-groups", str(args.block_groups)] if args.block_groups else []),
                                "--dense-blocks", str(args.dense_blocks)],
                        cap_gib=args.cap_gib, log_path=work / "run.log")
        if result_file.is_file():
            step["result"] = json.loads(result_file.read_text())
        step["separate_decode"] = args.separate_decode
        scored = args.block_groups is not None or args.dense_blocks != 4
        results["run_separate_decode" if args.separate_decode else "run_scored" if scored else "run"] = step
        save()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
