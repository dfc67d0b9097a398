"""A random tiny Video-XL-2 checkpoint in the released Hugging Face layout (numpy only).

Same key names, shard layout, config keys and tokenizer special tokens as the real model,
at sizes that run in milliseconds: SigLIP 64 wide (3 layers, 2 used), LLM 64 wide with
2 layers and GQA 4:2, vocabulary of 320 (256 byte-level symbols + special tokens + unused
padding rows, like Qwen's 152064 > 151665). Tests and demos exercise the whole pipeline on it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from videoxl.config import VideoXLConfig

# Added after the 256 byte symbols, in this order: ids 256, 257, ...
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_pad|>", "<|vision_start|>", "<|vision_end|>"
)
BYTE_VOCAB = 256
ENDOFTEXT_ID, IM_START_ID, IM_END_ID, VISION_PAD_ID = 256, 257, 258, 259

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."

_VISION_CONFIG = {
    "model_type": "siglip_vision_model",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "image_size": 384,
    "patch_size": 14,
    "num_channels": 3,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu_pytorch_tanh",
}


def tiny_hf_config(**overrides: Any) -> dict[str, Any]:
    """config.json of the tiny model; ``overrides`` replace keys (a ``vision_config`` dict is merged)."""
    config: dict[str, Any] = {
        "architectures": ["LlavaQwenForCausalLM"],
        "model_type": "llava_qwen",
        "torch_dtype": "float32",
        # Qwen2 LLM
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "rope_theta": 1_000_000.0,
        "rms_norm_eps": 1e-6,
        "vocab_size": 320,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
        "bos_token_id": ENDOFTEXT_ID,
        "eos_token_id": IM_END_ID,
        "use_cache": True,
        # LLaVA
        "mm_vision_tower": "google/siglip-so400m-patch14-384",
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": _VISION_CONFIG["hidden_size"],
        "mm_vision_select_layer": -2,
        "mm_spatial_pool_stride": 2,
        "mm_spatial_pool_mode": "average",
        "vision_config": dict(_VISION_CONFIG),
    }
    for key, value in overrides.items():
        if key == "vision_config" and isinstance(value, dict):
            config["vision_config"] = {**config["vision_config"], **value}
        else:
            config[key] = value
    return config


def tiny_checkpoint_shapes(hf_config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Video-XL-2 checkpoint with the shapes ``hf_config`` implies, in file order."""
    cfg = VideoXLConfig.from_hf_dict(hf_config)
    h, inter, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * cfg.head_dim
    c, iv, patch = cfg.vision_hidden_size, cfg.vision_intermediate_size, cfg.patch_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        })
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (vocab, h)

    v = VISION_PREFIX
    shapes[v + "embeddings.patch_embedding.weight"] = (c, 3, patch, patch)
    shapes[v + "embeddings.patch_embedding.bias"] = (c,)
    shapes[v + "embeddings.position_embedding.weight"] = (cfg.vision_grid**2, c)
    for j in range(cfg.vision_num_layers):
        p = f"{v}encoder.layers.{j}."
        shapes.update({p + "layer_norm1.weight": (c,), p + "layer_norm1.bias": (c,)})
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes.update({f"{p}self_attn.{proj}.weight": (c, c), f"{p}self_attn.{proj}.bias": (c,)})
        shapes.update({
            p + "layer_norm2.weight": (c,), p + "layer_norm2.bias": (c,),
            p + "mlp.fc1.weight": (iv, c), p + "mlp.fc1.bias": (iv,),
            p + "mlp.fc2.weight": (c, iv), p + "mlp.fc2.bias": (c,),
        })
    shapes.update({v + "post_layernorm.weight": (c,), v + "post_layernorm.bias": (c,)})

    relative_rows = 2 * cfg.compressor_max_relative_position + 1  # 129
    shapes["model.sae.temporal_encoding"] = (cfg.frames_per_group, c)
    for stage in (0, 3):  # AttnBlock3D
        p = f"model.sae.encoder.{stage}."
        shapes.update({p + "norm.weight": (c,), p + "norm.bias": (c,)})
        for proj in ("q", "k", "v", "proj_out"):
            shapes.update({f"{p}{proj}.weight": (c, c, 1, 1, 1), f"{p}{proj}.bias": (c,)})
    for stage in (1, 4):  # TemporalAttention
        p = f"model.sae.encoder.{stage}."
        shapes.update({
            p + "norm.weight": (c,), p + "norm.bias": (c,),
            p + "qkv.weight": (3 * c, c, 1), p + "qkv.bias": (3 * c,),
            p + "relative_position_k.embeddings_table": (relative_rows, c),
            p + "relative_position_v.embeddings_table": (relative_rows, c),
            p + "proj_out.weight": (c, c, 1), p + "proj_out.bias": (c,),
        })
    for stage in (2, 5):  # SamePadConv3d
        p = f"model.sae.encoder.{stage}."
        shapes.update({p + "conv.weight": (c, c, 3, 3, 3), p + "conv.bias": (c,)})

    shapes.update({
        "model.mm_projector.0.weight": (h, c), "model.mm_projector.0.bias": (h,),
        "model.mm_projector.2.weight": (h, h), "model.mm_projector.2.bias": (h,),
    })
    return shapes


def _init_tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Random values chosen so that activations stay O(1) and attention is far from uniform.

    Matrices and convolutions use std 1/sqrt(fan_in) (not the 0.02 of training init: at width
    64 that would make every attention map nearly uniform and hide scale or mask bugs).
    """
    if name.endswith("embed_tokens.weight"):
        std = 1.0
    elif "position_embedding" in name or name.endswith("temporal_encoding"):
        std = 0.5
    elif name.endswith("embeddings_table"):
        std = 0.2
    elif len(shape) == 1 and name.endswith(".weight"):  # every 1-D weight is a norm's scale
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    elif len(shape) == 1:  # biases
        std = 0.02
    else:
        std = 1.0 / math.sqrt(math.prod(shape[1:]))
    return (std * rng.standard_normal(shape)).astype(np.float32)


def tiny_weights(hf_config: dict[str, Any], *, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights for every key of :func:`tiny_checkpoint_shapes`."""
    rng = np.random.default_rng(seed)
    weights = {name: _init_tensor(rng, name, shape) for name, shape in tiny_checkpoint_shapes(hf_config).items()}
    # Special tokens, unused vocabulary rows and non-printable bytes never win the greedy
    # argmax (their logit is 0, the printable rows' maximum is ~+2): the tiny model neither
    # stops at once nor emits text that is not printable ASCII.
    printable = np.zeros(weights["lm_head.weight"].shape[0], dtype=bool)
    printable[0x20:0x7F] = True
    printable[ord("\n")] = True
    weights["lm_head.weight"][~printable] = 0.0
    return weights


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tiny_tokenizer() -> Tokenizer:
    """Byte-level BPE: byte b has id b, no merges, then the Qwen2 special tokens from id 256."""
    vocab = {symbol: byte for byte, symbol in _bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def write_tiny_checkpoint(out_dir: str | Path, *, seed: int = 0, num_shards: int = 2, **overrides: Any) -> Path:
    """Write config.json, sharded safetensors (+ index), tokenizer and generation config.

    ``num_shards=1`` writes a single ``model.safetensors`` and no index. ``overrides`` replace
    config.json keys (see :func:`tiny_hf_config`).
    """
    out = Path(out_dir)
    hf_config = tiny_hf_config(**overrides)
    if hf_config["vocab_size"] < BYTE_VOCAB + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {hf_config['vocab_size']} < {BYTE_VOCAB + len(SPECIAL_TOKENS)} tokenizer tokens")
    weights = tiny_weights(hf_config, seed=seed)
    if not 1 <= num_shards <= len(weights):
        raise ValueError(f"num_shards must be in 1..{len(weights)}, got {num_shards}")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", hf_config)

    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if num_shards == 1:
        save_file(weights, str(out / "model.safetensors"), metadata=metadata)
    else:
        names = list(weights)
        weight_map: dict[str, str] = {}
        for shard, part in enumerate(np.array_split(np.arange(len(names)), num_shards), start=1):
            filename = f"model-{shard:05d}-of-{num_shards:05d}.safetensors"
            save_file({names[k]: weights[names[k]] for k in part}, str(out / filename), metadata=metadata)
            weight_map.update({names[k]: filename for k in part})
        total_size = sum(w.nbytes for w in weights.values())
        _write_json(out / "model.safetensors.index.json",
                    {"metadata": {"total_size": total_size}, "weight_map": weight_map})

    write_tokenizer_files(out, hf_config)
    return out


def write_tokenizer_files(out: Path, hf_config: dict[str, Any]) -> None:
    """tokenizer.json (byte-level, :func:`tiny_tokenizer`), tokenizer_config.json and generation_config.json."""
    tiny_tokenizer().save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": hf_config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
    })
    _write_json(out / "generation_config.json", {
        "bos_token_id": ENDOFTEXT_ID,
        "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
        "pad_token_id": ENDOFTEXT_ID,
        "do_sample": False,
    })
