"""Half precision against a float64 reference, with tolerances derived from the format.

Error measure: max |half - reference| / max |reference| over the whole output tensor.

Tolerance: TOL = K * u, with u the unit roundoff (2^-11 for fp16's 11-bit significand, 2^-8
for bf16's 8-bit one) and K a growth factor for the number of roundings on the path. Every
stored weight and every stored activation (norm outputs, projections, RoPE output,
attention output, residual sums, MLP products) is rounded once to the half format;
accumulation inside a matmul or the softmax is float32 in PyTorch and ONNX Runtime on the
CPU, so it adds nothing at this scale. Counted along the residual path of the tiny model:
about 22 roundings per layer (15 activations, 7 weight matrices) x 2 layers, plus
embedding, final norm and lm_head: N <= 64 for the LLM, and N <= 64 for the vision path
(2 SigLIP layers, two compressor stages, resize, projector, pool). Independent roundings add
in quadrature (the sqrt(N) * u rule of thumb for rounding errors), so K = sqrt(64) = 8 for
one path and K = sqrt(64 + 64) < 16 for vision followed by the LLM. Measured here: 2 to 3.3 u.

The float64 reference is the same model in float64 for every matmul; its RMSNorm statistics,
RoPE and attention softmax stay float32 (as in every precision), a relative error near
2^-24, negligible against u of the half formats.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from videoxl.export.llm import apply_rope
from videoxl.export.model import VideoXLModel
from videoxl.export.reference import DenseCache, DenseCausalAttention
from videoxl.runtime.pipeline import InferenceOptions, Pipeline
from videoxl.sampling import GenerationConfig
from videoxl.text import build_prompt, load_tokenizer

UNIT_ROUNDOFF = {"fp16": 2.0**-11, "bf16": 2.0**-8}
K_ONE_PATH = math.sqrt(64)  # <= 64 roundings on the LLM path, or on the vision path
K_VISION_AND_LLM = 16.0  # sqrt(64 + 64) rounded up


def relative_error(value, reference) -> float:
    value = torch.as_tensor(np.asarray(value, dtype=np.float64))
    reference = torch.as_tensor(np.asarray(reference, dtype=np.float64))
    return float((value - reference).abs().max() / reference.abs().max())


@pytest.fixture(scope="module")
def model64(tiny_checkpoint):
    return VideoXLModel.from_pretrained(tiny_checkpoint).to(torch.float64).eval()


@pytest.fixture(scope="module")
def pixels():
    """8 frames (2 groups), values in the normalised range [-1, 1]."""
    return torch.randn(8, 3, 384, 384, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    cache = DenseCache.empty(model.cfg, model.dtype)
    with torch.no_grad():
        hidden = model.forward_hidden(
            model.model.embed_tokens(ids), torch.arange(len(ids)), DenseCausalAttention(cache, model.cfg.head_dim**-0.5)
        )
        return model.lm_head(hidden).double()


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_pytorch_half_llm_and_vision_within_the_format_tolerance(tiny_checkpoint, model64, pixels, dtype):
    half = VideoXLModel.from_pretrained(tiny_checkpoint, dtype=dtype)
    tol = K_ONE_PATH * UNIT_ROUNDOFF[dtype]
    for seed in range(2):
        ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(seed))
        err = relative_error(_logits(half, ids), _logits(model64, ids))
        assert 0 < err <= tol, f"{dtype} logits: {err:.2e} > {tol:.2e}"
    with torch.no_grad():
        err = relative_error(half.encode_frames(pixels).double(), model64.encode_frames(pixels.double()))
    assert 0 < err <= tol, f"{dtype} vision: {err:.2e} > {tol:.2e}"


def test_rope_stays_float32_in_fp16():
    """RoPE of an fp16 model is the float32 rotation rounded once to fp16.

    The official fp16 load keeps its cos/sin tables in fp16 (the Hugging Face rotary module
    casts them to the activations' dtype), an extra rounding of order u per table entry.
    We do not copy that: the tables and the rotation stay float32, one rounding at the end.
    """
    x = torch.randn(64, 2, 16, generator=torch.Generator().manual_seed(3)).half()
    positions = torch.arange(64) * 500  # up to 31,500: fp16 tables would be visibly coarse
    assert torch.equal(apply_rope(x, positions, 1e6), apply_rope(x.float(), positions, 1e6).half())


# --- ONNX Runtime, fp16 export: stable entry points only (vision output, Pipeline end to end) ---


@pytest.fixture(scope="module")
def onnx16(tiny_checkpoint, tmp_path_factory):
    from videoxl.export.onnx_export import export_onnx

    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("onnx16") / "fp16", dtype="fp16", max_frames=64)


def record_logits(backend) -> list[np.ndarray]:
    """Logits of every decode step the pipeline runs on `backend`, as float64.

    The one place that reads the LLM's per-step output; everything else goes through the
    Pipeline, so a change of the graphs' inputs only touches this helper.
    """
    steps: list[np.ndarray] = []
    decode = backend.decode

    def recording(*args, **kwargs):
        out = decode(*args, **kwargs)
        steps.append(np.asarray(out, dtype=np.float64).reshape(-1))  # decode returns the logits
        return out

    backend.decode = recording
    return steps


def _answer(backend, tokenizer, pixels: np.ndarray, steps: int):
    """Vision then the whole runtime loop; returns (tokens, vision output, logits per decode call)."""
    logits = record_logits(backend)
    visual = backend.encode_frames(pixels)
    layout, _ = build_prompt(tokenizer, "What is shown?", [0.0, 4.0], tokens_per_group=backend.config.tokens_per_group)
    options = InferenceOptions(chunk_groups=1, window_chunks=1, block_groups=1, dense_blocks="all")
    answer = Pipeline(backend, tokenizer).answer_tokens(
        layout, np.asarray(visual, dtype=np.float32), options=options, gen=GenerationConfig(max_new_tokens=steps)
    )
    return answer.token_ids, np.asarray(visual, dtype=np.float64), logits


def test_onnxruntime_fp16_within_the_format_tolerance(tiny_checkpoint, model64, onnx16, pixels):
    from videoxl.export.torch_backend import TorchBackend
    from videoxl.runtime.ort_backend import OnnxRuntimeBackend

    tokenizer = load_tokenizer(tiny_checkpoint)
    frames = pixels.numpy()
    reference = TorchBackend(tiny_checkpoint, model=model64)  # the same loop on the float64 model
    ref_tokens, ref_visual, ref_logits = _answer(reference, tokenizer, frames, steps=6)
    ort = OnnxRuntimeBackend(onnx16)
    assert ort.float_dtype == np.float16
    tokens, visual, logits = _answer(ort, tokenizer, frames, steps=6)

    u = UNIT_ROUNDOFF["fp16"]
    assert 0 < relative_error(visual, ref_visual) <= K_ONE_PATH * u
    assert tokens == ref_tokens
    for step, (ours, ref) in enumerate(zip(logits, ref_logits)):  # the question pass, then each new token
        assert relative_error(ours, ref) <= K_VISION_AND_LLM * u, f"decode call {step}"


def _greedy_margin(logits: np.ndarray) -> float:
    top2 = np.sort(logits)[-2:]
    return float((top2[1] - top2[0]) / np.abs(logits).max())


@pytest.mark.parametrize("backend_kind", ["torch", "onnxruntime"])
def test_fp16_greedy_tokens_match_fp32(tiny_checkpoint, tiny_onnx, onnx16, pixels, backend_kind):
    """The greedy tokens are the same whenever each step's top-2 margin exceeds twice the
    fp16 error bound (then no rounding can swap them); that precondition is asserted too,
    so the equality is a consequence of the tolerance, not luck."""
    from videoxl.export.torch_backend import TorchBackend
    from videoxl.runtime.ort_backend import OnnxRuntimeBackend

    tokenizer = load_tokenizer(tiny_checkpoint)
    if backend_kind == "torch":
        fp32, fp16 = TorchBackend(tiny_checkpoint), TorchBackend(tiny_checkpoint, dtype="fp16")
    else:
        fp32, fp16 = OnnxRuntimeBackend(tiny_onnx), OnnxRuntimeBackend(onnx16)
    tokens32, _, logits32 = _answer(fp32, tokenizer, pixels.numpy(), steps=8)
    tokens16, _, _ = _answer(fp16, tokenizer, pixels.numpy(), steps=8)
    bound = K_VISION_AND_LLM * UNIT_ROUNDOFF["fp16"]
    assert len(tokens32) == 8
    assert all(_greedy_margin(step) > 2 * bound for step in logits32[: len(tokens32)])
    assert tokens16 == tokens32
