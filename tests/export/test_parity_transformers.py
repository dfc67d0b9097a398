"""Our PyTorch model vs Hugging Face transformers with the same random weights (fp32)."""

from __future__ import annotations

import pytest
import torch

from videoxl.export.checkpoint import load_state_dict
from videoxl.export.reference import DenseCache, DenseCausalAttention

transformers = pytest.importorskip("transformers")

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."


@pytest.fixture(scope="module")
def state(tiny_checkpoint):
    return load_state_dict(tiny_checkpoint)


def test_llm_logits_and_kv_match_qwen2(tiny_model, tiny_checkpoint, state):
    cfg = tiny_model.cfg
    hf_cfg = transformers.Qwen2Config(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        vocab_size=cfg.vocab_size, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=False, max_position_embeddings=32768,
    )
    hf = transformers.Qwen2ForCausalLM(hf_cfg).eval()
    llm_keys = {k: v for k, v in state.items() if k.startswith(("model.layers.", "model.embed_tokens", "model.norm", "lm_head"))}
    hf.load_state_dict(llm_keys, strict=True)  # the checkpoint's LLM names are Qwen2's names

    ids = torch.randint(0, 256, (1, 53), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids, use_cache=True)
        cache = DenseCache.empty(cfg, torch.float32)
        hidden = tiny_model.forward_hidden(tiny_model.model.embed_tokens(ids[0]), torch.arange(53), DenseCausalAttention(cache, cfg.head_dim**-0.5))
        logits = tiny_model.logits(hidden)
    assert (logits - ref.logits[0]).abs().max() <= 1e-4
    kv = ref.past_key_values
    for layer in range(cfg.num_hidden_layers):
        hf_k = kv.layers[layer].keys[0].transpose(0, 1)  # (L, Hkv, D), RoPE applied
        hf_v = kv.layers[layer].values[0].transpose(0, 1)
        assert (cache.keys_rotated[layer] - hf_k).abs().max() <= 1e-4
        assert (cache.values[layer] - hf_v).abs().max() <= 1e-4
    # the cache also holds the keys before RoPE: rotating them gives the Hugging Face keys
    assert not torch.allclose(cache.keys[0], cache.keys_rotated[0])


def test_siglip_feature_matches_hidden_state_26(tiny_model, state):
    cfg = tiny_model.cfg
    hf = transformers.SiglipVisionModel(
        transformers.SiglipVisionConfig(
            hidden_size=cfg.vision_hidden_size, intermediate_size=cfg.vision_intermediate_size,
            num_attention_heads=cfg.vision_num_heads, num_hidden_layers=cfg.vision_num_layers,
            image_size=cfg.image_size, patch_size=cfg.patch_size, layer_norm_eps=cfg.vision_layer_norm_eps,
        )
    ).eval()
    vision = {k[len(VISION_PREFIX):]: v for k, v in state.items() if k.startswith(VISION_PREFIX)}
    missing, unexpected = hf.load_state_dict(vision, strict=False)
    assert not unexpected
    assert all(k.startswith("head.") for k in missing)  # only the unused pooling head
    pixels = torch.randn(3, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(pixels, output_hidden_states=True).hidden_states[cfg.vision_layers_used]
        ours = tiny_model.vision_features(pixels)
    assert ref.shape == ours.shape == (3, cfg.vision_grid**2, cfg.vision_hidden_size)
    assert (ours - ref).abs().max() <= 1e-4
    # the feature is before post_layernorm and not the last layer's output
    with torch.no_grad():
        last = hf(pixels, output_hidden_states=True).hidden_states[-1]
    assert (ours - last).abs().max() > 1e-3
