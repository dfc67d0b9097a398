"""Attention throughput of one prefill chunk: our kernels vs PyTorch SDPA on the same pairs.

    python bench/bench_attention_gpu.py [--pasts 2000 20000 80000] [--json F] [--markdown F]
    python bench/bench_attention_gpu.py --dry-run --library LIB   # CPU: tiny shapes, a host build

Video-XL-2 shapes: 28 query heads, 4 KV heads, head_dim 128, bf16; a chunk of 611 queries
(4 groups of 149 tokens + 15, an odd size) with 24 timestamp queries, at the end of a past
of 2k / 20k / 80k keys; visual queries see the 14-token prefix, every earlier timestamp
token (5 per 149-token group) and a window of 3 chunks; timestamp queries see the whole past.

Rows of the table (time per chunk, TFLOP/s = 4 * head_dim * Hq * visible pairs / time, the
same useful work for every row):
  ours mma / ours simt    videoxl_chunk_attention_mma / _simt (the past read in place)
  sdpa flash (+gather)    SDPA's flash backend on the same pairs: the visible past gathered
                          and concatenated with the chunk (timed in "+gather", excluded in the
                          other row), lower-right causal; timestamp queries in a second call
                          over the whole past + chunk (non-causal: at most 24 x 611 extra pairs)
  sdpa mask (official)    what the official code does: SDPA with the dense boolean mask
                          over the whole past + chunk (every pair computed, the useful ones counted)
  matmul ceiling          a bf16 GEMM measured in the same run
`max |ours - sdpa|` compares outputs on the same inputs for chunks without timestamp queries,
where both compute exactly the same pairs (a cheap cross-check; the numerics against the
float64 reference are the GPU tests in tests/plugins/test_kernels.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 28, 4, 128
GROUP_TOKENS, STAMP_TOKENS, PREFIX_TOKENS, CHUNK_TOKENS = 149, 5, 14, 596
WINDOW_CHUNKS = 3


def chunk_indices(past_len: int, num_queries: int, num_ts: int, rng: np.random.Generator):
    """visible_past_index, timestamp_query_index of a chunk at the end of `past_len` keys."""
    window_start = max(PREFIX_TOKENS, past_len - WINDOW_CHUNKS * CHUNK_TOKENS)
    groups = (window_start - PREFIX_TOKENS) // GROUP_TOKENS
    stamps = [PREFIX_TOKENS + g * GROUP_TOKENS + t for g in range(groups) for t in range(STAMP_TOKENS)]
    visible = np.concatenate([
        np.arange(PREFIX_TOKENS), np.array(stamps, dtype=np.int64), np.arange(window_start, past_len),
    ]).astype(np.int64)
    ts = np.sort(rng.choice(num_queries, size=num_ts, replace=False)).astype(np.int64)
    return visible, ts


def visible_pairs(past_len: int, num_queries: int, visible: np.ndarray, ts: np.ndarray) -> int:
    """(query, key) pairs the op computes, per query head."""
    causal = num_queries * (num_queries + 1) // 2
    return causal + len(ts) * past_len + (num_queries - len(ts)) * len(visible)


def timed(torch, fn, *, iters: int, device: str, budget_s: float = 20.0) -> float:
    """Mean seconds per call (CUDA events on the GPU, wall clock on the CPU)."""
    fn()  # warm-up (and kernel attribute setup)
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        iters = max(1, min(iters, int(budget_s / max(time.perf_counter() - t0, 1e-6))))
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def matmul_ceiling(torch, device: str, n: int, iters: int) -> float:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    return 2 * n**3 / timed(torch, lambda: a @ b, iters=iters, device=device) / 1e12


def run_case(torch, kernels, *, past_len: int, num_queries: int, num_ts: int, heads: tuple[int, int, int],
             dtype, device: str, iters: int, variants: list[str], rng: np.random.Generator) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    hq, hkv, d = heads
    group = hq // hkv
    scale = d**-0.5
    q = torch.randn(num_queries, hq, d, device=device).to(dtype)
    k, v = (torch.randn(num_queries, hkv, d, device=device).to(dtype) for _ in range(2))
    past_k, past_v = (torch.randn(past_len + 64, hkv, d, device=device).to(dtype) for _ in range(2))
    visible_np, ts_np = chunk_indices(past_len, num_queries, num_ts, rng)
    visible = torch.as_tensor(visible_np, device=device)
    ts = torch.as_tensor(ts_np, device=device)
    length = torch.tensor([past_len], dtype=torch.int64, device=device)
    pairs = visible_pairs(past_len, num_queries, visible_np, ts_np)
    flops = 4 * d * hq * pairs
    result = {"past_len": past_len, "queries": num_queries, "timestamp_queries": num_ts, "visible_past": len(visible_np),
              "visible_pairs_per_head": pairs, "gflop": flops / 1e9, "rows": {}}

    def record(name: str, fn, *, note: str = "") -> None:
        try:
            seconds = timed(torch, fn, iters=iters, device=device)
            result["rows"][name] = {"ms": seconds * 1e3, "tflops": flops / seconds / 1e12, "note": note}
        except Exception as err:  # a failed row is recorded, the others still run
            result["rows"][name] = {"error": f"{type(err).__name__}: {err}"[:300]}

    outputs = {}
    for variant in variants:
        size = kernels.chunk_attention_workspace_bytes(
            num_queries=num_queries, past_capacity=past_k.shape[0], num_visible=len(visible_np),
            num_timestamp_queries=num_ts, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, dtype=kernels._torch_dtype(q),
        )
        workspace = torch.empty(max(size, 1), dtype=torch.uint8, device=device)
        out = torch.empty_like(q)

        def ours(variant=variant, workspace=workspace, out=out):
            kernels.chunk_attention_torch(q, k, v, past_k, past_v, past_len=length, visible_past_index=visible,
                                          timestamp_query_index=ts, scale=scale, out=out, workspace=workspace,
                                          variant=variant)

        record(f"ours {variant}", ours, note=f"workspace {size / 2**20:.1f} MiB")
        if "error" not in result["rows"][f"ours {variant}"]:
            outputs[variant] = out

    # SDPA on the same pairs: (1, H, L, D) views of gathered keys
    is_ts = torch.zeros(num_queries, dtype=torch.bool, device=device)
    is_ts[ts] = True
    other = torch.nonzero(~is_ts).flatten()
    backend = [SDPBackend.FLASH_ATTENTION] if device == "cuda" else [SDPBackend.MATH]
    sdpa_out = torch.empty_like(q)

    def heads_first(x):  # (L, H, D) -> (1, H, L, D), KV heads repeated for the query heads
        return x.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0)

    gathered = {}

    def gather():
        gathered["k_vis"] = heads_first(torch.cat([past_k.index_select(0, visible), k]))
        gathered["v_vis"] = heads_first(torch.cat([past_v.index_select(0, visible), v]))
        gathered["k_all"] = heads_first(torch.cat([past_k[:past_len], k]))
        gathered["v_all"] = heads_first(torch.cat([past_v[:past_len], v]))
        gathered["q_other"] = q.index_select(0, other).transpose(0, 1).unsqueeze(0)
        gathered["q_ts"] = q.index_select(0, ts).transpose(0, 1).unsqueeze(0)

    def attend():
        g = gathered
        with sdpa_kernel(backend):
            # non-timestamp queries: lower-right causal over [visible past][chunk]; the chunk
            # rows of timestamp queries are skipped, so the causal diagonal is approximate by
            # at most Tq keys per query (same pair count within 0.1%)
            bias = causal_lower_right(g["q_other"].shape[2], g["k_vis"].shape[2])
            o = sdpa(g["q_other"], g["k_vis"], g["v_vis"], attn_mask=bias, scale=scale)
            sdpa_out[other] = o[0].transpose(0, 1)
            if num_ts:
                o = sdpa(g["q_ts"], g["k_all"], g["v_all"], scale=scale)
                sdpa_out[ts] = o[0].transpose(0, 1)

    gather()
    name = "sdpa flash" if device == "cuda" else "sdpa math (cpu)"
    record(name, attend, note="gathered keys ready")
    record(f"{name} + gather", lambda: (gather(), attend()), note="gather of the visible past included")

    def masked():
        keys = torch.cat([past_k[:past_len], k]).transpose(0, 1).unsqueeze(0)
        values = torch.cat([past_v[:past_len], v]).transpose(0, 1).unsqueeze(0)
        mask = torch.zeros(num_queries, past_len + num_queries, dtype=torch.bool, device=device)
        mask[:, visible] = True
        mask[ts, :past_len] = True
        mask[:, past_len:] = torch.ones(num_queries, num_queries, dtype=torch.bool, device=device).tril()
        return sdpa(q.transpose(0, 1).unsqueeze(0), keys.repeat_interleave(group, dim=1),
                    values.repeat_interleave(group, dim=1), attn_mask=mask, scale=scale)

    record("sdpa mask (official)", masked, note="dense block-sparse mask, every pair computed")
    result["dense_pairs_per_head"] = num_queries * (past_len + num_queries)
    # With timestamp queries the SDPA rows approximate the causal diagonal (see above), so the
    # outputs are compared only where the pairs are exactly the same: chunks without them.
    if num_ts == 0 and "error" not in result["rows"][name]:
        attend()
        for variant, out in outputs.items():
            result["rows"][f"ours {variant}"]["max_abs_diff_vs_sdpa"] = float((out.float() - sdpa_out.float()).abs().max())
    return result


def markdown(report: dict) -> str:
    lines = [f"device: {report['device']}; dtype {report['dtype']}; heads {report['heads']}; "
             f"matmul ceiling {report['matmul_ceiling_tflops']:.1f} TFLOP/s", ""]
    lines.append("| past | queries (ts) | row | ms | TFLOP/s | % of matmul | vs sdpa flash | note |")
    lines.append("|---:|---:|---|---:|---:|---:|---:|---|")
    for case in report["cases"]:
        flash = next((r for n, r in case["rows"].items() if n.startswith("sdpa") and "gather" not in n and "mask" not in n), {})
        for name, row in case["rows"].items():
            if "error" in row:
                lines.append(f"| {case['past_len']} | {case['queries']} ({case['timestamp_queries']}) | {name} | – | – | – | – | {row['error']} |")
                continue
            ratio = f"{row['tflops'] / flash['tflops']:.2f}x" if flash.get("tflops") else "–"
            note = row.get("note", "")
            if "max_abs_diff_vs_sdpa" in row:
                note += f"; max |ours - sdpa| {row['max_abs_diff_vs_sdpa']:.2e}"
            lines.append(
                f"| {case['past_len']} | {case['queries']} ({case['timestamp_queries']}) | {name} | {row['ms']:.3f} | "
                f"{row['tflops']:.1f} | {100 * row['tflops'] / report['matmul_ceiling_tflops']:.0f}% | {ratio} | {note} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pasts", type=int, nargs="+", default=[2000, 20000, 80000])
    parser.add_argument("--queries", type=int, default=611)
    parser.add_argument("--timestamp-queries", type=int, nargs="+", default=[24, 0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--variants", nargs="+", default=["mma", "simt"])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, a host build of the kernels")
    parser.add_argument("--library", type=Path, help="kernel library to load (a host build with --dry-run)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench_attention_gpu: torch is not installed", file=sys.stderr)
        return 2
    from videoxl.plugins import kernels

    if args.dry_run:
        device, dtype, heads = "cpu", torch.float16, (7, 1, 64)
        pasts, num_queries, ts_counts, iters = [150, 300], 37, [3, 0], 1
        if args.library is None:
            parser.error("--dry-run needs --library (a host build: videoxl.plugins.build.build_host_emulation)")
        kernels.use_library(args.library, host_memory=True)
        ceiling = matmul_ceiling(torch, device, 256, 2)
    else:
        if not torch.cuda.is_available():
            print("bench_attention_gpu: no CUDA GPU visible (torch.cuda.is_available() is False)", file=sys.stderr)
            return 2
        device, dtype, heads = "cuda", torch.bfloat16, (NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM)
        pasts, num_queries, ts_counts, iters = args.pasts, args.queries, args.timestamp_queries, args.iters
        if args.library is not None:
            kernels.use_library(args.library)
        kernels.load_library()
        ceiling = matmul_ceiling(torch, device, 8192, 20)
    rng = np.random.default_rng(0)
    report = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run, emulated kernels)",
        "dtype": str(dtype).removeprefix("torch."), "heads": list(heads), "matmul_ceiling_tflops": ceiling,
        "torch": torch.__version__, "cases": [],
    }
    for past_len in pasts:
        for num_ts in ts_counts:
            print(f"past {past_len}, {num_queries} queries, {num_ts} timestamp queries ...", flush=True)
            report["cases"].append(run_case(
                torch, kernels, past_len=past_len, num_queries=num_queries, num_ts=num_ts, heads=heads, dtype=dtype,
                device=device, iters=iters, variants=args.variants, rng=rng,
            ))
    text = markdown(report)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
