"""The memory planner: DESIGN §3 arithmetic on the v2 KV regions, the reference budgets, advice that re-plans true."""

from __future__ import annotations

import math
import re

import pytest

from videoxl import graphs
from videoxl.config import ConfigError, VideoXLConfig
from videoxl.engines.profiles import BuildLimits, dimension_ranges, format_bytes, kv_cache_bytes, parse_bytes
from videoxl.runtime.cuda_memory import ArenaOverflowError
from videoxl.weight_format import WeightFormat
from videoxl.runtime.memory_plan import (
    KVRows,
    engine_weight_bytes,
    estimate_params,
    fit_kv_rows,
    kv_bytes_per_token,
    kv_rows_for,
    decode_activation_bytes,
    max_frames_that_fit,
    plan_memory,
    prefill_activation_bytes,
    query_io_bytes,
    score_activation_bytes,
    vision_activation_bytes,
)

GiB = 2**30
REAL = VideoXLConfig()
LIMITS = {"max_frames": 64, "chunk_groups": 2, "window_chunks": 1, "timestamp_tokens": 16, "prefix_tokens": 64,
          "suffix_tokens": 256, "answer_tokens": 256, "vision_batch_frames": 32}  # an engine manifest's limits


def test_kv_bytes_per_token_is_56_kib_for_the_real_model():
    assert kv_bytes_per_token(REAL, 2) == 28 * 2 * 4 * 128 * 2 == 56 * 1024 == graphs.kv_bytes(REAL, 1, 2)


def test_parameter_estimate_by_hand():
    params = estimate_params(REAL)
    # Qwen2.5-7B: q (3584^2 + 3584), k and v (3584 x 512 + 512 each), o (3584^2), SwiGLU 3 x 3584 x 18944, 2 RMSNorms
    layer = (3584 * 3584 + 3584) + 2 * (3584 * 512 + 512) + 3584 * 3584 + 3 * 3584 * 18944 + 2 * 3584
    assert layer == 233_057_792
    assert params["llm"] == 28 * layer + 2 * 152064 * 3584 + 3584 == 7_615_616_512
    assert params["projector"] == 1152 * 3584 + 3584 + 3584 * 3584 + 3584
    # SigLIP: 26 layers of 4 x (1152^2 + 1152) attention + MLP 1152 <-> 4304 + 2 LayerNorms, plus embeddings
    siglip_layer = 4 * (1152**2 + 1152) + 2 * 1152 * 4304 + 4304 + 1152 + 4 * 1152
    assert params["vision"] == 26 * siglip_layer + 3 * 14 * 14 * 1152 + 1152 + 27 * 27 * 1152
    assert 8.0e9 < sum(params.values()) < 8.3e9  # "8B"


def test_parameter_estimate_equals_the_tiny_model(tiny_model):
    """The formula counts exactly the parameters the reference model holds."""
    held = sum(p.numel() for p in tiny_model.parameters())
    assert sum(estimate_params(tiny_model.cfg).values()) == held


def test_10000_frames_fit_80gb_with_both_tiers_on_the_device():
    plan = plan_memory(REAL, frames=10_000, budget_bytes=80 * GiB, dense_blocks=4)
    assert plan.fits and not plan.advice

    # by hand: 2500 groups of 144 + 6 tokens, blocks of 4 groups, top-4 dense
    kv = 57_344
    dense = 64 + 2500 * 150
    sparse = 2500 * (6 + 36)
    dense_groups = (2 + 4) * 4  # first + last + top-4 blocks
    decode = 64 + dense_groups * 150 + (2500 - dense_groups) * 42 + 64 + 256
    assert (plan.groups, plan.num_blocks, plan.dense_video_blocks) == (2500, 625, 6)
    assert [i.name for i in plan.items] == ["weights", "activations", "video KV region", "decode KV region"]
    assert all(i.where == "device" for i in plan.items)  # nothing is reloaded from the host any more
    assert plan.item("video KV region").tokens == sparse + dense
    assert plan.item("video KV region").nbytes == (sparse + dense) * kv
    assert dense * kv == 21_507_670_016  # DESIGN §3: ~21 GB of dense tier, kept whole on the device
    assert plan.item("decode KV region").nbytes == decode * kv
    # what the TensorRT backend loads: vision, and the LLM twice (prefill_chunk, decode); the score engine
    # holds no weights (graph contract v3); the export's bytes
    vision, llm = 1_016_505_408, 15_231_233_024  # vision.onnx.data; llm_weights.onnx.data less 256 B of RoPE table
    assert plan.item("weights").nbytes == vision + 2 * llm == 31_478_971_456
    assert "decode 14.19 GiB" in plan.item("weights").detail and "score holds none" in plan.item("weights").detail
    # the largest phase: the score graph writes out the suffix's probabilities over the all-sparse cache, one
    # layer at a time, beside prefill_chunk's query outputs (28 layers x 600 tokens x 28 heads x 128, fp16)
    scoring = 64 + 2500 * 42
    score_graph = 2 * 28 * 64 * (scoring + 64) * 4 + (scoring + 64) * 512 * 2
    query_io = 28 * 600 * 28 * 128 * 2
    assert plan.item("activations").nbytes == score_graph + query_io + scoring * 4 == 1_735_608_736
    assert "largest phase: question scoring" in plan.item("activations").detail
    assert plan.device_bytes == sum(i.nbytes for i in plan.items) < 63 * GiB
    assert "fits: yes" in plan.table() and "[sparse tier 105,000 | dense tier 375,064]" in plan.table()


def test_scoring_and_decode_caches_share_one_region():
    plan = plan_memory(REAL, frames=2000, budget_bytes=80 * GiB, dense_blocks=0)
    t = plan.tokens
    assert t.scoring == 64 + 500 * 42  # the prefix dense, every block sparse
    assert t.decode == 64 + 2 * 4 * 150 + (500 - 8) * 42 + 64 + 256  # first and last block dense
    assert plan.item("decode KV region").tokens == max(t.decode, t.scoring) == t.decode  # not their sum


def test_1000_frames_fit_a_16gb_jetson_with_unified_memory():
    # 8B fp16 weights are 15.1 GiB, the LLM held twice by the engines (29.3 GiB): a 16 GB Jetson needs
    # every parameter at half a byte (a what-if; int4 exports keep embeddings and lm_head wider)
    plan = plan_memory(REAL, frames=1000, budget_bytes=16 * GiB, unified_memory=True, weight_dtype_bytes=0.5)
    assert plan.fits and "unified memory" in plan.table()
    assert plan.device_bytes == sum(i.nbytes for i in plan.items)
    params = estimate_params(REAL)
    assert plan.item("weights").nbytes == sum(engine_weight_bytes(REAL, WeightFormat(), 0.5, params).values())
    vision = sum(math.ceil(params[m] / 2) for m in ("vision", "compressor", "projector"))
    assert plan.item("weights").nbytes == vision + 2 * math.ceil(params["llm"] / 2)  # no score copy

    fp16 = plan_memory(REAL, frames=1000, budget_bytes=16 * GiB, unified_memory=True)
    assert not fp16.fits
    assert any("--weights int4" in line for line in fp16.advice)
    assert not plan_memory(REAL, frames=1000, budget_bytes=16 * GiB, unified_memory=True, weight_dtype_bytes=1).fits


def test_10000_frames_do_not_fit_48gb_and_the_advice_is_true():
    plan = plan_memory(REAL, frames=10_000, budget_bytes=48 * GiB)
    assert not plan.fits
    suggested = [int(m.group(1)) for line in plan.advice if (m := re.search(r"--max-frames to (\d+)", line))]
    assert suggested == [plan.max_frames_that_fit]
    frames = suggested[0]
    assert 1000 < frames < 10_000 and frames % 4 == 0
    assert plan_memory(REAL, frames=frames, budget_bytes=48 * GiB).fits
    assert not plan_memory(REAL, frames=frames + 4, budget_bytes=48 * GiB).fits
    assert any("no frame count fits" in line for line in plan_memory(REAL, frames=1000, budget_bytes=24 * GiB).advice)


def test_advice_lowers_dense_blocks_and_kv_precision_only_when_that_fits():
    base = plan_memory(REAL, frames=2000, budget_bytes=52 * GiB, dense_blocks=0)
    assert base.fits
    # so many dense blocks that the decode region overflows; fewer fit
    heavy = plan_memory(REAL, frames=2000, budget_bytes=base.device_bytes + (1 << 20), dense_blocks=200)
    assert not heavy.fits
    line = next(line for line in heavy.advice if "--dense-blocks" in line)
    k = int(re.search(r"--dense-blocks to (\d+)", line).group(1))
    assert plan_memory(REAL, frames=2000, budget_bytes=heavy.budget_bytes, dense_blocks=k).fits
    assert not plan_memory(REAL, frames=2000, budget_bytes=heavy.budget_bytes, dense_blocks=k + 1).fits

    fp32 = plan_memory(REAL, frames=2000, budget_bytes=40 * GiB, dtype_bytes=4, weight_dtype_bytes=2)
    assert not fp32.fits
    assert any("--kv-dtype fp16" in line for line in fp32.advice)


def test_max_frames_that_fit_is_monotone_and_bounded():
    plan = plan_memory(REAL, frames=100, budget_bytes=80 * GiB)
    assert max_frames_that_fit(REAL, plan.inputs) == 100  # already fits: the request itself
    weights_only = plan_memory(REAL, frames=100, budget_bytes=10 * GiB)
    assert not weights_only.fits and weights_only.max_frames_that_fit is None
    assert any("weights alone" in line for line in weights_only.advice)


# --- the TensorRT backend's KV regions ----------------------------------------------------------
def test_kv_rows_follow_the_planner():
    cfg = VideoXLConfig()
    rows = kv_rows_for(cfg, LIMITS, 64, dense_blocks=4)
    group = 144 + 16
    # 16 groups: 4 blocks of 4 groups, all dense (first + last + top-4 >= 4)
    assert rows == KVRows(video=16 * (16 + 36) + 64 + 16 * group, decode=64 + 16 * group + 256 + 256, frames=64, dense_blocks=4)
    sparse_only = kv_rows_for(cfg, LIMITS, 64, dense_blocks=0)
    assert sparse_only.video == rows.video  # the video region does not depend on the question
    assert sparse_only.decode == 64 + 2 * 4 * group + 2 * 4 * (16 + 36) + 256 + 256  # first and last block dense


def test_kv_rows_agree_with_the_engine_builders_kv_bytes():
    """All dense at the frame limit is what `videoxl build --memory-budget` counts for the largest profile."""
    rows = kv_rows_for(REAL, LIMITS, LIMITS["max_frames"], dense_blocks=10**9)
    assert kv_cache_bytes(REAL, BuildLimits(**LIMITS), "fp16") == graphs.kv_bytes(REAL, rows.video + rows.decode, 2)


def test_fit_kv_rows_uses_the_budget_and_never_exceeds_it():
    cfg = VideoXLConfig()
    row = 4 * 128 * 2
    need = kv_rows_for(cfg, LIMITS, 64, dense_blocks=4).nbytes(28, row)
    frames, rows = fit_kv_rows(cfg, LIMITS, available_bytes=need * 3, row_bytes=row, dense_blocks=4)
    assert frames == rows.frames == 64
    ceiling = kv_rows_for(cfg, LIMITS, 64, dense_blocks=10**9)
    assert rows.decode == ceiling.decode and rows.video == ceiling.video  # spare bytes, capped at all-dense
    assert rows.nbytes(28, row) <= need * 3

    small_need = kv_rows_for(cfg, LIMITS, 32, dense_blocks=4).nbytes(28, row)
    frames, rows = fit_kv_rows(cfg, LIMITS, available_bytes=small_need + 1000, row_bytes=row, dense_blocks=4)
    assert frames == 32 and rows.nbytes(28, row) <= small_need + 1000
    assert kv_rows_for(cfg, LIMITS, 36, dense_blocks=4).nbytes(28, row) > small_need + 1000

    frames, rows = fit_kv_rows(cfg, LIMITS, available_bytes=small_need + (64 << 20), row_bytes=row, dense_blocks=4)
    planned = kv_rows_for(cfg, LIMITS, frames, dense_blocks=4)
    assert rows.nbytes(28, row) <= small_need + (64 << 20)
    assert rows.decode > planned.decode and rows.video == planned.video  # spare bytes go to the decode region

    with pytest.raises(ArenaOverflowError, match=r"bytes \(.*\) missing; raise --gpu-memory-budget"):
        fit_kv_rows(cfg, LIMITS, available_bytes=1 << 20, row_bytes=row, dense_blocks=4)


@pytest.mark.parametrize(
    "change", [dict(frames=0), dict(budget_bytes=0), dict(dense_blocks=-1), dict(weight_dtype_bytes=0)]
)
def test_invalid_requests_raise_value_error(change):
    kwargs = dict(frames=100, budget_bytes=GiB) | change
    with pytest.raises(ValueError, match="invalid memory plan request"):
        plan_memory(REAL, **kwargs)


def _plan_command(argv: list[str]) -> int:
    """`videoxl plan ARGS` through the plan subcommand's own parser and handler."""
    import argparse

    from videoxl.runtime.memory_plan import add_plan_parser

    parser = argparse.ArgumentParser(prog="videoxl")
    add_plan_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", *argv])
    return args.func(args)


def test_cli_plan_prints_the_table(capsys, tmp_path):
    assert _plan_command(["--config", "real", "--frames", "10000", "--gpu-memory-budget", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "video KV region" in out and "decode KV region" in out and "fits: yes" in out
    assert "reload" not in out and "host total" not in out
    assert _plan_command(["--config", "real", "--frames", "10000", "--gpu-memory-budget", "80GiB", "--no-plugins"]) == 0
    assert re.search(r"prefill chunk 3\.\d\d GiB", capsys.readouterr().out)  # the inlined body's timestamp-query attention

    assert _plan_command(["--config", "real", "--frames", "10000", "--gpu-memory-budget", "48GiB", "--dense-tier", "device"]) == 1
    out = capsys.readouterr().out
    assert "--max-frames" in out and "--dense-tier host" in out  # the advice names the host tier too

    REAL.save(tmp_path / "config.json")  # an ONNX or engine directory's config
    assert _plan_command(["--config", str(tmp_path), "--frames", "16", "--gpu-memory-budget", "16GiB",
                          "--unified-memory", "--weights", "int4"]) == 0
    assert "unified memory" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="no config.json"):
        _plan_command(["--config", str(tmp_path / "nope"), "--frames", "4", "--gpu-memory-budget", "1GiB"])
    with pytest.raises(SystemExit):
        _plan_command(["--config", "real", "--frames", "4", "--gpu-memory-budget", "1GiB", "--dense-tier", "disk"])
    assert _plan_command(["--config", "real", "--frames", "6000", "--gpu-memory-budget", "40GiB", "--dense-tier", "host",
                          "--host-memory", "64GiB"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"dense KV tier +host", out) and "host total (pinned)" in out and "of 64.00 GiB free" in out
    assert "frames that fit this budget: 3,176 with the dense tier on the device, 7,396 with the dense tier in pinned host memory" in out


def test_cli_plan_reads_a_checkpoint_config(capsys, tiny_checkpoint):
    assert _plan_command(["--config", str(tiny_checkpoint), "--frames", "64", "--gpu-memory-budget", "1GiB"]) == 0
    assert "64 frames -> 16 groups" in capsys.readouterr().out


def test_cli_plan_rejects_a_missing_config(capsys, tmp_path):
    from videoxl.cli import main

    assert main(["plan", "--config", str(tmp_path / "nope"), "--frames", "4", "--gpu-memory-budget", "1GiB"]) == 2
    assert "no config.json" in capsys.readouterr().err


# --- weight formats (videoxl export --weights): real bytes, the 16 GB Jetson Orin question ---------
@pytest.mark.parametrize("name", ["fp", "int8", "int4"])
def test_weight_bytes_equal_the_exported_tiny_model(tiny_onnx, tiny_onnx_quantized, tiny_model, name):
    """The planner's bytes per format are the bytes the export holds: the LLM's initializers, the projector's."""
    import onnx

    from videoxl.weight_format import WeightFormat, quantized_linears, weight_bytes

    root = tiny_onnx if name == "fp" else tiny_onnx_quantized(name)
    fmt = WeightFormat.parse(name, 32 if name == "int4" else None)
    cfg = tiny_model.cfg
    planned = weight_bytes(cfg, fmt, 4, estimate_params(cfg))
    decode = onnx.load(str(root / "decode.onnx")).graph.initializer  # embeddings, every layer, final norm, lm_head
    held = sum(len(t.raw_data) for t in decode if t.name != "rope_inv_freq")
    assert held == planned["llm"]
    vision = {t.name: len(t.raw_data) for t in onnx.load(str(root / "vision.onnx")).graph.initializer}
    projector = [lin for lin in quantized_linears(cfg) if lin.name.startswith("model.mm_projector")]
    if fmt.quantized:
        held_projector = sum(n for t, n in vision.items() if t.startswith("model.mm_projector"))
        assert held_projector == sum(fmt.linear_bytes(lin, 4) for lin in projector)
    assert planned["projector"] == sum(fmt.linear_bytes(lin, 4) for lin in projector) + 4 * 2 * cfg.hidden_size  # + biases
    if name == "int4":  # the LLM's linears: int4 + fp32 scale per 32 rows = 0.625 B/param; lm_head int8
        assert planned["llm"] < 0.4 * weight_bytes(cfg, WeightFormat(), 4, estimate_params(cfg))["llm"]


ORIN = 16 * 10**9  # a 16 GB Jetson Orin: host and device share these bytes


@pytest.mark.parametrize("name,fits_1000,most_frames", [("fp", False, None), ("int8", False, None), ("int4", True, (1000, 1400))])
def test_jetson_orin_16gb_with_quantized_weights(name, fits_1000, most_frames):
    """The engines hold the LLM twice (prefill_chunk, decode; score has no weights): fp16 (29.3 GiB) and
    int8 (16.1 GiB) weights alone exceed 16 GB; int4 (block 128, 10.2 GiB) fits 1,260 frames, re-planned true."""
    assert plan_memory(REAL, frames=1000, budget_bytes=ORIN, unified_memory=True, weights=name).fits == fits_1000
    plan = plan_memory(REAL, frames=10_000, budget_bytes=ORIN, unified_memory=True, weights=name)
    assert not plan.fits
    if most_frames is None:
        assert plan.max_frames_that_fit is None and any("weights alone" in line for line in plan.advice)
        assert any(re.search(r"int4 \(block 128\) weights \(--weights int4\) fit \d+ frames", line) for line in plan.advice)
        return
    frames = plan.max_frames_that_fit
    assert most_frames[0] < frames < most_frames[1] and frames % 4 == 0
    assert plan_memory(REAL, frames=frames, budget_bytes=ORIN, unified_memory=True, weights=name).fits
    assert not plan_memory(REAL, frames=frames + 4, budget_bytes=ORIN, unified_memory=True, weights=name).fits


def test_real_weight_bytes_by_hand():
    from videoxl.weight_format import Linear, WeightFormat

    fp, int8, int4 = (plan_memory(REAL, frames=4, budget_bytes=80 * GiB, weights=w).item("weights").nbytes for w in ("fp", "int8", "int4"))
    params = estimate_params(REAL)
    # fp: every parameter in fp16, the LLM's twice (prefill_chunk, decode; the score engine holds none)
    assert fp == sum(engine_weight_bytes(REAL, WeightFormat(), 2, params).values()) == 31_478_971_456
    # int4: per layer q, o 3584^2, k, v 3584 x 512, gate, up, down 3 x 3584 x 18944 at 0.5 B + an fp16 scale per 128 rows

    def saved(params_of_linears: int) -> int:
        return params_of_linears * 2 - params_of_linears // 2 - params_of_linears // 128 * 2

    linear = 2 * 3584**2 + 2 * 3584 * 512 + 3 * 3584 * 18944
    lm_head = 3584 * 152064
    projector = 1152 * 3584 + 3584**2
    llm_saved = 28 * saved(linear) + (lm_head * 2 - lm_head - 152064 * 2)
    assert fp - int4 == saved(projector) + 2 * llm_saved
    assert 10.2 * GiB < int4 < 10.3 * GiB and 16.1 * GiB < int8 < 16.2 * GiB
    assert WeightFormat.parse("int4", 64).linear_bytes(Linear("x", 128, 8), 2) == 128 * 8 // 2 + (128 // 64) * 8 * 2
    assert WeightFormat.parse("int8").linear_bytes(Linear("x", 128, 8), 2) == 128 * 8 + 8 * 2


# --- the dense tier in pinned host memory --------------------------------------------------------------
def test_the_dense_tier_in_host_memory_by_hand():
    """10,000 frames on 24 GiB: the device keeps the sparse tier, the resident rows and the staging."""
    plan = plan_memory(REAL, frames=10_000, budget_bytes=24 * GiB, dense_tier="host", host_budget_bytes=64 * GiB)
    kv, t = 57_344, plan.tokens
    dense, sparse = 64 + 2500 * 150, 2500 * 42
    resident = 64 + 2500 * 6 + 2 * (3 + 1) * 4 * 144  # prefix, every timestamp row, 2 x (window + chunk) of visual rows
    staging = (1 + 4) * 4 * 150  # the first block and the top-4, whole
    assert (t.dense, t.sparse, t.resident, t.staging) == (dense, sparse, resident, staging)
    assert [(i.name, i.where) for i in plan.items] == [
        ("weights", "device"), ("activations", "device"), ("video KV region", "device"), ("decode KV region", "device"),
        ("dense KV tier", "host")]
    assert plan.item("video KV region").nbytes == (sparse + resident + staging) * kv
    assert plan.item("dense KV tier").nbytes == plan.host_bytes == dense * kv
    assert plan.device_bytes == sum(i.nbytes for i in plan.items if i.where == "device")
    # the streaming rule reads no whole past: the inlined prefill is smaller than with the dense tier on the device
    plan_inlined = plan_memory(REAL, frames=10_000, budget_bytes=24 * GiB, dense_tier="host", host_budget_bytes=64 * GiB, plugins=False)
    device = plan_memory(REAL, frames=10_000, budget_bytes=24 * GiB, dense_tier="device", plugins=False)
    prefill = lambda p: parse_bytes("".join(re.search(r"prefill chunk ([\d.]+) (\w+)", p.item("activations").detail).groups()))  # noqa: E731
    assert prefill(plan_inlined) < prefill(device)
    assert not plan.fits and plan.device_bytes > 24 * GiB  # the sparse tier alone is 5.6 GiB: 10,000 frames need more


# 40 GiB: the engines' 29.32 GiB of fp16 weights (the LLM in two engines) plus ~11 GiB for KV and activations
def test_auto_keeps_the_dense_tier_on_the_device_when_it_fits_and_moves_it_when_not():
    assert plan_memory(REAL, frames=2048, budget_bytes=80 * GiB, dense_tier="auto").inputs.dense_tier == "device"  # nothing leaves an 80 GB GPU
    moved = plan_memory(REAL, frames=6000, budget_bytes=40 * GiB, dense_tier="auto", host_budget_bytes=64 * GiB)
    assert moved.fits and moved.inputs.dense_tier == "host" and moved.host_bytes > 10 * GiB
    assert "dense tier: in pinned host memory" in moved.table()
    # too little host memory: the device plan stays, with its advice
    short = plan_memory(REAL, frames=6000, budget_bytes=40 * GiB, dense_tier="auto", host_budget_bytes=8 * GiB)
    assert not short.fits and short.inputs.dense_tier == "device"
    starved = plan_memory(REAL, frames=6000, budget_bytes=40 * GiB, dense_tier="host", host_budget_bytes=8 * GiB)
    assert not starved.fits and any("pinned dense tier needs" in line for line in starved.advice)


@pytest.mark.parametrize(("budget", "device_frames", "host_frames"), [(80, 15_392, 36_984), (40, 3_176, 7_396)])
def test_frames_that_fit_either_way(budget, device_frames, host_frames):
    plan = plan_memory(REAL, frames=1000, budget_bytes=budget * GiB, host_budget_bytes=256 * GiB)
    assert dict(plan.frames_fit) == {"device": device_frames, "host": host_frames}
    for tier, frames in plan.frames_fit:  # each is the largest that fits
        assert plan_memory(REAL, frames=frames, budget_bytes=budget * GiB, dense_tier=tier, host_budget_bytes=256 * GiB).fits
        assert not plan_memory(REAL, frames=frames + 4, budget_bytes=budget * GiB, dense_tier=tier, host_budget_bytes=256 * GiB).fits


def test_advice_to_move_the_dense_tier_is_true():
    plan = plan_memory(REAL, frames=6000, budget_bytes=40 * GiB, dense_tier="device", host_budget_bytes=64 * GiB)
    line = next(line for line in plan.advice if "--dense-tier host" in line)
    assert "all 6000 frames fit" in line
    assert plan_memory(REAL, frames=6000, budget_bytes=40 * GiB, dense_tier="host", host_budget_bytes=64 * GiB).fits


def test_fit_kv_rows_with_the_dense_tier_in_host_memory():
    cfg, row = VideoXLConfig(), 4 * 128 * 2
    limits = LIMITS | {"max_frames": 2048, "chunk_groups": 4, "window_chunks": 3}
    device_rows = kv_rows_for(cfg, limits, 2048, dense_blocks=4)
    host_rows = kv_rows_for(cfg, limits, 2048, dense_blocks=4, dense_tier="host")
    assert host_rows.host == device_rows.video - host_rows.sparse  # the dense tier, whole, in host memory
    assert host_rows.video == host_rows.sparse + host_rows.resident + host_rows.staging < device_rows.video / 2
    budget = host_rows.nbytes(28, row) + (1 << 20)
    assert fit_kv_rows(cfg, limits, available_bytes=budget, row_bytes=row, dense_blocks=4)[0] < 2048
    frames, rows = fit_kv_rows(cfg, limits, available_bytes=budget, row_bytes=row, dense_blocks=4, dense_tier="host")
    assert frames == 2048 and rows.host == host_rows.host and rows.nbytes(28, row) <= budget
    # the host memory bounds it too
    half = kv_rows_for(cfg, limits, 1024, dense_blocks=4, dense_tier="host").host_nbytes(28, row)
    frames, rows = fit_kv_rows(cfg, limits, available_bytes=budget, row_bytes=row, dense_blocks=4, dense_tier="host", host_bytes=half)
    assert frames == 1024 and rows.host_nbytes(28, row) <= half
    with pytest.raises(ArenaOverflowError, match="pinned host memory"):
        fit_kv_rows(cfg, limits, available_bytes=budget, row_bytes=row, dense_blocks=4, dense_tier="host", host_bytes=1 << 20)


# --- activations against TensorRT's reports --------------------------------------------------------------
# TensorRT for RTX 1.7 activation bytes of the real-size fp16 builds, --max-frames 1024, sm_89 and sm_120
# (bench/RESULTS.md, "Real size"): every layer range of a graph reports one layer's working set.
MEASURED_ACTIVATIONS = {
    "vision": [532_362_240],
    # contract v3 (query outputs, the profile widened to a question over the scoring cache): 736.8 MB; v2 724.9 MB
    "prefill_chunk, no plugins": [736_825_856, 736_776_704, 736_790_016, 724_925_952, 724_899_840, 724_908_544],
    "prefill_chunk, plugins": [87_818_752, 87_818_240],  # v2 and v3 alike
    "decode": [115_155_968],  # plugins or not: the same engines
    "score": [797_172_224],  # the weightless graph (contract v3), all 28 layers in one engine; sm_89 and sm_120
}
# The weightless score graph (bench/bench_score_engine.py: LLMGraphWriter.score for the real config, built
# fp16 for sm_89 at the profile of --max-frames N): {N: (new_tokens, past_tokens, TensorRT's activation bytes)}.
MEASURED_SCORE_GRAPH = {256: (256, 3_392, 221_293_056), 1024: (256, 13_376, 797_172_224), 4096: (256, 53_312, 3_097_805_312)}


def test_activations_within_3_percent_of_the_real_size_builds():
    limits = BuildLimits(max_frames=1024, chunk_groups=REAL.chunk_groups, window_chunks=REAL.window_chunks)
    r = {graph: {name: dim.max for name, dim in dims.items()} for graph, dims in dimension_ranges(REAL, limits).items()}
    prefill = r["prefill_chunk"]

    def prefill_with(plugins: bool) -> int:
        return prefill_activation_bytes(
            REAL, chunk_tokens=prefill["chunk_tokens"], past_tokens=prefill["past_tokens"],
            visible_past=prefill["visible_past"], timestamp_queries=prefill["timestamp_queries"], dtype_bytes=2,
            plugins=plugins,
        )

    planned = {
        "vision": vision_activation_bytes(REAL, frames=r["vision"]["frames"], dtype_bytes=2),
        "prefill_chunk, no plugins": prefill_with(False),
        "prefill_chunk, plugins": prefill_with(True),
        "decode": decode_activation_bytes(REAL, new_tokens=r["decode"]["new_tokens"], past_tokens=r["decode"]["past_tokens"], dtype_bytes=2),
        "score": score_activation_bytes(REAL, new_tokens=r["score"]["new_tokens"], past_tokens=r["score"]["past_tokens"], dtype_bytes=2),
    }
    for phase, measured in MEASURED_ACTIVATIONS.items():
        for nbytes in measured:
            assert abs(planned[phase] / nbytes - 1) < 0.03, (phase, planned[phase], nbytes)
    # by hand at the profile maxima: the timestamp queries' fp32 scores and probabilities over the whole past
    assert planned["prefill_chunk, no plugins"] == 2 * 28 * 64 * (41_024 + 640) * 4 + (41_024 + 640) * 512 * (2 + 4)
    assert planned["prefill_chunk, plugins"] == 640 * (3 * 18_944 + 3 * 3584) * 2  # the MLP
    assert planned["decode"] == 2 * 41_792 * 512 * 2 + 256 * 41_792 * 2 + 256 * 3584 * (2 * 2 + 4)


def test_the_score_graph_within_5_percent_of_tensorrt_at_256_to_4096_frames():
    """One layer's fp32 scores and probabilities and its concatenated keys. The 5 %: TensorRT adds a few MB that
    do not scale (masks, positions; +8 MB at 256 frames, where the planned 213 MB is 3.8 % under), and at 4,096
    frames it reports 0.9 % less than planned; at 1,024 frames 0.2 %."""
    for frames, (new_tokens, past_tokens, measured) in MEASURED_SCORE_GRAPH.items():
        planned = score_activation_bytes(REAL, new_tokens=new_tokens, past_tokens=past_tokens, dtype_bytes=2)
        assert abs(planned / measured - 1) < 0.05, (frames, planned, measured)
    r = dimension_ranges(REAL, BuildLimits(max_frames=1024, chunk_groups=REAL.chunk_groups, window_chunks=REAL.window_chunks))
    assert (r["score"]["new_tokens"].max, r["score"]["past_tokens"].max) == MEASURED_SCORE_GRAPH[1024][:2]
    # by hand: no MLP, no values (the graph has neither)
    assert score_activation_bytes(REAL, new_tokens=256, past_tokens=13_376, dtype_bytes=2) == 2 * 28 * 256 * 13_632 * 4 + 13_632 * 512 * 2


def test_the_score_graph_runs_its_layers_in_order():
    """The one-layer working set holds because layer i's queries wait for layer i-1's mass: without that order
    TensorRT kept most layers' probabilities live at once (16.4 GB at --max-frames 1024, bench/RESULTS.md)."""
    import types

    from videoxl.export.onnx_llm import LLMGraphWriter

    graph = LLMGraphWriter(types.SimpleNamespace(cfg=REAL), "fp16", state={}).score().graph
    assert not graph.initializer  # no weights
    made_by = {out: node for node in graph.node for out in node.output}

    def ancestors(name: str) -> set[str]:
        seen, todo = set(), [name]
        while todo:
            node = made_by.get(todo.pop())
            if node is not None and id(node) not in seen:
                seen.add(id(node))
                todo += [i for i in node.input if i]
                seen |= set(node.input)
        return seen

    mass = [node.output[0] for node in graph.node if node.op_type == "ReduceSum" and node.input[0] in made_by
            and made_by[node.input[0]].op_type == "Softmax"]
    assert len(mass) == REAL.num_hidden_layers
    for layer in range(1, REAL.num_hidden_layers):
        assert "query.%d" % (layer - 1) in ancestors(mass[layer]), layer


def test_the_question_runs_on_prefill_chunk_whose_attention_workspace_stays_below_its_mlp():
    """With plugins prefill_chunk's scratch is planned as its MLP at the profile's chunk tokens: ChunkSparseAttention's
    split-KV workspace (the launcher's own answer, which the plugin asks at the profile maxima) stays below it
    with the profile widened for the question (past and visible past over the scoring cache). At a 64-token
    question's own shape the workspace (9.3 MB) would exceed a 64-token MLP (8.7 MB): the profile maxima decide."""
    from videoxl.plugins import kernels

    try:  # (chunk tokens, past capacity, visible past, timestamp queries) at --max-frames 1024 and 10,000 frames
        for chunk, past, visible, ts in ((640, 41_024, 41_024, 64), (600, 374_464, 105_064, 24)):
            workspace = kernels.chunk_attention_workspace_bytes(
                num_queries=chunk, past_capacity=past, num_visible=visible, num_timestamp_queries=ts,
                num_q_heads=28, num_kv_heads=4, head_dim=128, dtype="fp16")
            mlp = prefill_activation_bytes(REAL, chunk_tokens=chunk, past_tokens=past, visible_past=visible,
                                           timestamp_queries=ts, dtype_bytes=2, plugins=True)
            assert workspace < mlp / 2, (chunk, past, workspace, mlp)
    except kernels.build.BuildError as err:
        pytest.skip(f"no kernel library here: {err}")


def test_query_io_and_the_question_scoring_phase_by_hand():
    """prefill_chunk's query outputs are io at its profile maximum (the chunk, or the question when longer);
    question scoring is the larger of the prefill_chunk engine's scratch and the score graph's, plus that io."""
    assert query_io_bytes(REAL, chunk_tokens=640, dtype_bytes=2) == 28 * 640 * 28 * 128 * 2 == 128_450_560

    def phases(plan) -> dict[str, int]:
        found = re.findall(r"(prefill chunk|vision batch|question scoring|suffix decode) ([\d.]+ \w+)", plan.item("activations").detail)
        return {name: parse_bytes(value.replace(" ", "")) for name, value in found}

    # a question longer than a chunk: the query io (and prefill_chunk's profile) at the question's tokens
    long = plan_memory(REAL, frames=400, budget_bytes=80 * GiB, suffix_tokens=1000)
    t = long.tokens
    q_io = query_io_bytes(REAL, chunk_tokens=1000, dtype_bytes=2)
    prefill_engine = prefill_activation_bytes(REAL, chunk_tokens=1000, past_tokens=t.scoring, visible_past=t.scoring,
                                              timestamp_queries=4 * 6, dtype_bytes=2, plugins=True) + REAL.vocab_size * 4
    score_graph = score_activation_bytes(REAL, new_tokens=1000, past_tokens=t.scoring, dtype_bytes=2)
    assert long.item("activations").nbytes == max(prefill_engine, score_graph) + q_io + t.scoring * 4
    assert "largest phase: question scoring" in long.item("activations").detail
    assert abs(phases(long)["prefill chunk"] - (prefill_engine + q_io)) < 0.01 * GiB

    # inlined bodies: prefill_chunk's scratch (its timestamp queries over the whole past) outweighs the score graph
    inlined = plan_memory(REAL, frames=10_000, budget_bytes=80 * GiB, plugins=False)
    by_phase = phases(inlined)
    assert abs(by_phase["question scoring"] - by_phase["prefill chunk"]) < 0.01 * GiB  # the same engine's scratch

    # 10,000 frames: the score graph's probabilities over 105,064 sparse rows outweigh prefill_chunk's scratch
    plan = plan_memory(REAL, frames=10_000, budget_bytes=80 * GiB)
    t = plan.tokens
    assert plan.item("activations").nbytes == score_activation_bytes(
        REAL, new_tokens=64, past_tokens=t.scoring, dtype_bytes=2) + query_io_bytes(REAL, chunk_tokens=600, dtype_bytes=2) + t.scoring * 4
    assert t.decode >= t.scoring + 64  # the question's keys fit in the decode region, right after the scoring cache


def test_the_plan_knows_whether_the_engines_use_plugins():
    with_plugins = plan_memory(REAL, frames=10_000, budget_bytes=80 * GiB)
    inlined = plan_memory(REAL, frames=10_000, budget_bytes=80 * GiB, plugins=False)
    assert with_plugins.inputs.plugins and not inlined.inputs.plugins
    # inlined, prefill_chunk's scratch (its timestamp queries' attention over the whole past, 2,500 groups)
    # outgrows the score graph's; the question runs on that engine too, so scoring holds it as well
    assert "largest phase: question scoring" in with_plugins.item("activations").detail
    assert with_plugins.item("activations").nbytes < 2 * GiB < inlined.item("activations").nbytes
    # the host tier runs the streaming rule: no timestamp queries, the inlined prefill needs no more than the plugin's
    streaming = plan_memory(REAL, frames=10_000, budget_bytes=80 * GiB, plugins=False, dense_tier="host")
    assert streaming.item("activations").nbytes == with_plugins.item("activations").nbytes


# --- engines built with --decode-on-prefill: decode runs on the prefill_chunk engine ----------------------
@pytest.mark.parametrize("name", ["fp", "int4"])
def test_decode_on_prefill_holds_one_llm_copy_fewer(name):
    """No decode engine: the weights drop by exactly its copy; the prefill engine's activations are taken
    at its widened profile (the question's tokens over the decode capacity) and stand for decode too."""
    fmt = WeightFormat.parse(name)
    engines = engine_weight_bytes(REAL, fmt, 2, estimate_params(REAL))
    shared = engine_weight_bytes(REAL, fmt, 2, estimate_params(REAL), decode_on_prefill=True)
    assert shared == {g: n for g, n in engines.items() if g != "decode"}
    both = [plan_memory(REAL, frames=1000, budget_bytes=80 * GiB, weights=name, plugins=False, decode_on_prefill=d) for d in (False, True)]
    assert both[0].item("weights").nbytes - both[1].item("weights").nbytes == engines["decode"]
    assert "decode runs on prefill_chunk" in both[1].item("weights").detail
    detail = both[1].item("activations").detail
    assert "prefill chunk and decode" in detail and "suffix decode" not in detail
    t = both[1].tokens
    past = 64 + (math.ceil(250 / 4) - 1) * 4 * 150  # the last chunk's past (prefix, 4-group chunks of 150 tokens)
    widened = prefill_activation_bytes(
        REAL, chunk_tokens=4 * 150, past_tokens=max(past, t.decode_region), visible_past=t.decode_region,
        timestamp_queries=4 * 6, dtype_bytes=2, plugins=False,
    ) + REAL.vocab_size * 4 + query_io_bytes(REAL, chunk_tokens=4 * 150, dtype_bytes=2)  # with the logits and queries
    assert f"prefill chunk and decode {format_bytes(widened)}" in detail


def test_decode_on_prefill_on_a_16gib_jetson_with_int4(capsys):
    """`videoxl plan --config real --frames 1000 --gpu-memory-budget 16GiB --unified-memory --weights int4`:
    1,612 frames fit with two LLM copies (10.24 GiB of weights); with --decode-on-prefill (5.58 GiB) 3,096."""
    argv = ["--config", "real", "--frames", "1000", "--gpu-memory-budget", "16GiB", "--unified-memory", "--weights", "int4"]
    assert _plan_command(argv) == 0
    assert "frames that fit this budget: 1,612 with the dense tier on the device" in capsys.readouterr().out
    assert _plan_command([*argv, "--decode-on-prefill"]) == 0
    out = capsys.readouterr().out
    assert "fits: yes" in out and "frames that fit this budget: 3,096 with the dense tier on the device" in out
    for frames, fits in ((3096, True), (3100, False)):
        assert plan_memory(REAL, frames=frames, budget_bytes=16 * GiB, unified_memory=True, weights="int4",
                           decode_on_prefill=True).fits == fits
