"""Weight-only int8/int4 exports: the arithmetic, the graph form, ONNX Runtime's fusion, accuracy gates.

Accuracy gates against the fp32 export, on ONNX Runtime (what `videoxl run` uses), teacher-forced:
both exports decode the fp32 run's greedy tokens with the same dense blocks, so every step
compares logits of the same context.

Error model. Rounding to a grid of step s = absmax / qmax leaves a uniform error of RMS s/sqrt(12)
per weight; for N(0, sigma) weights absmax ~ 2.5 sigma over a 64-wide channel (int8) and ~ 2.2
sigma over a 32-row block (int4), so one matmul's relative RMS error is

    int8 (qmax 127): e_w = 2.5 / (127 sqrt(12)) = 0.0057      int4 (qmax 7): e_w = 2.2 / (7 sqrt(12)) = 0.091

ONNX Runtime's fused MatMulNBits runs at its default accuracy level 4: activations are quantized
to int8 per block too, adding e_a ~ 0.0057 per matmul in quadrature (measured: the int8 export's
logits error is 1.6 % at accuracy level 0 and 2.9 % at level 4). The tiny model's logits pass
N = 15 quantized linears (2 layers x 7, lm_head), independent errors add in quadrature:

    E = sqrt(N) x sqrt(e_w^2 + e_a^2)          int8: 0.031      int4: 0.35

Gates: relative RMS error of the logits within E, i.e. 1 - cosine <= E^2 / 2; max error
max|q - f| / max|f| <= 2 E. Greedy tokens: int8 must choose fp32's token at every step whose
fp32 top-2 margin exceeds 2 x 2E (no error within the bound can swap them; at least 4 such steps
exist, so the check is not vacuous), and at >= 30 of 32 steps overall. int4: every fp32 margin of
this random model (at most 0.29 of max |logit|) lies below its bound, so which near-tie wins is
not determined by the format: the gate is >= 16 of 32 steps (chance is 1 in ~95 printable tokens).
Measured numbers are in bench/RESULTS.md ("Weight-only int8/int4").
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from videoxl.cli import main
from videoxl.export.quantize import dequantize_weight, pack_int4, quantize_weight
from videoxl.runtime.ort_backend import OnnxRuntimeBackend
from videoxl.runtime.pipeline import InferenceOptions, Pipeline
from videoxl.sampling import GenerationConfig
from videoxl.weight_format import WeightFormat, WeightFormatError, quantized_linears

STEPS = 32
GEOMETRY = dict(chunk_groups=2, window_chunks=1, block_groups=2)
MODES = [  # those of tests/runtime/test_pipeline.py
    ("dense", "dense", "all", "evaluation"),
    ("chunked", "dense", "all", "evaluation"),
    ("chunked", "bilevel", 1, "evaluation"),
    ("chunked", "bilevel", (3,), "evaluation"),
    ("dense", "bilevel", 2, "evaluation"),
    ("chunked", "bilevel", 1, "streaming"),
]
QUANTIZED_LINEARS_ON_PATH = 15  # 2 layers x 7 + lm_head
E_W = {"int8": 2.5 / (127 * math.sqrt(12)), "int4": 2.2 / (7 * math.sqrt(12))}
E_A = 2.5 / (127 * math.sqrt(12))  # MatMulNBits accuracy level 4: int8 activations
BOUND = {f: math.sqrt(QUANTIZED_LINEARS_ON_PATH) * math.hypot(E_W[f], E_A) for f in E_W}
MIN_AGREEMENT = {"int8": 30, "int4": 16}


# --- the arithmetic ----------------------------------------------------------------------------
@pytest.mark.parametrize("bits,block", [(8, None), (4, 32), (4, 128)])
def test_every_weight_within_half_a_step(bits, block):
    w = np.random.default_rng(0).standard_normal((256, 48)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero channel / block must not divide by zero
    q, scale = quantize_weight(w, bits, block, np.dtype(np.float32))
    qmax = {8: 127, 4: 7}[bits]
    assert q.dtype == np.int8 and np.abs(q).max() == qmax and np.abs(q).min() == 0
    assert scale.shape == ((48,) if bits == 8 else (256 // block, 48))
    step = np.broadcast_to(scale[None] if bits == 8 else np.repeat(scale, block, axis=0), w.shape)
    error = np.abs(dequantize_weight(q, scale, bits, block) - w)
    assert np.all(error <= step / 2 * (1 + 1e-6))
    assert np.all(dequantize_weight(q, scale, bits, block)[:, 3] == 0)


def test_int4_packing_is_what_onnx_reads():
    q = np.random.default_rng(1).integers(-7, 8, size=(6, 5)).astype(np.int8)  # odd count: a padded last byte
    tensor = onnx.helper.make_tensor("w", onnx.TensorProto.INT4, q.shape, pack_int4(q), raw=True)
    np.testing.assert_array_equal(numpy_helper.to_array(tensor).astype(np.int8), q)


# --- flags -------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,message", [
    (["--weights", "int3"], "--weights 'int3' is not one of fp, int8, int4"),
    (["--weights", "int4", "--block-size", "0"], "--block-size 0: must be a power of two >= 16"),
    (["--weights", "int4", "--block-size", "48"], "--block-size 48: must be a power of two"),
    (["--weights", "int8", "--block-size", "64"], "--block-size applies to --weights int4 only"),
    (["--weights", "int4"], "--block-size 128 does not divide the linear input width(s) 64 (widths 64, 128); use --block-size 16 or 32 or 64"),
])
def test_bad_weight_flags_are_one_line_errors(tiny_checkpoint, tmp_path, capsys, flags, message):
    assert main(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_block_size_must_divide_the_real_widths():
    from videoxl.config import VideoXLConfig

    WeightFormat.parse("int4", 128).check_widths(VideoXLConfig())  # 1152, 3584, 18944 are multiples of 128
    with pytest.raises(WeightFormatError, match="does not divide the linear input width.s. 1152"):
        WeightFormat.parse("int4", 256).check_widths(VideoXLConfig())


# --- the graph form ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["int8", "int4"])
def test_graph_form_and_manifest(tiny_onnx_quantized, tiny_model, name):
    root = tiny_onnx_quantized(name)
    manifest = json.loads((root / "export_manifest.json").read_text())
    assert manifest["weights"]["format"] == name and manifest["weights"].get("block_size") == (32 if name == "int4" else None)
    graph = onnx.load(str(root / "decode.onnx")).graph
    inits = {t.name: t for t in graph.initializer}
    dq = {n.input[0].removesuffix(".weight.T.q"): n for n in graph.node if n.op_type == "DequantizeLinear"}
    llm = [lin for lin in quantized_linears(tiny_model.cfg) if not lin.name.startswith("model.mm_projector")]
    assert sorted(dq) == sorted(lin.name for lin in llm)
    for lin in llm:
        node, bits = dq[lin.name], 8 if name == "int8" or lin.name == "lm_head" else 4
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        values, scale = inits[node.input[0]], inits[node.input[1]]
        assert values.data_type == (onnx.TensorProto.INT8 if bits == 8 else onnx.TensorProto.INT4)
        assert list(values.dims) == [lin.in_features, lin.out_features]
        assert attrs == ({"axis": 1} if bits == 8 else {"axis": 0, "block_size": 32})
        assert list(scale.dims) == ([lin.out_features] if bits == 8 else [lin.in_features // 32, lin.out_features])
        assert f"{lin.name}.weight.T" not in inits  # no float copy left behind
    assert inits["model.embed_tokens.weight"].data_type == onnx.TensorProto.FLOAT  # embeddings stay float
    vision = onnx.load(str(root / "vision.onnx")).graph
    assert sorted(n.input[0] for n in vision.node if n.op_type == "DequantizeLinear") == [
        "model.mm_projector.0.weight.T.q", "model.mm_projector.2.weight.T.q"]


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_onnxruntime_fuses_every_quantized_linear_into_matmulnbits(tiny_onnx_quantized, tmp_path, name):
    root = tiny_onnx_quantized(name)
    for graph, linears in (("decode", 15), ("vision", 2)):
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{graph}.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(root / f"{graph}.onnx"), options, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(str(tmp_path / f"{graph}.onnx")).graph.node]
        assert ops.count("MatMulNBits") == linears and "DequantizeLinear" not in ops, graph


def test_int4_export_with_external_data_matches_inline(tiny_checkpoint, tiny_onnx_quantized, tmp_path):
    """The real-size form (weights in .data files, the LLM graphs sharing one) on the tiny model.

    Scales under 1 KiB stay inline in the graph that quantized them: every later graph needs its
    own copy (the decode graph used to lack them). The vision graph, rewritten with its quantized
    projector, goes back to one fresh .data file: no stale copy of the float weights before it.
    The free-space check counts the quantized bytes, not the float ones.
    """
    from videoxl.config import VideoXLConfig
    from videoxl.export.onnx_export import estimated_export_bytes, export_onnx

    out = export_onnx(tiny_checkpoint, tmp_path / "int4x", max_frames=256, weights=WeightFormat.parse("int4", 32), external_data=True)
    for graph in ("prefill_chunk", "decode", "score", "vision"):
        onnx.checker.check_model(str(out / f"{graph}.onnx"))
    vision = onnx.load(str(out / "vision.onnx"), load_external_data=False)
    spans = [{e.key: e.value for e in t.external_data} for t in vision.graph.initializer if t.external_data]
    data = out / "vision.onnx.data"
    assert {s["location"] for s in spans} == {"vision.onnx.data"}
    assert max(int(s.get("offset", 0)) + int(s["length"]) for s in spans) == data.stat().st_size
    assert sum(int(s["length"]) for s in spans) > 0.95 * data.stat().st_size  # alignment padding only
    assert data.stat().st_mode & 0o777 == (out / "vision.onnx").stat().st_mode & 0o777
    written = sum(p.stat().st_size for p in out.iterdir())
    fmt, cfg = WeightFormat.parse("int4", 32), VideoXLConfig.from_checkpoint(tiny_checkpoint)
    estimate, _ = estimated_export_bytes(tiny_checkpoint, "fp32", external_data=True, weights=fmt, config=cfg)
    assert written <= estimate < estimated_export_bytes(tiny_checkpoint, "fp32", external_data=True)[0]  # the free-space check
    external, inline = OnnxRuntimeBackend(out), OnnxRuntimeBackend(tiny_onnx_quantized("int4"))
    pixels = np.random.default_rng(0).standard_normal((4, 3, 384, 384)).astype(np.float32)
    assert np.abs(external.encode_frames(pixels) - inline.encode_frames(pixels)).max() <= 1e-6
    ids = np.array([1, 2, 3, 4, 5], dtype=np.int64)
    logits = [b.decode(b.new_decode_cache(8), ids) for b in (external, inline)]
    np.testing.assert_array_equal(logits[0], logits[1])


# --- accuracy gates ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipelines(tiny_onnx, tiny_onnx_quantized, tiny_tokenizer):
    return {name: Pipeline(OnnxRuntimeBackend(root), tiny_tokenizer)
            for name, root in (("fp32", tiny_onnx), ("int8", tiny_onnx_quantized("int8")), ("int4", tiny_onnx_quantized("int4")))}


@pytest.fixture(scope="module")
def case(tiny_model, make_layout):
    layout = make_layout(10, "Which colour comes last?")
    visual = torch.randn(10, tiny_model.cfg.tokens_per_group, tiny_model.cfg.hidden_size, generator=torch.Generator().manual_seed(11))
    return layout, visual.numpy()


def teacher_forced_logits(pipeline, layout, visual, options, tokens, dense_blocks=None):
    """Logits of every decode step with ``tokens`` fed back (the question pass first); and the dense blocks."""
    store = pipeline.prefill(layout, visual, options)
    if dense_blocks is None:
        dense_blocks, _ = pipeline.choose_dense_blocks(store, layout, options)
    suffix = layout.input_ids[layout.suffix_start :]
    cache, _ = store.build_decode_cache(dense_blocks, extra_capacity=len(suffix) + len(tokens))
    logits, ids = [], suffix
    for token in tokens:
        logits.append(np.asarray(pipeline.backend.decode(cache, ids), np.float64).reshape(-1))
        ids = np.array([token], dtype=np.int64)
    return logits, dense_blocks


@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("prefill,decode,dense_blocks,rule", MODES)
def test_accuracy_gates_against_fp32(pipelines, case, name, prefill, decode, dense_blocks, rule):
    layout, visual = case
    options = InferenceOptions(prefill=prefill, decode=decode, dense_blocks=dense_blocks, prefill_rule=rule, **GEOMETRY)
    gen = GenerationConfig(max_new_tokens=STEPS, stop_at_eos=False)
    tokens = pipelines["fp32"].answer_tokens(layout, visual, options=options, gen=gen).token_ids
    assert len(tokens) == STEPS
    reference, chosen = teacher_forced_logits(pipelines["fp32"], layout, visual, options, tokens)
    quantized, _ = teacher_forced_logits(pipelines[name], layout, visual, options, tokens, chosen)

    bound = BOUND[name]
    max_error = max(np.abs(q - f).max() / np.abs(f).max() for q, f in zip(quantized, reference))
    cosine = min(q @ f / (np.linalg.norm(q) * np.linalg.norm(f)) for q, f in zip(quantized, reference))
    assert 0 < max_error <= 2 * bound
    assert 1 - cosine <= bound**2 / 2
    margins = [float(np.diff(np.sort(f)[-2:])[0] / np.abs(f).max()) for f in reference]
    agree = [int(q.argmax()) == int(f.argmax()) == t for q, f, t in zip(quantized, reference, tokens)]
    assert sum(agree) >= MIN_AGREEMENT[name], f"{sum(agree)} of {STEPS} greedy tokens agree"
    if name == "int8":
        decided = [a for a, m in zip(agree, margins) if m > 2 * 2 * bound]
        assert len(decided) >= 4 and all(decided)


def test_free_space_estimate_of_the_real_int4_export(tmp_path):
    """The real shapes (a header-only shard: the estimate reads nothing else) against the measured
    8B int4 fp32 export: 8,170,631,106 bytes written (bench/RESULTS.md, "Real size on the CPU")."""
    from videoxl.config import VideoXLConfig
    from videoxl.export.onnx_export import estimated_export_bytes
    from videoxl.synthetic import real_hf_config, safetensors_header
    from videoxl.tiny import tiny_checkpoint_shapes

    shapes = tiny_checkpoint_shapes(real_hf_config())
    (tmp_path / "model.safetensors").write_bytes(safetensors_header(shapes, list(shapes)))
    measured = 8_170_631_106
    estimate, external = estimated_export_bytes(
        tmp_path, "fp32", external_data=None, weights=WeightFormat.parse("int4"), config=VideoXLConfig()
    )
    assert external and measured <= estimate <= 1.01 * measured


# --- the tiled arithmetic against the plain formulation ----------------------------------------
def reference_quantize(w: np.ndarray, bits: int, block: int | None, scale_dtype) -> tuple[np.ndarray, np.ndarray]:
    """The format in whole-array numpy (the exporter's first form): what quantize_weight must equal bit for bit."""
    w = np.asarray(w, dtype=np.float32)
    k, n = w.shape
    qmax = {8: 127, 4: 7}[bits]
    blocks = w[None] if bits == 8 else w.reshape(k // block, block, n)
    absmax = np.abs(blocks).max(axis=1)
    scale = np.where(absmax > 0, absmax / qmax, 1.0)
    if scale_dtype == "bf16":  # round to nearest even bf16, kept as float32
        u = scale.astype(np.float32).view(np.uint32)
        scale = (((u + ((u >> 16) & 1) + 0x7FFF) >> 16) << 16).astype(np.uint32).view(np.float32)
    else:
        scale = scale.astype(scale_dtype)
    q = np.clip(np.rint(blocks / scale.astype(np.float32)[:, None, :]), -qmax, qmax).astype(np.int8).reshape(k, n)
    return q, (scale[0] if bits == 8 else scale)


def reference_pack_int4(q: np.ndarray) -> bytes:
    flat = q.astype(np.int8).ravel()
    if flat.size % 2:
        flat = np.append(flat, np.int8(0))
    nibbles = (flat & 0x0F).astype(np.uint8)
    return (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()


def awkward_weight(k: int, n: int, block: int, seed: int) -> np.ndarray:
    """Random weights with the cases tiling and rounding can get wrong: an all-zero block, a column
    of zeros and -0.0, ties (exact .5 multiples of a power-of-two scale), +-absmax in one block."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) * rng.choice([1e-3, 1.0, 30.0], size=(1, n))).astype(np.float32)
    w[:block, 0] = 0.0  # an all-zero block (int8: a zero column) keeps scale 1
    w[:, 1] = np.where(rng.random(k) < 0.5, -0.0, 0.0)
    # column 2: absmax 7 * 2^-3 (int4) or 127 * 2^-3 (int8) in every block, so the scale is exactly 2^-3 in
    # every dtype and w / scale lands on .5 ties: rint must take the even neighbour
    half_steps = rng.integers(-13, 14, size=k) + 0.5
    w[:, 2] = np.clip(half_steps, -6.5, 6.5) / 8
    w[::block, 2] = 7 / 8
    w[1::block, 3] = -w[::block, 3] if block > 1 else w[1::block, 3]  # +- the same absmax
    return w


SHAPES = [(32, 5), (64, 33), (256, 7), (4096, 300), (1024, 2500), (128, 70000)]  # odd widths, one tile, many tiles, a wide row


@pytest.mark.parametrize("scale_dtype", [np.dtype(np.float32), np.dtype(np.float16), "bf16"], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("bits,block", [(8, None), (4, 16), (4, 32), (4, 128)])
@pytest.mark.parametrize("k,n", SHAPES)
def test_quantize_weight_equals_the_plain_formulation_bit_for_bit(k, n, bits, block, scale_dtype):
    if block and k % block:
        pytest.skip(f"block {block} does not divide {k} input rows (refused by --block-size)")
    w = awkward_weight(k, n, block or k, seed=k * n + bits)
    q, scale = quantize_weight(w, bits, block, scale_dtype)
    q_ref, scale_ref = reference_quantize(w, bits, block, scale_dtype)
    assert q.dtype == np.int8 and scale.dtype == scale_ref.dtype and scale.shape == scale_ref.shape
    np.testing.assert_array_equal(scale.view(np.uint8), scale_ref.view(np.uint8))  # bits, not values: -0.0 or NaN would differ
    np.testing.assert_array_equal(q, q_ref)
    if bits == 4:
        assert pack_int4(q) == reference_pack_int4(q)


def test_ties_round_to_even():
    """Not vacuous: the tie column really holds .5 quotients, and they go to the even neighbour."""
    for bits, block, qmax in ((4, 32, 7), (8, None, 127)):
        w = awkward_weight(256, 8, block or 256, seed=3)
        if bits == 8:
            w[0, 2] = 127 / 8  # int8: absmax 127 / 8, scale exactly 1 / 8
        q, scale = quantize_weight(w, bits, block, np.dtype(np.float32))
        assert np.all(scale[..., 2] == 0.125)
        quotient = w[:, 2] * 8
        ties = (quotient % 1) == 0.5
        assert ties.sum() > 50
        np.testing.assert_array_equal(q[ties, 2], 2 * np.round(quotient[ties] / 2))


def test_pack_int4_equals_the_plain_formulation():
    rng = np.random.default_rng(2)
    for shape in ((1, 1), (3, 5), (128, 257), (4096, 512)):
        q = rng.integers(-8, 8, size=shape).astype(np.int8)
        assert pack_int4(q) == reference_pack_int4(q)
