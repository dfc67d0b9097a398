"""The tiny random checkpoint: Hugging Face layout, key names and shapes, config, tokenizer."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from safetensors.numpy import load_file

from videoxl.config import VideoXLConfig
from videoxl.text import SpecialTokens, load_tokenizer
from videoxl.tiny import tiny_checkpoint_shapes, tiny_hf_config, write_tiny_checkpoint

V = "model.vision_tower.vision_tower.vision_model."


def load_weights(checkpoint) -> dict[str, np.ndarray]:
    weights: dict[str, np.ndarray] = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        weights.update(load_file(str(shard)))
    return weights


def test_files(tiny_checkpoint):
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert names == {
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
    }
    tokenizer_config = json.loads((tiny_checkpoint / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == "<|im_end|>" and tokenizer_config["pad_token"] == "<|endoftext|>"
    generation = json.loads((tiny_checkpoint / "generation_config.json").read_text())
    assert generation["eos_token_id"][0] == SpecialTokens.from_tokenizer(load_tokenizer(tiny_checkpoint)).im_end


def test_index_maps_every_key_to_the_shard_that_holds_it(tiny_checkpoint):
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    held: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        assert (tiny_checkpoint / shard).is_file()
        held.update({key: shard for key in load_file(str(tiny_checkpoint / shard))})
    assert held == weight_map
    assert len(set(weight_map.values())) == 2
    weights = load_weights(tiny_checkpoint)
    assert index["metadata"]["total_size"] == sum(w.nbytes for w in weights.values())


def test_shapes_match_the_table(tiny_checkpoint):
    hf_config = json.loads((tiny_checkpoint / "config.json").read_text())
    table = tiny_checkpoint_shapes(hf_config)
    weights = load_weights(tiny_checkpoint)
    assert set(weights) == set(table)
    for name, array in weights.items():
        assert array.shape == table[name], name
        assert array.dtype == np.float32, name
        assert np.all(np.isfinite(array)), name


def test_table_has_the_expected_keys_and_shapes():
    table = tiny_checkpoint_shapes(tiny_hf_config())
    # 3 + 12 per LLM layer x 2; 3 + 16 per SigLIP layer x 3 + 2; DTS 41; projector 4.
    assert len(table) == 27 + 53 + 41 + 4
    expected = {
        "model.embed_tokens.weight": (320, 64),
        "lm_head.weight": (320, 64),
        "model.norm.weight": (64,),
        "model.layers.1.self_attn.q_proj.weight": (64, 64),
        "model.layers.1.self_attn.k_proj.weight": (32, 64),
        "model.layers.1.self_attn.v_proj.bias": (32,),
        "model.layers.0.mlp.down_proj.weight": (64, 128),
        V + "embeddings.patch_embedding.weight": (64, 3, 14, 14),
        V + "embeddings.position_embedding.weight": (729, 64),
        V + "encoder.layers.2.self_attn.out_proj.bias": (64,),
        V + "encoder.layers.2.mlp.fc1.weight": (128, 64),
        V + "post_layernorm.bias": (64,),
        "model.sae.temporal_encoding": (4, 64),
        "model.sae.encoder.0.q.weight": (64, 64, 1, 1, 1),
        "model.sae.encoder.3.proj_out.bias": (64,),
        "model.sae.encoder.1.qkv.weight": (192, 64, 1),
        "model.sae.encoder.4.relative_position_k.embeddings_table": (129, 64),
        "model.sae.encoder.4.relative_position_v.embeddings_table": (129, 64),
        "model.sae.encoder.1.proj_out.weight": (64, 64, 1),
        "model.sae.encoder.5.conv.weight": (64, 64, 3, 3, 3),
        "model.mm_projector.0.weight": (64, 64),
        "model.mm_projector.2.bias": (64,),
    }
    for name, shape in expected.items():
        assert table[name] == shape, name
    assert "model.layers.0.self_attn.o_proj.bias" not in table
    assert V + "encoder.layers.3.layer_norm1.weight" not in table


def test_table_at_the_released_sizes():
    """The same table at Video-XL-2 8B sizes (DESIGN §1): no arrays, shapes only."""
    real = tiny_hf_config(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, mm_hidden_size=1152,
        vision_config={"hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16,
                       "num_hidden_layers": 27},
    )
    table = tiny_checkpoint_shapes(real)
    assert table["model.layers.27.self_attn.k_proj.weight"] == (512, 3584)
    assert table[V + "embeddings.position_embedding.weight"] == (729, 1152)
    assert table[V + "encoder.layers.26.mlp.fc1.weight"] == (4304, 1152)
    assert table["model.sae.encoder.2.conv.weight"] == (1152, 1152, 3, 3, 3)
    assert table["model.mm_projector.0.weight"] == (3584, 1152)
    assert table["lm_head.weight"] == (152064, 3584)


def test_config_loads_without_warnings(tiny_checkpoint, caplog):
    with caplog.at_level(logging.WARNING, logger="videoxl"):
        cfg = VideoXLConfig.from_checkpoint(tiny_checkpoint)
    assert not caplog.records
    assert (cfg.vision_hidden_size, cfg.vision_num_layers, cfg.vision_layers_used, cfg.vision_grid) == (64, 3, 2, 27)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim, cfg.kv_groups) == (64, 2, 16, 2)
    assert cfg.rope_theta == 1e6 and cfg.vocab_size == 320 and cfg.tokens_per_group == 144


def test_weights_are_seeded_and_not_degenerate(tmp_path, tiny_checkpoint):
    single = write_tiny_checkpoint(tmp_path / "single", num_shards=1)
    assert not (single / "model.safetensors.index.json").exists()
    same = load_file(str(single / "model.safetensors"))
    default = load_weights(tiny_checkpoint)
    assert all(np.array_equal(same[k], default[k]) for k in default)  # seed 0 both times

    other = load_file(str(write_tiny_checkpoint(tmp_path / "seed1", num_shards=1, seed=1) / "model.safetensors"))
    assert not np.array_equal(other["lm_head.weight"], default["lm_head.weight"])

    lm_head = default["lm_head.weight"]
    assert not lm_head[256:].any()  # special tokens and padding rows never win the argmax
    assert np.all(np.abs(lm_head[ord("a")]) > 0)
    norm = default["model.layers.0.input_layernorm.weight"]
    assert 0.5 < norm.mean() < 1.5 and norm.std() > 0
    assert default["model.embed_tokens.weight"].std() > 0.4


def test_overrides(tmp_path):
    out = write_tiny_checkpoint(tmp_path / "deeper", num_shards=3, num_hidden_layers=3,
                                vision_config={"num_hidden_layers": 4})
    cfg = VideoXLConfig.from_checkpoint(out)
    assert cfg.num_hidden_layers == 3 and cfg.vision_num_layers == 4 and cfg.vision_hidden_size == 64
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "model.layers.2.mlp.up_proj.weight" in index["weight_map"]
    assert V + "encoder.layers.3.mlp.fc2.bias" in index["weight_map"]
    assert len(set(index["weight_map"].values())) == 3
    with pytest.raises(ValueError, match="vocab_size"):
        write_tiny_checkpoint(tmp_path / "small_vocab", vocab_size=100)


def test_transformers_reads_the_tokenizer(tiny_checkpoint):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    ours = load_tokenizer(tiny_checkpoint)
    text = "<|im_start|>user\nhé 世<|im_end|>"
    assert hf(text, add_special_tokens=False).input_ids == ours.encode(text, add_special_tokens=False).ids
    assert hf.eos_token_id == 258 and hf.pad_token_id == 256
