"""Export-time weight quantization, old whole-array numpy vs the tiled `export/quantize.py`, real shapes.

    python bench/bench_quant_speed.py [--formats int4 int8] [--repeat 3] [--block-size 128] [--no-lm-head]

Times one Qwen2.5-7B linear of each shape (what `quantized_tensors` does: quantize, then the raw
payload: packed int4 or int8 bytes), old and new alternating so both see the same load on a shared
machine, best of --repeat; checks the outputs are bit-identical; and estimates the whole LLM
(28 layers x q, k, v, o, gate, up, down + lm_head, always int8). Scales in fp32 (an fp32 export).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from videoxl.export.quantize import QMAX, quantized_tensors

H, KV, I, VOCAB, LAYERS = 3584, 512, 18944, 152064, 28
SHAPES = {"q_proj / o_proj": ((H, H), 2), "k_proj / v_proj": ((H, KV), 2), "gate_proj / up_proj": ((H, I), 2), "down_proj": ((I, H), 1)}


def old_quantized_payload(w: np.ndarray, bits: int, block: int | None) -> tuple[bytes, np.ndarray]:
    """The exporter's first form (before the tiled one): whole-array temporaries, then the payload."""
    k, n = w.shape
    qmax = QMAX[bits]
    blocks = w[None] if bits == 8 else w.reshape(k // block, block, n)
    absmax = np.abs(w).max(axis=0) if bits == 8 else np.abs(blocks).max(axis=1)
    scale = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
    divisor = scale[None] if bits == 8 else scale[:, None]
    q = np.clip(np.rint(blocks / divisor), -qmax, qmax).astype(np.int8).reshape(k, n)
    if bits == 8:
        return q.tobytes(), scale
    flat = q.ravel()
    nibbles = (flat & 0x0F).astype(np.uint8)
    return (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes(), scale


def new_quantized_payload(w: np.ndarray, bits: int, block: int | None) -> tuple[bytes, np.ndarray]:
    (_, payload, _, _), (_, scale) = quantized_tensors("w", w, bits, block, np.dtype(np.float32))
    return payload, scale


def time_both(w: np.ndarray, bits: int, block: int | None, repeat: int) -> tuple[float, float]:
    best = {"old": float("inf"), "new": float("inf")}
    results = {}
    for _ in range(repeat):
        for name, f in (("old", old_quantized_payload), ("new", new_quantized_payload)):
            start = time.perf_counter()
            results[name] = f(w, bits, block)
            best[name] = min(best[name], time.perf_counter() - start)
    (old_payload, old_scale), (new_payload, new_scale) = results["old"], results["new"]
    if old_payload != new_payload or old_scale.tobytes() != new_scale.tobytes():
        raise SystemExit(f"{w.shape} int{bits}: the tiled output differs from the old one")
    return best["old"], best["new"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=["int4", "int8"], choices=["int4", "int8"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--no-lm-head", action="store_true", help="skip lm_head (3584 x 152064 fp32: 2.2 GB, ~9 GB peak for the old form)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    lm_head = None
    if not args.no_lm_head:  # int8 in every format: measured once
        w = rng.standard_normal((H, VOCAB), dtype=np.float32)
        lm_head = time_both(w, 8, None, args.repeat)
        del w
        print(f"lm_head {H}x{VOCAB} int8: old {lm_head[0]:.3f} s  new {lm_head[1]:.3f} s  x{lm_head[0] / lm_head[1]:.1f}", flush=True)
    for fmt in args.formats:
        bits, block = (4, args.block_size) if fmt == "int4" else (8, None)
        total = [0.0, 0.0]
        print(f"\n{fmt}" + (f" (block {block})" if block else "") + ", seconds per linear (payload included):", flush=True)
        for label, ((k, n), per_layer) in SHAPES.items():
            w = rng.standard_normal((k, n), dtype=np.float32)
            old, new = time_both(w, bits, block, args.repeat)
            total[0] += LAYERS * per_layer * old
            total[1] += LAYERS * per_layer * new
            print(f"  {label:20s} {k:5d}x{n:<5d} old {old:.3f}  new {new:.3f}  x{old / new:.1f}", flush=True)
        if lm_head:
            total = [total[0] + lm_head[0], total[1] + lm_head[1]]
        what = "28 layers x 7 linears" + (" + lm_head" if lm_head else "")
        print(f"  full model ({what}): old {total[0]:.1f} s  new {total[1]:.1f} s  x{total[0] / total[1]:.1f}", flush=True)


if __name__ == "__main__":
    main()
