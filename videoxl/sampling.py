"""Next-token choice shared by every backend: greedy, or temperature + top-p sampling."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def eval_generation_config(max_new_tokens: int = 1024) -> GenerationConfig:
    """The official evaluation's decoding: greedy, stop on ``<|im_end|>``.

    The eval wrapper (``generate_until`` in ``lmms_eval/models/videoxl2.py``) defaults to
    temperature 0, ``do_sample=False``, one beam and 1024 new tokens unless the benchmark's
    task sets its own limit; it decodes without special tokens and strips the answer.
    """
    return GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, stop_at_eos=True)


def next_token(logits: np.ndarray, gen: GenerationConfig, rng: np.random.Generator) -> int:
    """logits (V,) of the last position -> token id."""
    if gen.temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / gen.temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cumulative, gen.top_p) + 1)]
    kept = probs[keep] / probs[keep].sum()
    return int(keep[rng.choice(len(keep), p=kept)])
