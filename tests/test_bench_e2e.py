"""bench/bench_e2e_gpu.py on the CPU (--dry-run): the same code path as on the GPU, a tiny model.

The GPU run is part of bench/gpu_session.sh (step 7); this proves its code runs and that its
official-mask comparison computes the evaluation rule's visibility.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_e2e_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_e2e_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_writes_every_phase(bench, tmp_path: Path) -> None:
    out_json, out_md = tmp_path / "e2e.json", tmp_path / "e2e.md"
    assert bench.main(["--dry-run", "--json", str(out_json), "--markdown", str(out_md)]) == 0
    report = json.loads(out_json.read_text())
    assert report["dry_run"] and report["kernels"] == "off" and report["copy_bandwidth_bytes_per_s"] > 0
    runs = {r["frames"]: r for r in report["runs"]}
    assert sorted(runs) == [8, 16]
    for r in runs.values():
        for key in ("vision_s", "prefill_s", "dense_sdpa_prefill_s", "mask_prefill_s", "selection_s", "decode_ms_per_token", "decode_floor_ms"):
            assert r[key] > 0, (key, r)
        assert not r["vision_extrapolated"]
    assert runs[16]["scored"] and runs[16]["dense_blocks"] < runs[16]["blocks"]  # top-1 of 5 blocks: scoring ran
    table = out_md.read_text()
    assert table.count("\n| 8 |") == 1 and table.count("\n| 16 |") == 1


def test_official_masks_are_the_evaluation_rule(bench) -> None:
    from videoxl.layout import chunk_visibility, visible_key_index
    from videoxl.runtime.pipeline import InferenceOptions
    from videoxl.tiny import tiny_tokenizer

    cfg = bench.dry_config()
    layout = bench.make_layout(tiny_tokenizer(), cfg, 24, "Why?")
    masks = bench.official_masks(torch, layout, InferenceOptions(), cfg, "cpu")
    assert masks[0][0] == 0 and masks[-1][1] == layout.suffix_start
    for chunk in (1, 4):  # a chunk whose window starts at the prefix, and one with earlier timestamps outside it
        vis = chunk_visibility(layout, chunk, chunk_groups=cfg.chunk_groups, window_chunks=cfg.window_chunks)
        start, end, mask = masks[chunk + 1]
        assert (start, end) == (vis.start, vis.end)
        for i in range(end - start):
            expected = np.zeros(end, bool)
            expected[visible_key_index(vis, i)] = True
            np.testing.assert_array_equal(mask[i].numpy(), expected, err_msg=f"chunk {chunk} query {i}")
