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
    # what the TensorRT backend loads: vision, and the LLM three times (prefill_chunk, decode, and score,
    # which reads no lm_head, final norm, nor its last layer's value path and MLP); the export's bytes
    vision, llm = 1_016_505_408, 15_231_233_024  # vision.onnx.data; llm_weights.onnx.data less 256 B of RoPE table
    score = llm - 152064 * 3584 * 2 - (3584 * 512 + 512) * 2 - 3584 * 3584 * 2 - 3 * 3584 * 18944 * 2 - 2 * 3584 * 2
    assert plan.item("weights").nbytes == vision + 2 * llm + score == 45_183_462_464
    assert "decode 14.19 GiB" in plan.item("weights").detail and "score 12.76 GiB" in plan.item("weights").detail
    # the largest phase: scoring writes out the suffix's probabilities over the all-sparse cache
    assert plan.item("activations").nbytes < 2 * GiB and "largest phase: question scoring" in plan.item("activations").detail
    assert plan.device_bytes == sum(i.nbytes for i in plan.items) < 76 * GiB
    assert "fits: yes" in plan.table() and "[sparse tier 105,000 | dense tier 375,064]" in plan.table()


def test_scoring_and_decode_caches_share_one_region():
    plan = plan_memory(REAL, frames=2000, budget_bytes=80 * GiB, dense_blocks=0)
    t = plan.tokens
    assert t.scoring == 64 + 500 * 42  # the prefix dense, every block sparse
    assert t.decode == 64 + 2 * 4 * 150 + (500 - 8) * 42 + 64 + 256  # first and last block dense
    assert plan.item("decode KV region").tokens == max(t.decode, t.scoring) == t.decode  # not their sum


def test_1000_frames_fit_a_16gb_jetson_with_unified_memory():
    # 8B fp16 weights are 15.1 GiB, held three times by the engines (42.1 GiB): a 16 GB Jetson needs
    # every parameter at half a byte (a what-if; int4 exports keep embeddings and lm_head wider)
    plan = plan_memory(REAL, frames=1000, budget_bytes=16 * GiB, unified_memory=True, weight_dtype_bytes=0.5)
    assert plan.fits and "unified memory" in plan.table()
    assert plan.device_bytes == sum(i.nbytes for i in plan.items)
    params = estimate_params(REAL)
    assert plan.item("weights").nbytes == sum(engine_weight_bytes(REAL, WeightFormat(), 0.5, params).values())
    assert 2.5 * sum(params.values()) // 2 < plan.item("weights").nbytes < 3 * sum(params.values()) // 2

    fp16 = plan_memory(REAL, frames=1000, budget_bytes=16 * GiB, unified_memory=True)
    assert not fp16.fits
    assert any("--weights int4" in line for line in fp16.advice)
    assert not plan_memory(REAL, frames=1000, budget_bytes=16 * GiB, unified_memory=True, weight_dtype_bytes=1).fits


def test_10000_frames_do_not_fit_64gb_and_the_advice_is_true():
    plan = plan_memory(REAL, frames=10_000, budget_bytes=64 * GiB)
    assert not plan.fits
    suggested = [int(m.group(1)) for line in plan.advice if (m := re.search(r"--max-frames to (\d+)", line))]
    assert suggested == [plan.max_frames_that_fit]
    frames = suggested[0]
    assert 1000 < frames < 10_000 and frames % 4 == 0
    assert plan_memory(REAL, frames=frames, budget_bytes=64 * GiB).fits
    assert not plan_memory(REAL, frames=frames + 4, budget_bytes=64 * GiB).fits
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

    fp32 = plan_memory(REAL, frames=2000, budget_bytes=52 * GiB, dtype_bytes=4, weight_dtype_bytes=2)
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
    assert "largest phase: prefill chunk" in capsys.readouterr().out  # the inlined body's timestamp-query attention

    assert _plan_command(["--config", "real", "--frames", "10000", "--gpu-memory-budget", "64GiB", "--dense-tier", "device"]) == 1
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
    assert _plan_command(["--config", "real", "--frames", "6000", "--gpu-memory-budget", "51GiB", "--dense-tier", "host",
                          "--host-memory", "64GiB"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"dense KV tier +host", out) and "host total (pinned)" in out and "of 64.00 GiB free" in out
    assert "frames that fit this budget: 2,620 with the dense tier on the device, 6,084 with the dense tier in pinned host memory" in out


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


@pytest.mark.parametrize("name,fits_1000,most_frames", [("fp", False, None), ("int8", False, None), ("int4", False, (16, 40))])
def test_jetson_orin_16gb_with_quantized_weights(name, fits_1000, most_frames):
    """The engines hold the LLM three times: fp16 (42 GiB) and int8 (23 GiB) weights alone exceed 16 GB;
    int4 (block 128, 14.3 GiB) leaves room for a few dozen frames, re-planned true."""
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
    # fp: every parameter in fp16, the LLM's three times (prefill_chunk, decode, score less what it never reads)
    assert fp == sum(engine_weight_bytes(REAL, WeightFormat(), 2, params).values()) == 45_183_462_464
    # int4: per layer q, o 3584^2, k, v 3584 x 512, gate, up, down 3 x 3584 x 18944 at 0.5 B + an fp16 scale per 128 rows

    def saved(params_of_linears: int) -> int:
        return params_of_linears * 2 - params_of_linears // 2 - params_of_linears // 128 * 2

    linear = 2 * 3584**2 + 2 * 3584 * 512 + 3 * 3584 * 18944
    unread_in_score = 3584 * 512 + 3584**2 + 3 * 3584 * 18944  # the last layer's v, o and MLP
    lm_head = 3584 * 152064
    projector = 1152 * 3584 + 3584**2
    llm_saved = 28 * saved(linear) + (lm_head * 2 - lm_head - 152064 * 2)
    assert fp - int4 == saved(projector) + 2 * llm_saved + (llm_saved - (lm_head * 2 - lm_head - 152064 * 2) - saved(unread_in_score))
    assert 14.2 * GiB < int4 < 14.4 * GiB and 22.9 * GiB < int8 < 23.1 * GiB
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


# 51 GiB: the engines' 42.08 GiB of fp16 weights (the LLM in three engines) plus ~9 GiB for KV and activations
def test_auto_keeps_the_dense_tier_on_the_device_when_it_fits_and_moves_it_when_not():
    assert plan_memory(REAL, frames=2048, budget_bytes=80 * GiB, dense_tier="auto").inputs.dense_tier == "device"  # nothing leaves an 80 GB GPU
    moved = plan_memory(REAL, frames=6000, budget_bytes=51 * GiB, dense_tier="auto", host_budget_bytes=64 * GiB)
    assert moved.fits and moved.inputs.dense_tier == "host" and moved.host_bytes > 10 * GiB
    assert "dense tier: in pinned host memory" in moved.table()
    # too little host memory: the device plan stays, with its advice
    short = plan_memory(REAL, frames=6000, budget_bytes=51 * GiB, dense_tier="auto", host_budget_bytes=8 * GiB)
    assert not short.fits and short.inputs.dense_tier == "device"
    starved = plan_memory(REAL, frames=6000, budget_bytes=51 * GiB, dense_tier="host", host_budget_bytes=8 * GiB)
    assert not starved.fits and any("pinned dense tier needs" in line for line in starved.advice)


@pytest.mark.parametrize(("budget", "device_frames", "host_frames"), [(80, 11_460, 27_224), (51, 2_620, 6_084)])
def test_frames_that_fit_either_way(budget, device_frames, host_frames):
    plan = plan_memory(REAL, frames=1000, budget_bytes=budget * GiB, host_budget_bytes=256 * GiB)
    assert dict(plan.frames_fit) == {"device": device_frames, "host": host_frames}
    for tier, frames in plan.frames_fit:  # each is the largest that fits
        assert plan_memory(REAL, frames=frames, budget_bytes=budget * GiB, dense_tier=tier, host_budget_bytes=256 * GiB).fits
        assert not plan_memory(REAL, frames=frames + 4, budget_bytes=budget * GiB, dense_tier=tier, host_budget_bytes=256 * GiB).fits


def test_advice_to_move_the_dense_tier_is_true():
    plan = plan_memory(REAL, frames=6000, budget_bytes=51 * GiB, dense_tier="device", host_budget_bytes=64 * GiB)
    line = next(line for line in plan.advice if "--dense-tier host" in line)
    assert "all 6000 frames fit" in line
    assert plan_memory(REAL, frames=6000, budget_bytes=51 * GiB, dense_tier="host", host_budget_bytes=64 * GiB).fits


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
    "prefill_chunk, no plugins": [724_925_952, 724_899_840, 724_908_544],
    "prefill_chunk, plugins": [87_818_752, 87_818_240],
    "decode": [115_155_968],  # plugins or not: the same engines
    "score": [829_658_112, 801_903_616, 803_683_840],  # plugins or not: the same engines
}


def test_activations_within_10_percent_of_the_real_size_builds():
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
            assert abs(planned[phase] / nbytes - 1) < 0.10, (phase, planned[phase], nbytes)
    # by hand at the profile maxima: the timestamp queries' fp32 scores and probabilities over the whole past
    assert planned["prefill_chunk, no plugins"] == 2 * 28 * 64 * (41_024 + 640) * 4 + (41_024 + 640) * 512 * (2 + 4)
    assert planned["prefill_chunk, plugins"] == 640 * (3 * 18_944 + 3 * 3584) * 2  # the MLP
    assert planned["decode"] == 2 * 41_792 * 512 * 2 + 256 * 41_792 * 2 + 256 * 3584 * (2 * 2 + 4)


def test_the_plan_knows_whether_the_engines_use_plugins():
    with_plugins = plan_memory(REAL, frames=10_000, budget_bytes=80 * GiB)
    inlined = plan_memory(REAL, frames=10_000, budget_bytes=80 * GiB, plugins=False)
    assert with_plugins.inputs.plugins and not inlined.inputs.plugins
    # inlined, the timestamp queries' attention over the whole past (2,500 groups) outgrows the scoring
    assert "largest phase: question scoring" in with_plugins.item("activations").detail
    assert "largest phase: prefill chunk" in inlined.item("activations").detail
    assert with_plugins.item("activations").nbytes < inlined.item("activations").nbytes
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
    ) + REAL.vocab_size * 4  # with the logits
    assert f"prefill chunk and decode {format_bytes(widened)}" in detail


def test_decode_on_prefill_fits_1000_frames_on_a_16gib_jetson_with_int4(capsys):
    """`videoxl plan --config real --frames 1000 --gpu-memory-budget 16GiB --unified-memory --weights int4`:
    316 frames fit with three LLM copies (14.3 GiB of weights); with --decode-on-prefill (9.6 GiB) 1,808."""
    argv = ["--config", "real", "--frames", "1000", "--gpu-memory-budget", "16GiB", "--unified-memory", "--weights", "int4"]
    assert _plan_command(argv) == 1
    assert "frames that fit this budget: 316 with the dense tier on the device" in capsys.readouterr().out
    assert _plan_command([*argv, "--decode-on-prefill"]) == 0
    out = capsys.readouterr().out
    assert "fits: yes" in out and "frames that fit this budget: 1,808 with the dense tier on the device" in out
    for frames, fits in ((1808, True), (1812, False)):
        assert plan_memory(REAL, frames=frames, budget_bytes=16 * GiB, unified_memory=True, weights="int4",
                           decode_on_prefill=True).fits == fits
