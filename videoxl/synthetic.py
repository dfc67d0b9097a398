"""A full-size random Video-XL-2 checkpoint, streamed to disk shard by shard (numpy + torch casts only).

The released ``config.json`` values (Qwen2.5-7B + SigLIP-SO400M/14@384 + DTS + projector),
every tensor at its real shape and checkpoint name (``videoxl.tiny.tiny_checkpoint_shapes``),
bf16, sharded like the release: ``model.safetensors.index.json`` plus shards of a few GB. It
exists so that export, engine builds and the memory planner can be measured at the real size
where the real weights cannot be downloaded.

Memory stays flat (~one generation block, 64 Mi elements) however large the model: each shard's
safetensors header is computed from the shapes alone, then every tensor is generated block by
block from its own seeded generator and appended as raw bf16 bytes. The values are deterministic
in (seed, tensor name) and do not depend on the shard size.

    python -m videoxl.synthetic OUT [--seed 0] [--shard-gib 4] [--layers N] [--vocab N] ...

Weights are small (std 0.02, norm scales 1): activations stay finite in fp16 through 28 layers.
The tokenizer is the byte-level one of ``videoxl.tiny``; its special-token ids are in config.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from videoxl.tiny import (
    BYTE_VOCAB,
    SPECIAL_TOKENS,
    tiny_checkpoint_shapes,
    tiny_hf_config,
    write_tokenizer_files,
)

GIB = 2**30
BLOCK_ELEMENTS = 64 * 2**20  # generated and cast per step: 256 MiB of float32, 128 MiB of bf16
WEIGHT_STD = 0.02
ALIGN = 8  # safetensors pads its JSON header so tensor data starts 8-byte aligned

# The released Video-XL-2 config.json values (Qwen2.5-7B-Instruct + SigLIP-SO400M/14@384).
REAL_VISION_CONFIG = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_attention_heads": 16,
    "num_hidden_layers": 27,
}
REAL_LLM_CONFIG = {
    "torch_dtype": "bfloat16",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "mm_hidden_size": 1152,
}


def real_hf_config(**overrides: Any) -> dict[str, Any]:
    """config.json of the released model's shapes; ``overrides`` replace keys (``vision_config`` is merged)."""
    vision = {**REAL_VISION_CONFIG, **overrides.pop("vision_config", {})}
    config = tiny_hf_config(**{**REAL_LLM_CONFIG, **overrides}, vision_config=vision)
    config["mm_hidden_size"] = config["vision_config"]["hidden_size"]
    return config


def _tensor_std(name: str, shape: tuple[int, ...]) -> float | None:
    """Standard deviation of a tensor's values; None for a norm scale (all ones)."""
    if len(shape) == 1 and name.endswith(".weight"):  # every 1-D weight is a norm's scale
        return None
    return WEIGHT_STD


def _tensor_seed(seed: int, name: str) -> list[int]:
    """Per-tensor generator seed: values depend on (seed, name) only, not on file order or shards."""
    digest = hashlib.sha256(name.encode()).digest()
    return [seed, int.from_bytes(digest[:8], "little")]


def tensor_bf16_blocks(seed: int, name: str, shape: tuple[int, ...]):
    """The tensor's values as bf16 bytes, BLOCK_ELEMENTS at a time (round-to-nearest-even)."""
    import torch

    count = math.prod(shape)
    std = _tensor_std(name, shape)
    rng = np.random.default_rng(_tensor_seed(seed, name))
    for start in range(0, count, BLOCK_ELEMENTS):
        n = min(BLOCK_ELEMENTS, count - start)
        if std is None:
            block = np.ones(n, dtype=np.float32)
        else:
            block = rng.standard_normal(n, dtype=np.float32)
            block *= std
        yield torch.from_numpy(block).to(torch.bfloat16).view(torch.int16).numpy().tobytes()


def plan_shards(shapes: dict[str, tuple[int, ...]], shard_bytes: int) -> list[list[str]]:
    """Tensors in file order, cut into shards of at most ``shard_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if shards[-1] and used + nbytes > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def safetensors_header(shapes: dict[str, tuple[int, ...]], names: list[str]) -> bytes:
    """The 8-byte length + JSON header of a bf16 safetensors file holding ``names`` in order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}  # transformers refuses files without it
    offset = 0
    for name in names:
        nbytes = 2 * math.prod(shapes[name])
        header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)
    return len(text).to_bytes(8, "little") + text


def write_synthetic_checkpoint(
    out_dir: str | Path,
    *,
    seed: int = 0,
    shard_bytes: int = 4 * GIB,
    progress: bool = False,
    **overrides: Any,
) -> Path:
    """Write config.json, bf16 safetensors shards + index, tokenizer and generation config.

    ``overrides`` replace config.json keys of :func:`real_hf_config` (e.g. ``num_hidden_layers=1``,
    ``vocab_size=4096``, ``vision_config={"num_hidden_layers": 2}`` for a full-width, shallow model).
    """
    from tqdm import tqdm

    out = Path(out_dir)
    hf_config = real_hf_config(**overrides)
    if hf_config["vocab_size"] < BYTE_VOCAB + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {hf_config['vocab_size']} < {BYTE_VOCAB + len(SPECIAL_TOKENS)} tokenizer tokens")
    if shard_bytes < 2**20:
        raise ValueError(f"shard_bytes must be at least 1 MiB, got {shard_bytes}")
    shapes = tiny_checkpoint_shapes(hf_config)
    shards = plan_shards(shapes, shard_bytes)
    total_bytes = sum(2 * math.prod(s) for s in shapes.values())
    out.mkdir(parents=True, exist_ok=True)

    weight_map: dict[str, str] = {}
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="synthetic checkpoint", disable=not progress)
    for index, names in enumerate(shards, start=1):
        filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        partial = out / (filename + ".partial")  # renamed when complete: no half-written shard under its name
        with open(partial, "wb") as f:
            f.write(safetensors_header(shapes, names))
            for name in names:
                for block in tensor_bf16_blocks(seed, name, shapes[name]):
                    f.write(block)
                    bar.update(len(block))
        partial.replace(out / filename)
        weight_map.update({name: filename for name in names})
    bar.close()
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=2) + "\n"
    )
    write_tokenizer_files(out, hf_config)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m videoxl.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-gib", type=float, default=4.0, help="largest shard size (default 4 GiB, like the release)")
    parser.add_argument("--layers", type=int, help="LLM layers (default 28)")
    parser.add_argument("--vision-layers", type=int, help="SigLIP layers in the checkpoint (default 27; one fewer is used)")
    parser.add_argument("--vocab", type=int, help="vocabulary rows (default 152064)")
    parser.add_argument("--intermediate", type=int, help="LLM MLP width (default 18944)")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.layers is not None:
        overrides["num_hidden_layers"] = args.layers
    if args.vocab is not None:
        overrides["vocab_size"] = args.vocab
    if args.intermediate is not None:
        overrides["intermediate_size"] = args.intermediate
    if args.vision_layers is not None:
        overrides["vision_config"] = {"num_hidden_layers": args.vision_layers}
    try:
        out = write_synthetic_checkpoint(args.out, seed=args.seed, shard_bytes=int(args.shard_gib * GIB), progress=True, **overrides)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
