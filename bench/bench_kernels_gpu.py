"""GPU benchmark: the chunked sparse attention kernel vs dense masked attention (bf16).

    python bench/bench_kernels_gpu.py [--histories 2048 8192 20480] [--iters 20]

Real Video-XL-2 shapes: 28 query heads, 4 KV heads, head_dim 128; the chunk is the last 4
groups of 149 tokens (5 timestamp + 144 visual), the window is 3 chunks (DESIGN §2). The
baseline is what the reference code does: torch scaled_dot_product_attention over the
chunk's rows of the dense mask (Q x K boolean mask, every pair computed). TFLOP/s counts
4 * head_dim FLOPs per (query head, query, key) pair: all Q x K pairs for the dense baseline,
only the visible pairs for ours. The bf16 matmul ceiling is measured in the same run.
Prints a markdown table. Needs an NVIDIA GPU; exits with a message otherwise.
"""

from __future__ import annotations

import argparse
import sys


from videoxl.layout import build_layout, chunk_visibility, num_chunks
from videoxl.plugins.reference import chunk_visibility_mask

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 28, 4, 128
TOKENS_PER_GROUP, STAMP_TOKENS, PREFIX_TOKENS = 144, 5, 14
CHUNK_GROUPS, WINDOW_CHUNKS = 4, 3
IMAGE_TOKEN = 151654


def chunk_for_history(history_tokens: int):
    """A layout whose last chunk (4 groups) has about `history_tokens` of past."""
    group_tokens = TOKENS_PER_GROUP + STAMP_TOKENS
    groups = max(CHUNK_GROUPS, round((history_tokens - PREFIX_TOKENS) / group_tokens) + CHUNK_GROUPS)
    groups -= groups % CHUNK_GROUPS
    layout = build_layout(
        list(range(PREFIX_TOKENS)), [[1] * STAMP_TOKENS for _ in range(groups)], [2, 3],
        image_token_id=IMAGE_TOKEN, tokens_per_group=TOKENS_PER_GROUP,
    )
    last = num_chunks(layout, CHUNK_GROUPS) - 1
    return chunk_visibility(layout, last, chunk_groups=CHUNK_GROUPS, window_chunks=WINDOW_CHUNKS)


def time_ms(torch, fn, iters: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def matmul_ceiling_tflops(torch, iters: int) -> float:
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    ms = time_ms(torch, lambda: torch.matmul(a, b), iters)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def bench_history(torch, kernels, history: int, iters: int) -> dict[str, float]:
    import torch.nn.functional as F

    vis = chunk_for_history(history)
    num_queries, num_keys = vis.end - vis.start, vis.end
    mask_np = chunk_visibility_mask(
        num_queries, num_keys, vis.prefix_len, vis.window_start, vis.past_timestamp_index, vis.timestamp_query_index
    )
    visible_pairs = int(mask_np.sum())
    q = torch.randn(num_queries, NUM_Q_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(num_keys, NUM_KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    v = torch.randn(num_keys, NUM_KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(q)
    scale = HEAD_DIM**-0.5
    prefix = torch.tensor([vis.prefix_len], dtype=torch.int64, device="cuda")
    window = torch.tensor([vis.window_start], dtype=torch.int64, device="cuda")
    timestamps = torch.as_tensor(vis.past_timestamp_index, device="cuda")
    ts_queries = torch.as_tensor(vis.timestamp_query_index, device="cuda")

    def ours() -> None:
        kernels.chunk_attention_torch(
            q, k, v, prefix_len=prefix, window_start=window, past_timestamp_index=timestamps,
            timestamp_query_index=ts_queries, scale=scale, out=out,
        )

    # dense baseline: (1, H, Q, D) x (1, H, K, D) with the chunk's rows of the dense mask
    qd = q.transpose(0, 1)[None]
    group = NUM_Q_HEADS // NUM_KV_HEADS
    kd = k.transpose(0, 1)[None].repeat_interleave(group, dim=1)
    vd = v.transpose(0, 1)[None].repeat_interleave(group, dim=1)
    mask = torch.as_tensor(mask_np, device="cuda")

    def dense() -> torch.Tensor:
        return F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale)

    ours()
    torch.cuda.synchronize()
    max_diff = (out.float() - dense()[0].transpose(0, 1).float()).abs().max().item()
    ours_ms = time_ms(torch, ours, iters)
    dense_ms = time_ms(torch, dense, iters)
    flops_per_pair = 4 * HEAD_DIM * NUM_Q_HEADS
    return {
        "history": vis.start, "queries": num_queries, "keys": num_keys,
        "visible": visible_pairs / (num_queries * num_keys),
        "ours_ms": ours_ms, "ours_tflops": flops_per_pair * visible_pairs / (ours_ms * 1e-3) / 1e12,
        "dense_ms": dense_ms, "dense_tflops": flops_per_pair * num_queries * num_keys / (dense_ms * 1e-3) / 1e12,
        "max_diff": max_diff,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--histories", type=int, nargs="+", default=[2048, 8192, 20480])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench_kernels_gpu: torch is not installed; this benchmark needs torch with CUDA", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_kernels_gpu: no CUDA GPU visible (torch.cuda.is_available() is False); nothing to measure",
              file=sys.stderr)
        return 2
    from videoxl.plugins import kernels

    kernels.load_library()
    ceiling = matmul_ceiling_tflops(torch, args.iters)
    rows = [bench_history(torch, kernels, h, args.iters) for h in args.histories]
    print(f"GPU: {torch.cuda.get_device_name()}; bf16 matmul ceiling {ceiling:.0f} TFLOP/s "
          f"(8192^3); heads {NUM_Q_HEADS}/{NUM_KV_HEADS}, head_dim {HEAD_DIM}, window {WINDOW_CHUNKS} chunks\n")
    print("| history tokens | Q | K | visible pairs | ours ms | ours TFLOP/s (visible) | dense masked ms "
          "| dense TFLOP/s (all pairs) | speedup | ours % of ceiling | max abs diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['history']} | {r['queries']} | {r['keys']} | {r['visible']:.1%} | {r['ours_ms']:.3f} "
              f"| {r['ours_tflops']:.1f} | {r['dense_ms']:.3f} | {r['dense_tflops']:.1f} "
              f"| {r['dense_ms'] / r['ours_ms']:.2f}x | {r['ours_tflops'] / ceiling:.1%} | {r['max_diff']:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
