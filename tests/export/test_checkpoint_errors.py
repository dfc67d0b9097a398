"""Config and checkpoint loading: defaults, unknown keys, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from safetensors.numpy import load_file, save_file

from videoxl.config import ConfigError, VideoXLConfig
from videoxl.export.checkpoint import CheckpointError
from videoxl.export.model import VideoXLModel
from videoxl.tiny import write_tiny_checkpoint


def test_defaults_are_the_released_model():
    cfg = VideoXLConfig()
    assert (cfg.vision_layers_used, cfg.vision_grid, cfg.tokens_per_group) == (26, 27, 144)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (3584, 28, 28, 4, 128)
    assert cfg.kv_groups == 7 and cfg.vocab_size == 152064 and cfg.rope_theta == 1e6


def test_real_style_config_and_unknown_keys(tmp_path, caplog):
    raw = {"model_type": "llava_qwen", "hidden_size": 3584, "mm_vision_select_layer": -2, "mm_hidden_size": 1152,
           "rope_scaling": None, "some_new_key": 1}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with caplog.at_level(logging.WARNING):
        cfg = VideoXLConfig.from_checkpoint(tmp_path)
    assert cfg == VideoXLConfig()
    assert "some_new_key" in caplog.text and "rope_scaling" not in caplog.text


@pytest.mark.parametrize(
    "content,message",
    [
        ({"model_type": "qwen2"}, "model_type is 'qwen2'"),
        ("{not json", "not valid JSON"),
        ({"model_type": "llava_qwen", "hidden_size": 100, "num_attention_heads": 28}, "not divisible"),
    ],
)
def test_bad_config(tmp_path, content, message):
    (tmp_path / "config.json").write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ConfigError, match=message):
        VideoXLConfig.from_checkpoint(tmp_path)


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        VideoXLConfig.from_checkpoint(tmp_path)


@pytest.fixture()
def checkpoint_copy(tiny_checkpoint, tmp_path):
    return shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")


def test_sharded_and_single_file_load_the_same(tiny_checkpoint, tmp_path):
    single = write_tiny_checkpoint(tmp_path / "single", num_shards=1)
    a, b = VideoXLModel.from_pretrained(tiny_checkpoint), VideoXLModel.from_pretrained(single)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert (pa == pb).all(), name


def test_missing_shard(checkpoint_copy):
    next(checkpoint_copy.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="shards listed in model.safetensors.index.json are missing"):
        VideoXLModel.from_pretrained(checkpoint_copy)


def test_missing_and_unexpected_keys_are_named(checkpoint_copy):
    shard = next(checkpoint_copy.glob("model-00001-*.safetensors"))
    tensors = load_file(str(shard))
    removed = sorted(tensors)[0]
    tensors.pop(removed)
    tensors["model.surprise.weight"] = tensors[next(iter(tensors))]
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError) as err:
        VideoXLModel.from_pretrained(checkpoint_copy)
    assert removed in str(err.value) and "model.surprise.weight" in str(err.value)


def test_shape_mismatch_is_named(checkpoint_copy):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    config["intermediate_size"] = 96
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"shape mismatches: .*mlp"):
        VideoXLModel.from_pretrained(checkpoint_copy)


def test_pickle_only_and_corrupt(checkpoint_copy, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(checkpoint_copy / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pickle"):
        VideoXLModel.from_pretrained(pickled)
    next(checkpoint_copy.glob("model-00001-*.safetensors")).write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        VideoXLModel.from_pretrained(checkpoint_copy)
