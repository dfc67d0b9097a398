"""The full-size synthetic checkpoint writer, at a small width (the layout and the streaming are the same)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from videoxl.synthetic import real_hf_config, write_synthetic_checkpoint
from videoxl.tiny import tiny_checkpoint_shapes

SMALL = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
         "num_hidden_layers": 2, "vocab_size": 512, "vision_config": {"hidden_size": 64, "intermediate_size": 96,
                                                                      "num_attention_heads": 2, "num_hidden_layers": 3}}


def _tensors(checkpoint: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    """name -> the bf16 bit patterns as uint16 (numpy has no bfloat16)."""
    for shard in sorted(checkpoint.glob("*.safetensors")):
        out.update({k: v.view(torch.int16).numpy().view(np.uint16) for k, v in load_file(str(shard)).items()})
    return out


def test_real_config_is_the_released_model() -> None:
    config = real_hf_config()
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (3584, 18944, 28)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (28, 4, 152064)
    assert config["vision_config"]["hidden_size"] == config["mm_hidden_size"] == 1152
    assert (config["vision_config"]["num_hidden_layers"], config["vision_config"]["intermediate_size"]) == (27, 4304)
    # every tensor's shape: 8.14 B parameters, ~16.3 GB in bf16 (the released checkpoint's size)
    assert 8.1e9 < sum(int(np.prod(s)) for s in tiny_checkpoint_shapes(config).values()) < 8.2e9


def test_shards_index_names_and_determinism(tmp_path: Path) -> None:
    a = write_synthetic_checkpoint(tmp_path / "a", seed=3, shard_bytes=2**20, **SMALL)
    b = write_synthetic_checkpoint(tmp_path / "b", seed=3, shard_bytes=64 * 2**20, **SMALL)
    index = json.loads((a / "model.safetensors.index.json").read_text())
    shapes = tiny_checkpoint_shapes(json.loads((a / "config.json").read_text()))
    assert set(index["weight_map"]) == set(shapes)
    assert len(set(index["weight_map"].values())) > 1
    ta, tb = _tensors(a), _tensors(b)
    assert {k: v.shape for k, v in ta.items()} == shapes
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in ta.values())
    for name in ta:  # the values depend on (seed, name), not on how the tensors are sharded
        assert ta[name].tobytes() == tb[name].tobytes(), name
    up = ta["model.layers.1.mlp.up_proj.weight"].astype(np.uint32) << 16  # bf16 bits -> float32
    assert abs(float(up.view(np.float32).std()) - 0.02) < 0.002
    assert np.all(ta["model.norm.weight"] == 0x3F80)  # norm scales are exactly 1.0 in bf16
    c = write_synthetic_checkpoint(tmp_path / "c", seed=4, shard_bytes=2**20, **SMALL)
    assert _tensors(c)["lm_head.weight"].tobytes() != ta["lm_head.weight"].tobytes()


def test_loads_through_the_checkpoint_path(tmp_path: Path) -> None:
    from videoxl.export.checkpoint import LazyStateDict
    from videoxl.export.model import VideoXLModel

    checkpoint = write_synthetic_checkpoint(tmp_path / "ck", shard_bytes=2**20, **SMALL)
    model = VideoXLModel.from_pretrained(checkpoint, dtype="bf16")
    lazy = LazyStateDict(checkpoint)
    assert (model.lm_head.weight == lazy["lm_head.weight"]).all()
    visual_only = VideoXLModel.from_pretrained(checkpoint, dtype="bf16", llm_weights=False)
    assert visual_only.lm_head.weight.is_meta and not visual_only.model.sae.temporal_encoding.is_meta


def test_refuses_a_vocabulary_smaller_than_the_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size 100 < 262"):
        write_synthetic_checkpoint(tmp_path / "ck", **{**SMALL, "vocab_size": 100})
