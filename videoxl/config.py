"""One frozen config for the whole model, built from the checkpoint's ``config.json``.

Defaults equal the released Video-XL-2 (8B): SigLIP-SO400M/14@384 (26 of 27 layers), the DTS
compressor, a 2-layer GELU projector, and Qwen2.5-7B. The same object is saved next to every
artifact (ONNX graphs, engines) so that nothing downstream writes a shape constant twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llava_qwen",)

# config.json keys that are understood but carry nothing the inference path needs.
_KNOWN_IGNORED_KEYS = frozenset(
    {
        "architectures", "model_type", "torch_dtype", "dtype", "transformers_version",
        "use_cache", "attention_dropout", "hidden_act", "initializer_range",
        "max_position_embeddings", "max_window_layers", "sliding_window", "use_sliding_window",
        "rope_scaling", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
        "mm_vision_tower", "mm_projector_type", "mm_vision_select_feature", "mm_patch_merge_type",
        "mm_use_im_start_end", "mm_use_im_patch_token", "mm_newline_position",
        "mm_spatial_pool_mode", "mm_tunable_parts", "image_aspect_ratio", "image_grid_pinpoints",
        "image_crop_resolution", "image_split_resolution", "tokenizer_model_max_length",
        "tokenizer_padding_side", "use_mm_proj", "vision_tower_pretrained", "mm_resampler_type",
        "mm_vision_tower_lr", "mm_projector_lr", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter",
        "pos_skipping_range", "add_faster_video", "faster_token_stride", "force_sample",
        "mm_pooling_position", "frame_aspect_ratio", "frame_grid_pinpoints",
        "text_mlp", "layer_types",
    }
)


class ConfigError(ValueError):
    """The checkpoint's config.json is missing, unreadable or describes another model."""


@dataclass(frozen=True)
class VideoXLConfig:
    """Every shape and constant of one Video-XL-2 model, built from its checkpoint's `config.json`.

    The defaults are the released 8B model's (DESIGN §1); `from_checkpoint` reads a Hugging Face
    checkpoint, `save`/`load` the copy an export or engine directory carries beside its graphs,
    and `model_hash` fingerprints it so stale artifacts are refused. Passed everywhere: no shape
    constant is written twice.
    """

    # --- SigLIP vision tower -------------------------------------------------------------
    vision_hidden_size: int = 1152
    vision_intermediate_size: int = 4304
    vision_num_heads: int = 16
    vision_num_layers: int = 27  # layers present in the checkpoint
    vision_select_layer: int = -2  # hidden_states[-2]: output of layer 26, before post-LN
    vision_layer_norm_eps: float = 1e-6
    image_size: int = 384
    patch_size: int = 14

    # --- DTS compressor and projector ----------------------------------------------------
    frames_per_group: int = 4  # T of the compressor; 4 frames -> one token group
    compressor_grid: int = 24  # 27x27 SigLIP grid is resized to 24x24
    compressor_groupnorm_groups: int = 32
    compressor_max_relative_position: int = 64
    pool_stride: int = 2  # 2x2 average pool after the projector: 24x24 -> 12x12

    # --- Qwen2.5 LLM ---------------------------------------------------------------------
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    vocab_size: int = 152064

    # --- Inference defaults (DESIGN §2, §3) ----------------------------------------------
    chunk_groups: int = 4  # C: groups per prefill chunk
    window_chunks: int = 3  # P: previous chunks a visual token sees in full
    block_groups: int = 4  # S: groups per bi-level decoding block
    kv_pool_stride: int = 4  # sparse blocks average-pool visual KV 144 -> 36 per group
    fps: float = 1.0
    max_fps: float = 4.0
    max_frames: int = 1024

    # ------------------------------------------------------------------------------------
    @property
    def vision_layers_used(self) -> int:
        return self.vision_num_layers + self.vision_select_layer + 1

    @property
    def vision_grid(self) -> int:
        return self.image_size // self.patch_size  # 27 for 384 / 14

    @property
    def tokens_per_group(self) -> int:
        return (self.compressor_grid // self.pool_stride) ** 2  # 144

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def __post_init__(self) -> None:
        problems = []
        if self.vision_layers_used < 1 or self.vision_layers_used > self.vision_num_layers:
            problems.append(f"vision_select_layer {self.vision_select_layer} outside 1..{self.vision_num_layers} layers")
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"{self.num_attention_heads} query heads not a multiple of {self.num_key_value_heads} KV heads")
        if self.vision_hidden_size % self.compressor_groupnorm_groups:
            problems.append(f"vision_hidden_size {self.vision_hidden_size} not divisible by GroupNorm({self.compressor_groupnorm_groups})")
        if self.compressor_grid % self.pool_stride:
            problems.append(f"compressor_grid {self.compressor_grid} not divisible by pool_stride {self.pool_stride}")
        if self.tokens_per_group % self.kv_pool_stride:
            problems.append(f"{self.tokens_per_group} tokens per group not divisible by kv_pool_stride {self.kv_pool_stride}")
        if self.frames_per_group != 4:
            problems.append("the DTS compressor halves time twice: frames_per_group must be 4")
        for name in ("chunk_groups", "block_groups", "kv_pool_stride"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.window_chunks < 0:
            problems.append(f"window_chunks must be >= 0, got {self.window_chunks}")
        if problems:
            raise ConfigError("invalid Video-XL-2 config: " + "; ".join(problems))

    # --- (de)serialisation ---------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], *, source: str = "config.json") -> "VideoXLConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type is {model_type!r}, expected one of {SUPPORTED_MODEL_TYPES} "
                "(a Video-XL-2 checkpoint such as BAAI/Video-XL-2)"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        unknown: list[str] = []
        for key, value in raw.items():
            if key in fields:
                values[key] = value
            elif key in _KNOWN_IGNORED_KEYS:
                continue
            elif key == "mm_vision_select_layer":
                values["vision_select_layer"] = int(value)
            elif key == "mm_hidden_size":
                values["vision_hidden_size"] = int(value)
            elif key == "mm_spatial_pool_stride":
                values["pool_stride"] = int(value)
            elif key == "vision_config" and isinstance(value, dict):
                values.update(_vision_fields(value))
            else:
                unknown.append(key)
        if "mm_hidden_size" in raw and "vision_config" in raw:
            vc_hidden = raw["vision_config"].get("hidden_size")
            if vc_hidden is not None and int(vc_hidden) != int(raw["mm_hidden_size"]):
                raise ConfigError(f"{source}: mm_hidden_size {raw['mm_hidden_size']} != vision_config.hidden_size {vc_hidden}")
        if unknown:
            log.warning("%s: ignoring unknown keys: %s", source, ", ".join(sorted(unknown)))
        return cls(**values)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path) -> "VideoXLConfig":
        path = Path(checkpoint_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{checkpoint_dir}: no config.json (expected a Hugging Face checkpoint directory)")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "VideoXLConfig":
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "VideoXLConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def model_hash(self) -> str:
        """Hash of the fields that shape the model's graphs (not the inference defaults)."""
        shape_fields = {k: v for k, v in self.to_dict().items() if k not in _INFERENCE_FIELDS}
        return hashlib.sha256(json.dumps(shape_fields, sort_keys=True).encode()).hexdigest()[:16]


_INFERENCE_FIELDS = frozenset(
    {"chunk_groups", "window_chunks", "block_groups", "fps", "max_fps", "max_frames"}
)


def _vision_fields(vision_config: dict[str, Any]) -> dict[str, Any]:
    mapping = {
        "hidden_size": "vision_hidden_size",
        "intermediate_size": "vision_intermediate_size",
        "num_attention_heads": "vision_num_heads",
        "num_hidden_layers": "vision_num_layers",
        "layer_norm_eps": "vision_layer_norm_eps",
        "image_size": "image_size",
        "patch_size": "patch_size",
    }
    return {ours: vision_config[theirs] for theirs, ours in mapping.items() if theirs in vision_config}
