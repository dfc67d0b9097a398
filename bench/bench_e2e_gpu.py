"""Video-XL-2 end to end on one GPU with random weights: vision, prefill, block selection, decode.

    python bench/bench_e2e_gpu.py [--frames 512 2048] [--budget-s 170] [--json F] [--markdown F]
    python bench/bench_e2e_gpu.py --dry-run [--library LIB]   # CPU: a tiny random model, same code
    python bench/bench_e2e_gpu.py --dry-run --real-widths --library LIB
                                  # CPU: every real width (head_dim 128, 28/4 heads, 384-px SigLIP,
                                  # vocabulary 152064), one LLM and two vision layers

The full-size model (SigLIP-SO400M 26 of 27 layers, the DTS compressor, the projector,
Qwen2.5-7B: 28 layers, hidden 3584, 28/4 heads, MLP 18944, vocabulary 152064) is built from
`VideoXLConfig()` directly on the device in bf16 with PyTorch's default random init: no
checkpoint, and nothing larger than the weights ever exists. Frames are random pixels (one
batch generated once and fed again: the content does not change the work); the prompt comes
from the byte-level test tokenizer (ids are valid in the 152064 vocabulary; ~3% more timestamp
tokens per group than Qwen's tokenizer gives).

The runtime loop (`Pipeline` over `TorchBackend`, our kernels, decode steps replayed as CUDA
graphs) is timed phase by phase, each phase ending on a device synchronisation:
  vision     backend.encode_frames over every frame (extrapolated from the first batches when
             the time box requires it; the report says so)
  prefill    the chunked sparse prefill (evaluation rule, C=4, P=3): our chunk attention kernel
  selection  block scoring (block-score kernel) and the bi-level decode cache (gather kernel)
  decode     ms per answer token over the replayed steps; vs the floor (LLM weights + the decode
             cache, read once per token) / HBM bandwidth measured by a device copy in the same run
Two comparison prefills of the same prompt, over the whole sequence layer by layer (no KV kept):
  dense SDPA       plain causal attention, SDPA (flash)
  official mask    SDPA with the dense boolean block-sparse mask of the evaluation rule, what the
                   official code computes (it builds an L x L mask); here the queries go chunk by
                   chunk against keys [0, chunk end), so memory stays bounded and the pairs above
                   the diagonal are skipped (a favourable version of the official cost)
Everything is time-boxed (--budget-s); a frame count or comparison that would not fit is skipped
with the reason recorded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

FULL_FRAMES = [512, 2048]
DRY_FRAMES = [8, 16]  # 16 frames: 5 blocks, so top-1 block scoring runs
REAL_WIDTH_FRAMES = [8]  # the emulated kernels at head_dim 128 take minutes on 2 cores


def sync(torch, device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build_model(torch, cfg, dtype, device: str):
    """VideoXLModel with random init, made directly on `device` in `dtype` (no fp32 copy, no host copy)."""
    from videoxl.export.model import VideoXLModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = VideoXLModel(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def llm_decode_bytes(model) -> int:
    """Weight bytes one decode step reads: every LLM layer, the final norm and the LM head (one embedding row)."""
    body = model.model
    modules = [*body.layers, body.norm, model.lm_head]
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def copy_bandwidth(torch, device: str, nbytes: int) -> float:
    """Bytes per second of a device-to-device copy (read + write counted)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(torch, device)
    iters = 10
    t0 = time.perf_counter()
    for _ in range(iters):
        b.copy_(a)
    sync(torch, device)
    return 2 * nbytes * iters / (time.perf_counter() - t0)


def make_layout(tokenizer, cfg, frames: int, question: str):
    from videoxl.text import build_prompt

    groups = -(-frames // cfg.frames_per_group)
    layout, _ = build_prompt(tokenizer, question, [4.0 * g for g in range(groups)], tokens_per_group=cfg.tokens_per_group)
    return layout


def run_vision(torch, backend, cfg, frames: int, batch: int, budget_s: float, device: str) -> tuple[np.ndarray, dict]:
    """(G, 144, H) embeddings of `frames` random frames; extrapolated past `budget_s`."""
    rng = np.random.default_rng(0)
    pixels = rng.uniform(-1, 1, (batch, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
    groups = -(-frames // cfg.frames_per_group)
    embeds, done = [], 0
    sync(torch, device)
    t0 = time.perf_counter()
    while done < frames:
        n = min(batch, frames - done)
        embeds.append(backend.encode_frames(pixels[: -(-n // 4) * 4]))
        done += n
        if time.perf_counter() - t0 > budget_s and done < frames:
            break
    sync(torch, device)
    seconds = time.perf_counter() - t0
    out = np.concatenate(embeds)
    info = {"vision_s": seconds * frames / done, "vision_frames_run": done, "vision_extrapolated": done < frames}
    if len(out) < groups:  # the rest of the groups repeat the computed ones: the LLM's work does not depend on them
        out = np.concatenate([out] * (-(-groups // len(out))))[:groups]
    return out, info


def whole_sequence_prefill(torch, backend, layout, visual: np.ndarray, *, masks: list | None) -> float:
    """Seconds for the prompt through every layer at once (no KV kept): causal SDPA, or SDPA with
    the per-chunk boolean masks `masks` [(start, end, mask (end - start, end))]."""
    import torch.nn.functional as F

    device = backend.device

    def attention(layer: int, query, key, value):
        q, k, v = (x.transpose(0, 1)[None] for x in (query, key, value))  # (1, H, L, D)
        if masks is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=backend.scale, enable_gqa=True)[0].transpose(0, 1)
        # KV heads repeated for the query heads, as the official eager code does (repeat_kv), so
        # SDPA may take its memory-efficient kernel, which reads a boolean mask
        groups = query.shape[1] // key.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = torch.empty_like(query)
        for start, end, mask in masks:
            o = F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end], attn_mask=mask, scale=backend.scale)
            out[start:end] = o[0].transpose(0, 1)
        return out

    with torch.no_grad():
        ids = torch.from_numpy(layout.input_ids[: layout.suffix_start]).to(device)
        flat = visual.reshape(-1, visual.shape[-1])
        sync(torch, device.type)
        t0 = time.perf_counter()
        embeds = backend.model.embed(ids, backend._t(flat), image_token_id=backend.image_token_id)
        backend.forward(embeds, torch.arange(len(ids), device=device), attention)
        sync(torch, device.type)
    return time.perf_counter() - t0


def official_masks(torch, layout, options, cfg, device):
    """Per prefill chunk (and the prefix) the dense boolean mask rows of the evaluation rule, on the device."""
    from videoxl.layout import chunk_visibility, num_chunks, prefix_visibility

    pieces = [prefix_visibility(layout)] + [
        chunk_visibility(layout, k, chunk_groups=options.chunk_groups or cfg.chunk_groups,
                         window_chunks=cfg.window_chunks if options.window_chunks is None else options.window_chunks)
        for k in range(num_chunks(layout, options.chunk_groups or cfg.chunk_groups))
    ]
    masks = []
    for vis in pieces:
        q = vis.end - vis.start
        mask = torch.zeros(q, vis.end, dtype=torch.bool, device=device)
        mask[:, torch.from_numpy(vis.visible_past_index).to(device)] = True
        mask[torch.from_numpy(vis.timestamp_query_index).to(device), : vis.start] = True
        mask[:, vis.start :] = torch.ones(q, q, dtype=torch.bool, device=device).tril()
        masks.append((vis.start, vis.end, mask))
    return masks


def run_frames(torch, backend, pipeline, tokenizer, cfg, frames: int, *, args, device: str, deadline: float, floor_info: dict) -> dict:
    from videoxl.runtime.pipeline import InferenceOptions
    from videoxl.sampling import GenerationConfig

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    layout = make_layout(tokenizer, cfg, frames, "What happens in the video?")
    row: dict = {"frames": frames, "groups": layout.num_groups, "prompt_tokens": layout.num_tokens}
    left = deadline - time.perf_counter()
    visual, info = run_vision(torch, backend, cfg, frames, args.frame_batch, min(args.vision_budget_s, left / 4), device)
    row.update(info)

    options = InferenceOptions(dense_blocks=args.dense_blocks)
    sync(torch, device)
    t0 = time.perf_counter()
    store = pipeline.prefill(layout, visual, options)
    sync(torch, device)
    row["prefill_s"] = time.perf_counter() - t0

    suffix = layout.input_ids[layout.suffix_start :]
    gen = GenerationConfig(max_new_tokens=args.new_tokens, stop_at_eos=False)
    t0 = time.perf_counter()
    dense_blocks, scores = pipeline.choose_dense_blocks(store, layout, options)
    cache, _ = store.build_decode_cache(dense_blocks, extra_capacity=len(suffix) + gen.max_new_tokens)
    sync(torch, device)
    row["selection_s"] = time.perf_counter() - t0
    row["blocks"], row["dense_blocks"], row["decode_cache_rows"] = len(store.blocks), len(dense_blocks), cache.length
    row["scored"] = scores is not None

    step_s: list[tuple[int, float]] = []
    decode = backend.decode

    def timed_decode(c, ids):
        t = time.perf_counter()
        logits = decode(c, ids)  # returns host logits: the step has finished
        step_s.append((len(ids), time.perf_counter() - t))
        return logits

    backend.decode = timed_decode
    replays_before = backend.decode_counts["replayed"]
    try:
        pipeline.decode(cache, suffix, gen)
    finally:
        backend.decode = decode
    single = [s for t, s in step_s if t == 1]
    steady = single[2:] or single  # after the first step (plain) and its capture
    row["question_pass_ms"] = 1e3 * step_s[0][1]
    row["decode_ms_per_token"] = 1e3 * statistics.median(steady)
    row["decode_steps_replayed"] = backend.decode_counts["replayed"] - replays_before
    floor_bytes = floor_info["llm_decode_weight_bytes"] + kv_bytes_of(cfg, cache.length, backend)
    row["decode_floor_ms"] = 1e3 * floor_bytes / floor_info["copy_bandwidth_bytes_per_s"]
    row["decode_vs_floor"] = row["decode_floor_ms"] / row["decode_ms_per_token"]
    del cache

    # the comparison prefills: the same prompt over the whole sequence (store freed first)
    del store
    if device == "cuda":
        torch.cuda.empty_cache()
    for name, key in (("dense SDPA (causal)", "dense_sdpa_prefill_s"), ("official mask (SDPA + dense mask)", "mask_prefill_s")):
        left = deadline - time.perf_counter()
        estimate = {"dense_sdpa_prefill_s": 1.5, "mask_prefill_s": 6.0}[key] * row["prefill_s"] * (frames / 512 if not args.dry_run else 1)
        if left < estimate:
            row[key] = None
            row.setdefault("skipped", []).append(f"{name}: {left:.0f} s left of the time box, estimated {estimate:.0f} s")
            continue
        masks = official_masks(torch, layout, options, cfg, backend.device) if key == "mask_prefill_s" else None
        row[key] = whole_sequence_prefill(torch, backend, layout, visual, masks=masks)
        del masks
    row["peak_device_bytes"] = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return row


def kv_bytes_of(cfg, rows: int, backend) -> int:
    from videoxl.graphs import kv_bytes

    return kv_bytes(cfg, rows, backend.model.lm_head.weight.element_size())


def markdown(report: dict) -> str:
    gib = 2**-30
    lines = [f"Device: {report['device']}, {report['dtype']}, torch {report['torch']}; kernels {report['kernels']}, "
             f"decode CUDA graphs {report['cuda_graphs']}. Model built on the device in {report['build_s']:.1f} s, "
             f"weights {report['weight_bytes'] * gib:.1f} GiB; copy bandwidth {report['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s.",
             "",
             "| frames | tokens | vision s | prefill s | dense SDPA s | official mask s | selection s | decode ms/token | floor ms | vs floor | peak GiB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def num(value, fmt):
        return "skipped" if value is None else format(value, fmt)

    for r in report["runs"]:
        vision = num(r["vision_s"], ".2f") + (f" (extrapolated from {r['vision_frames_run']})" if r["vision_extrapolated"] else "")
        peak = "-" if r["peak_device_bytes"] is None else f"{r['peak_device_bytes'] * gib:.1f}"
        lines.append(
            f"| {r['frames']} | {r['prompt_tokens']} | {vision} | {r['prefill_s']:.2f} | {num(r['dense_sdpa_prefill_s'], '.2f')} | "
            f"{num(r['mask_prefill_s'], '.2f')} | {r['selection_s']:.3f} | {r['decode_ms_per_token']:.2f} | {r['decode_floor_ms']:.2f} | "
            f"{r['decode_vs_floor']:.0%} | {peak} |"
        )
    for r in report["runs"]:
        for reason in r.get("skipped", []):
            lines.append(f"- {r['frames']} frames: skipped {reason}")
    for reason in report.get("skipped", []):
        lines.append(f"- skipped {reason}")
    return "\n".join(lines) + "\n"


def dry_config():
    from videoxl.config import VideoXLConfig

    # head_dim 64 (the tensor-core kernel's smallest), 2:1 GQA, one LLM layer, a 64-wide vision tower;
    # one group per chunk and per block, so that 16 frames make 5 blocks and block scoring runs
    return VideoXLConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         vocab_size=320, vision_hidden_size=64, vision_intermediate_size=128, vision_num_heads=2, vision_num_layers=2,
                         chunk_groups=1, window_chunks=1, block_groups=1)


def real_width_config():
    from videoxl.config import VideoXLConfig

    # the full-size widths with the fewest layers the config allows (the vision tower's select
    # layer is its second to last): the shapes a GPU run meets, at a CPU's cost; one group per
    # chunk and per block, as in dry_config, so that a few frames make blocks to score
    return VideoXLConfig(num_hidden_layers=1, vision_num_layers=2, chunk_groups=1, window_chunks=1, block_groups=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=None, help=f"frame counts (default {FULL_FRAMES})")
    parser.add_argument("--budget-s", type=float, default=170.0, help="time box of the whole run, model build included")
    parser.add_argument("--vision-budget-s", type=float, default=20.0, help="vision time per frame count before extrapolating")
    parser.add_argument("--frame-batch", type=int, default=32, help="frames per vision call (a multiple of 4)")
    parser.add_argument("--new-tokens", type=int, default=32, help="answer tokens decoded per run")
    parser.add_argument("--dense-blocks", type=int, default=4, help="top-k blocks reloaded dense")
    parser.add_argument("--no-kernels", action="store_true", help="plain torch attention, gather and scoring")
    parser.add_argument("--dry-run", action="store_true", help="CPU, a tiny random model (emulated kernels with --library)")
    parser.add_argument("--real-widths", action="store_true", help="with --dry-run: the real widths, 1 LLM and 2 vision layers")
    parser.add_argument("--library", type=Path, help="kernel library to load (a host build with --dry-run)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    deadline = started + args.budget_s
    try:
        import torch
    except ImportError:
        print("bench_e2e_gpu: torch is not installed", file=sys.stderr)
        return 2
    from videoxl.config import VideoXLConfig
    from videoxl.export.torch_backend import TorchBackend
    from videoxl.plugins import kernels
    from videoxl.runtime.pipeline import Pipeline
    from videoxl.tiny import tiny_tokenizer

    use_kernels = not args.no_kernels
    if args.dry_run:
        device, dtype, cfg = "cpu", torch.float32, real_width_config() if args.real_widths else dry_config()
        frames = args.frames or (REAL_WIDTH_FRAMES if args.real_widths else DRY_FRAMES)
        if args.library is not None and use_kernels:
            kernels.use_library(args.library, host_memory=True)
            dtype = torch.float16  # the emulated tensor-core kernel, as bf16/fp16 runs on the GPU
        else:
            use_kernels = False
        args.frame_batch, args.new_tokens, args.dense_blocks = 4, min(args.new_tokens, 6), 1
    else:
        if not torch.cuda.is_available():
            print("bench_e2e_gpu: no CUDA GPU visible (torch.cuda.is_available() is False)", file=sys.stderr)
            return 2
        device, dtype, cfg = "cuda", torch.bfloat16, VideoXLConfig()
        frames = args.frames or FULL_FRAMES
        if args.library is not None:
            kernels.use_library(args.library)
    if args.real_widths and not args.dry_run:
        parser.error("--real-widths is a CPU check: use it with --dry-run")
    if args.frame_batch % 4:
        parser.error("--frame-batch must be a multiple of 4")

    t0 = time.perf_counter()
    model = build_model(torch, cfg, dtype, device)
    sync(torch, device)
    build_s = time.perf_counter() - t0
    tokenizer = tiny_tokenizer()
    backend = TorchBackend(model=model, tokenizer=tokenizer, device=device, kernels=use_kernels)
    pipeline = Pipeline(backend, tokenizer)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(torch, device, (2 << 30) if device == "cuda" else (64 << 20))
    floor_info = {"llm_decode_weight_bytes": llm_decode_bytes(model), "copy_bandwidth_bytes_per_s": bandwidth}
    report = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run" + (", emulated kernels)" if use_kernels else ", plain torch)"),
        "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__, "dry_run": args.dry_run,
        "kernels": "on" if backend.kernels is not None else "off", "cuda_graphs": "on" if backend.graph_factory else "off",
        "build_s": build_s, "weight_bytes": weight_bytes, "copy_bandwidth_bytes_per_s": bandwidth, **floor_info,
        "runs": [], "skipped": [],
    }
    previous: tuple[int, float] | None = None
    for count in frames:
        left = deadline - time.perf_counter()
        if previous is not None and not args.dry_run:
            # prefill grows faster than linearly (timestamp queries read the whole past): 1.5x the linear estimate
            estimate = previous[1] * count / previous[0] * 1.5
            if estimate > left:
                report["skipped"].append(f"{count} frames: {previous[0]} frames took {previous[1]:.0f} s, "
                                         f"estimated {estimate:.0f} s with {left:.0f} s left of the time box")
                continue
        print(f"{count} frames ...", flush=True)
        t0 = time.perf_counter()
        report["runs"].append(run_frames(torch, backend, pipeline, tokenizer, cfg, count, args=args, device=device,
                                         deadline=deadline, floor_info=floor_info))
        previous = (count, time.perf_counter() - t0)
        write(report, args, started)  # after every frame count: a run killed by an outer timeout keeps what it measured
    print(write(report, args, started))
    return 0


def write(report: dict, args, started: float) -> str:
    report["total_s"] = time.perf_counter() - started
    text = markdown(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(text)
    return text


if __name__ == "__main__":
    sys.exit(main())
