"""Engine builds on the CPU with TensorRT for RTX (sm_89): what is written, and the refusals."""

from __future__ import annotations

import dataclasses

import json
import logging
import re
from pathlib import Path

import onnx
import pytest
from onnx import helper

from conftest import BUILD_LIMITS
from videoxl import graphs
from videoxl.config import VideoXLConfig
from videoxl.engines import build as build_module
from videoxl.engines import profiles
from videoxl.engines.build import build_engines, max_frames_for_budget, plan_for_build
from videoxl.engines.errors import EngineBuildError
from videoxl.engines.profiles import GRAPHS, BuildLimits, ProfileError, kv_cache_bytes
from videoxl.engines.trt_module import TensorRTUnavailableError, import_tensorrt
from videoxl.ops import PLUGIN_VERSION
from videoxl.runtime.memory_plan import plan_memory
from videoxl.weight_format import WeightFormat


def _manifest(engine_dir: Path) -> dict:
    return json.loads((engine_dir / "manifest.json").read_text())


def _no_leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_engines_and_manifest_written(engines_with_plugins: Path, onnx_dir: Path) -> None:
    files = sorted(p.name for p in engines_with_plugins.iterdir())
    assert files == sorted([f"{g}.engine" for g in GRAPHS] + ["config.json", "export_manifest.json", "manifest.json", "vision_pad_embedding.npy"])
    assert set(GRAPHS) == set(graphs.GRAPHS) and "score" in GRAPHS  # the builder's graph list is the contract's
    manifest = _manifest(engines_with_plugins)
    assert manifest["tensorrt"]["flavour"] == "tensorrt_rtx"
    assert manifest["compute_capabilities"] == ["sm_89"]
    assert manifest["precision"] == "fp16"
    assert manifest["graph_contract"] == {"version": graphs.CONTRACT_VERSION, "graphs": list(graphs.GRAPHS)}
    assert {k: manifest["limits"][k] for k in BUILD_LIMITS} == BUILD_LIMITS
    assert manifest["model"]["config_hash"] == VideoXLConfig.load(onnx_dir / "config.json").model_hash()
    assert set(manifest["onnx"]) == {f"{g}.onnx" for g in GRAPHS}
    assert manifest["plugins"]["used"] and manifest["plugins"]["version"] == PLUGIN_VERSION
    for graph, entry in manifest["engines"].items():
        assert (engines_with_plugins / entry["file"]).stat().st_size == entry["bytes"] > 0
        # every input says where the runtime must put it
        assert {spec["location"] for spec in entry["inputs"].values()} <= {"host", "device"}, graph
        assert set(entry["inputs"]) == set(graphs.GRAPHS[graph].input_names(2)), graph
    # Profiles in the user's units, applied to the contract's dimension names.
    tokens, engines = manifest["tokens"], manifest["engines"]
    prefill = engines["prefill_chunk"]["inputs"]
    # a chunk, or the question over the whole scoring cache (block scoring runs it on prefill_chunk)
    assert prefill["past_key.0"]["max"] == [max(tokens["context"], tokens["scoring"]), 2, 16]
    assert prefill["input_ids"]["max"] == [max(tokens["chunk"], manifest["limits"]["suffix_tokens"])]
    assert prefill["visible_past_index"]["max"] == [max(tokens["visible_past"], tokens["scoring"])]
    assert prefill["timestamp_query_index"]["min"] == [0]  # the streaming rule has no timestamp queries
    assert engines["decode"]["inputs"]["past_key.1"]["max"] == [tokens["total"], 2, 16]  # the decode capacity
    assert engines["score"]["inputs"]["past_key.0"]["max"] == [tokens["scoring"], 2, 16]
    assert engines["score"]["inputs"]["query.1"]["max"] == [manifest["limits"]["suffix_tokens"], 4, 16]
    assert manifest["vision_pad"]["token"] == 63 and manifest["decode_on_prefill"] is False
    gather = engines["kv_gather"]["inputs"]
    assert gather["key"]["max"][0] == gather["source_position"]["max"][0] == tokens["sparse"] + tokens["context"]
    assert gather["gather_index"]["min"] == [1, 1] and gather["gather_index"]["max"] == [tokens["context"], 4]
    assert engines["vision"]["inputs"]["pixel_values"]["max"][0] == 32  # vision_batch_frames
    assert manifest["build_command"].startswith("videoxl build --onnx ")
    assert _no_leftovers(engines_with_plugins.parent) == []


def test_plugin_path_really_uses_the_plugins(engines_with_plugins: Path, engines_without_plugins: Path) -> None:
    plugin_build = _manifest(engines_with_plugins)
    used = plugin_build["engines"]
    assert used["prefill_chunk"]["plugin_layers"] == ["chunk_attention.0", "chunk_attention.1"]
    assert used["kv_gather"]["plugin_layers"] == ["kv_gather"]
    assert used["vision"]["plugin_layers"] == used["decode"]["plugin_layers"] == used["score"]["plugin_layers"] == []
    assert {g for g, e in used.items() if e["needs_plugins"]} == {"prefill_chunk", "kv_gather"}
    assert plugin_build["plugins"]["engines"] == ["kv_gather", "prefill_chunk"]
    assert used["prefill_chunk"]["native_attention_layers"] == 0  # the plugin does the attention
    inlined = _manifest(engines_without_plugins)
    assert not inlined["plugins"]["used"] and "--no-plugins" in inlined["build_command"]
    assert inlined["plugins"]["engines"] == []
    assert all(e["plugin_layers"] == [] and not e["needs_plugins"] for e in inlined["engines"].values())
    # The inlined attention is a different (larger) engine than the plugin call.
    assert inlined["engines"]["prefill_chunk"]["bytes"] != used["prefill_chunk"]["bytes"]


def test_plugin_free_attention_is_tensorrts_fused_attention(engines_without_plugins: Path) -> None:
    """The standard ONNX Attention of the inlined bodies becomes TensorRT's own attention layers, one per layer."""
    engines = _manifest(engines_without_plugins)["engines"]
    assert engines["prefill_chunk"]["native_attention_layers"] == 2  # 2 decoder layers: the visible-past attention
    assert engines["decode"]["native_attention_layers"] == 2
    assert engines["score"]["native_attention_layers"] == 0  # it writes its probabilities out: plain ops
    assert engines["vision"]["native_attention_layers"] == engines["kv_gather"]["native_attention_layers"] == 0


def test_input_locations_come_from_tensorrt(engines_with_plugins: Path, engines_without_plugins: Path) -> None:
    """past_len is a shape tensor (host) of the plugin-free prefill only: its body builds Range(0, past_len * ..)."""
    inlined = _manifest(engines_without_plugins)
    prefill = inlined["engines"]["prefill_chunk"]
    assert prefill["host_inputs"] == ["past_len"] and prefill["inputs"]["past_len"]["location"] == "host"
    assert prefill["inputs"]["past_len"]["shape_input"] == [[0], [inlined["tokens"]["context"]], [inlined["tokens"]["context"]]]
    for graph in ("vision", "decode", "score", "kv_gather"):
        assert inlined["engines"][graph]["host_inputs"] == [], graph
    plugin_prefill = _manifest(engines_with_plugins)["engines"]["prefill_chunk"]
    assert plugin_prefill["host_inputs"] == [] and plugin_prefill["inputs"]["past_len"]["location"] == "device"
    assert "shape_input" not in plugin_prefill["inputs"]["past_len"]
    # TensorRT for RTX deserializes only on a GPU it supports; without one the network answers
    assert prefill["locations_from"] in ("engine", "network")


def test_rebuild_replaces_the_directory(trt, onnx_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "engines"
    build_engines(onnx_dir, out, precision="fp16", use_plugins=False, progress=True, **BUILD_LIMITS)
    first = _manifest(out)["built_at"]
    (out / "stale.txt").write_text("from the previous build")
    build_engines(onnx_dir, out, precision="fp16", use_plugins=False, targets=["sm_86", "8.9"], **BUILD_LIMITS)
    assert not (out / "stale.txt").exists()
    assert _manifest(out)["compute_capabilities"] == ["sm_86", "sm_89"]
    assert _manifest(out)["built_at"] >= first
    assert _no_leftovers(tmp_path) == []


def _refused(onnx: Path, out: Path, match: str, **kwargs) -> EngineBuildError:
    options = {"precision": "fp16", **BUILD_LIMITS, **kwargs}
    with pytest.raises(EngineBuildError, match=match) as caught:
        build_engines(onnx, out, **options)
    assert not out.exists(), "a failed build must leave no engine directory"
    assert _no_leftovers(out.parent) == []
    return caught.value


def test_precision_must_match_the_export(trt, onnx_dir: Path, tmp_path: Path) -> None:
    err = _refused(onnx_dir, tmp_path / "out", r"holds an export in fp16", precision="fp32")
    assert "build with --fp16" in str(err)


def test_precision_defaults_to_the_export(trt, tmp_path: Path) -> None:
    from engine_fixtures import write_artifacts

    fp32 = write_artifacts(tmp_path / "fp32", precision="fp32")
    out = build_engines(fp32, tmp_path / "out", use_plugins=False, **BUILD_LIMITS)
    assert _manifest(out)["precision"] == "fp32"


def test_bf16_cannot_target_sm75(trt, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine_fixtures import write_artifacts

    bf16 = write_artifacts(tmp_path / "bf16", precision="bf16")
    _refused(bf16, tmp_path / "out", r"bf16 needs compute capability 8\.0.*sm_75", precision="bf16", targets=["sm_75", "sm_89"])
    # TensorRT's own answer agrees: without our check the build fails in the compiler.
    monkeypatch.setattr(build_module, "_check_precision_targets", lambda *args: None)
    err = _refused(bf16, tmp_path / "out", r"could not build the engine for sm_75", precision="bf16", targets=["sm_75"], use_plugins=False)
    assert "sm75" in str(err) and "b16" in str(err)


def test_memory_budget(trt, onnx_dir: Path, tmp_path: Path) -> None:
    cfg = VideoXLConfig.load(onnx_dir / "config.json")
    limits = BuildLimits(**BUILD_LIMITS)
    needed = kv_cache_bytes(cfg, limits, "fp16")
    err = _refused(onnx_dir, tmp_path / "out", r"more than the memory budget", memory_budget_bytes=needed - 1)
    fitting = max_frames_for_budget(cfg, limits, "fp16", needed - 1)
    assert f"--max-frames {fitting} or less" in str(err)
    assert kv_cache_bytes(cfg, BuildLimits(**{**BUILD_LIMITS, "max_frames": fitting}), "fp16") <= needed - 1
    assert kv_cache_bytes(cfg, BuildLimits(**{**BUILD_LIMITS, "max_frames": fitting + 4}), "fp16") > needed - 1
    assert "counts the KV cache only" in str(err) and "--gpu-memory-budget" in str(err)


def _fixture_plan(onnx: Path, frames: int, budget: int, *, plugins: bool = True, decode_on_prefill: bool = False):
    """The planner, called by hand for what a build of the fixture export holds (fp16, fp weights, the build's token limits)."""
    limits = BuildLimits(**{**BUILD_LIMITS, "max_frames": frames})
    return plan_memory(
        VideoXLConfig.load(onnx / "config.json"), frames=frames, budget_bytes=budget, chunk_groups=limits.chunk_groups,
        window_chunks=limits.window_chunks, dtype_bytes=2, weights="fp", timestamp_tokens_per_group=limits.timestamp_tokens,
        prefix_tokens=limits.prefix_tokens, suffix_tokens=limits.suffix_tokens, max_new_tokens=limits.answer_tokens,
        vision_batch_frames=limits.vision_batch_frames, dense_tier="auto", plugins=plugins, decode_on_prefill=decode_on_prefill,
    )


def _no_tensorrt_work(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("TensorRT work began before the GPU memory check refused the build")

    for name in ("_prepare_plugins", "_cut_into_ranges", "_build_one"):
        monkeypatch.setattr(build_module, name, refuse)


def _fitting_frames(err: EngineBuildError) -> int:
    found = re.search(r"use --max-frames (\d+) or less", str(err))
    assert found, str(err)
    return int(found.group(1))


def test_the_build_plan_follows_plugins_weights_and_decode_on_prefill() -> None:
    """What the fixture cannot show (its plan is the same with and without plugins): the real 8B, chunks of 8 groups,
    where the inlined prefill's timestamp queries over the whole past outgrow the question's scores."""
    real, limits = VideoXLConfig(), BuildLimits(max_frames=2048, chunk_groups=8, window_chunks=3)

    def plan(**changes):
        options = {"precision": "fp16", "weights": WeightFormat(), "use_plugins": True, "decode_on_prefill": False, **changes}
        return plan_for_build(real, limits, budget_bytes=80 * 2**30, **options)

    default = plan()
    assert plan(use_plugins=False).item("activations").nbytes > default.item("activations").nbytes  # the inlined prefill
    assert plan(decode_on_prefill=True).item("weights").nbytes < default.item("weights").nbytes  # no decode engine
    assert plan(weights=WeightFormat.parse("int4")).item("weights").nbytes < default.item("weights").nbytes
    assert plan(precision="fp32").device_bytes > default.device_bytes
    # a 16 GiB Jetson, int4: the auto dense tier leaves the device at 3,072 frames, which on unified
    # memory saves nothing: the same plan fits a discrete GPU's 16 GiB and not the shared 16 GiB
    jetson = {"weights": WeightFormat.parse("int4"), "decode_on_prefill": True, "budget_bytes": 16 * 2**30}
    limits = dataclasses.replace(limits, chunk_groups=4, max_frames=3072)
    discrete = plan_for_build(real, limits, precision="fp16", use_plugins=True, **jetson)
    unified = plan_for_build(real, limits, precision="fp16", use_plugins=True, unified_memory=True, **jetson)
    assert discrete.fits and discrete.inputs.dense_tier == "host"
    assert not unified.fits and max(frames for _, frames in unified.frames_fit) < 3072


def test_gpu_memory_budget_refuses_before_any_tensorrt_work(trt, onnx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    budget = 5_500_000  # the fixture's plan: ~6.3 MB at 64 frames, activations the most (the question's scores)
    assert not _fixture_plan(onnx_dir, 64, budget).fits
    _no_tensorrt_work(monkeypatch)
    err = _refused(onnx_dir, tmp_path / "out", r"more than --gpu-memory-budget 5\.25 MiB", gpu_memory_budget_bytes=budget)
    for item in ("weights", "activations", "video KV region", "decode KV region"):  # what takes the memory, the planner's names
        assert re.search(rf"{item} \d", str(err)), (item, str(err))
    assert "at their profile maxima (64 frames, a 256-token question" in str(err)
    assert "build with --decode-on-prefill (one LLM weight copy fewer)" in str(err)  # the other way to fit
    fitting = _fitting_frames(err)
    assert fitting % 4 == 0 and 0 < fitting < 64
    assert _fixture_plan(onnx_dir, fitting, budget).fits
    assert not _fixture_plan(onnx_dir, fitting + 4, budget).fits


def test_gpu_memory_budget_that_fits_is_recorded(trt, onnx_dir: Path, tmp_path: Path) -> None:
    plan = _fixture_plan(onnx_dir, 64, 2**40, plugins=False)
    _refused(onnx_dir, tmp_path / "out", r"more than --gpu-memory-budget", use_plugins=False, gpu_memory_budget_bytes=plan.device_bytes - 1)
    out = build_engines(onnx_dir, tmp_path / "out", precision="fp16", use_plugins=False,
                        gpu_memory_budget_bytes=plan.device_bytes, **BUILD_LIMITS)
    memory = _manifest(out)["memory"]
    assert memory["gpu_plan"] == {"budget_bytes": plan.device_bytes, "device_bytes": plan.device_bytes, "dense_tier": "device",
                                  "unified_memory": False}
    assert f"--gpu-memory-budget {plan.device_bytes}" in _manifest(out)["build_command"]  # a rebuild checks the same
    assert memory["budget_bytes"] is None  # --memory-budget (KV only) was not given


def test_gpu_memory_budget_counts_one_weight_copy_fewer_with_decode_on_prefill(trt, onnx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    budget = _fixture_plan(onnx_dir, 60, 2**40, decode_on_prefill=True).device_bytes  # 60 frames fit exactly without decode's weights
    _no_tensorrt_work(monkeypatch)
    with_decode_engine = _fitting_frames(_refused(onnx_dir, tmp_path / "out", r"more than --gpu-memory-budget", gpu_memory_budget_bytes=budget))
    decode_on_prefill = _fitting_frames(_refused(onnx_dir, tmp_path / "out", r"more than --gpu-memory-budget",
                                             gpu_memory_budget_bytes=budget, decode_on_prefill=True))
    assert decode_on_prefill == 60 and with_decode_engine < decode_on_prefill


def test_gpu_memory_budget_below_the_weights_fits_no_frame_count(trt, onnx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = _fixture_plan(onnx_dir, 64, 2**40).item("weights").nbytes
    _no_tensorrt_work(monkeypatch)
    err = _refused(onnx_dir, tmp_path / "out", r"the weights alone \(each LLM engine its own copy\) need .* no frame count fits",
                   gpu_memory_budget_bytes=weights - 1)
    assert "--decode-on-prefill" in str(err) and "--weights int4" in str(err)
    err = _refused(onnx_dir, tmp_path / "out", r"the weights alone \(each LLM engine its own copy, no decode engine\)",
                   gpu_memory_budget_bytes=_fixture_plan(onnx_dir, 64, 2**40, decode_on_prefill=True).item("weights").nbytes - 1,
                   decode_on_prefill=True)
    assert "build with --decode-on-prefill" not in str(err)  # already


def test_corrupt_onnx(trt, onnx_copy: Path, tmp_path: Path) -> None:
    (onnx_copy / "decode.onnx").write_bytes(b"\x08\x07garbage" * 100)
    _refused(onnx_copy, tmp_path / "out", r"decode\.onnx: not a readable ONNX model")


def test_parser_errors_are_listed(trt, onnx_copy: Path, tmp_path: Path) -> None:
    model = onnx.load(str(onnx_copy / "kv_gather.onnx"))
    del model.functions[:]  # the custom node loses its body: nothing can import it without plugins
    model.graph.node.append(helper.make_node("NoSuchOp", ["gather_weight"], ["junk"], domain="videoxl.test"))
    model.opset_import.append(helper.make_opsetid("videoxl.test", 1))
    onnx.save(model, str(onnx_copy / "kv_gather.onnx"))
    err = _refused(onnx_copy, tmp_path / "out", r"kv_gather\.onnx: the TensorRT for RTX .* ONNX parser failed", use_plugins=False)
    assert "with 2 error(s)" in str(err)
    assert "node 0 (BilevelKVGather 'kv_gather'): INVALID_NODE" in str(err)
    assert "node 1 (NoSuchOp): INVALID_NODE" in str(err)


def test_unknown_dimension_names(trt, onnx_copy: Path, tmp_path: Path) -> None:
    model = onnx.load(str(onnx_copy / "decode.onnx"))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "tokens_of_mystery"
    onnx.save(model, str(onnx_copy / "decode.onnx"))
    err = _refused(onnx_copy, tmp_path / "out", r"'tokens_of_mystery'")
    assert isinstance(err, ProfileError) and "new_tokens, past_tokens" in str(err)


def test_custom_nodes_left_inlined_are_refused(trt, onnx_copy: Path, tmp_path: Path) -> None:
    """Without plugin_version the parser looks up plugin version 1 and silently inlines the body instead."""
    model = onnx.load(str(onnx_copy / "kv_gather.onnx"))
    for node in model.graph.node:
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("rope_theta", 1e6))
    onnx.save(model, str(onnx_copy / "kv_gather.onnx"))
    err = _refused(onnx_copy, tmp_path / "out", r"kv_gather\.onnx: 1 of its 1 videoxl nodes were not mapped to the videoxl v2 plugins")
    assert 'plugin_version="2"' in str(err) and "--no-plugins" in str(err)
    build_engines(onnx_copy, tmp_path / "inlined", precision="fp16", use_plugins=False, **BUILD_LIMITS)  # the body is fine


def test_graphs_of_another_contract_are_refused(trt, onnx_copy: Path, tmp_path: Path) -> None:
    model = onnx.load(str(onnx_copy / "prefill_chunk.onnx"))
    model.graph.input[2].name = "prefix_len"  # a contract v1 input name
    onnx.save(model, str(onnx_copy / "prefill_chunk.onnx"))
    err = _refused(onnx_copy, tmp_path / "out", r"prefill_chunk\.onnx: not a graph of contract v3")
    assert "inputs missing ['past_len'], unexpected ['prefix_len']" in str(err) and "`videoxl export`" in str(err)


def test_a_shape_tensor_needs_a_value_range(trt, onnx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ranges = profiles.shape_input_values
    monkeypatch.setattr(build_module, "shape_input_values", lambda *a, **k: {**ranges(*a, **k), "prefill_chunk": {}})
    err = _refused(onnx_dir, tmp_path / "out", r"TensorRT uses input 'past_len' as a shape tensor", use_plugins=False)
    assert "add one in videoxl.engines.profiles.shape_input_values" in str(err)


def test_plugins_need_the_install_fix(trt, onnx_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build_module, "install_fix_applied", lambda: False)
    _refused(onnx_dir, tmp_path / "out", r"run `python -m videoxl\.engines\.trt_install` once, or build with --no-plugins")


def test_unsupported_target(trt, onnx_dir: Path, tmp_path: Path) -> None:
    _refused(onnx_dir, tmp_path / "out", r"cannot build for sm_90; it supports sm_75, sm_80", targets=["sm_90"])


def test_missing_graph_and_config(trt, onnx_copy: Path, tmp_path: Path) -> None:
    (onnx_copy / "vision.onnx").unlink()
    _refused(onnx_copy, tmp_path / "out", r"vision\.onnx is missing")
    (onnx_copy / "config.json").unlink()
    _refused(onnx_copy, tmp_path / "out", r"no config\.json")


def test_refuses_to_replace_a_foreign_directory(trt, onnx_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"...")
    with pytest.raises(EngineBuildError, match="refusing to replace"):
        build_engines(onnx_dir, out, precision="fp16", **BUILD_LIMITS)
    assert (out / "holiday.jpg").exists()


def test_timing_cache_is_ignored_by_tensorrt_for_rtx(trt, onnx_dir: Path, tmp_path: Path, caplog) -> None:
    cache = tmp_path / "timing.cache"
    with caplog.at_level(logging.WARNING, logger="videoxl.engines.build"):
        build_engines(onnx_dir, tmp_path / "out", precision="fp16", use_plugins=False, timing_cache=cache, **BUILD_LIMITS)
    assert "timing-cache calls no-ops" in caplog.text
    assert not cache.exists()


def test_standard_tensorrt_flavour_errors_clearly(onnx_dir: Path, tmp_path: Path) -> None:
    try:
        import_tensorrt("tensorrt")
    except TensorRTUnavailableError:
        pass
    else:
        pytest.skip("standard TensorRT is installed here")
    with pytest.raises(TensorRTUnavailableError, match="no usable TensorRT: TensorRT \\(module tensorrt\\)"):
        build_engines(onnx_dir, tmp_path / "out", flavour="tensorrt", **BUILD_LIMITS)
    assert not (tmp_path / "out").exists()
