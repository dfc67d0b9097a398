"""bench/gpu_session.sh end to end on the CPU (DRY_RUN=1), so that a lent GPU's minutes are never
spent on a typo: every step runs (tiny shapes, the kernels built for the host emulation, torch
on the CPU) and the one results file comes out."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_session.sh"


@pytest.mark.slow
def test_gpu_session_dry_run(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no host C++ compiler for the kernel emulation")
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path / "out"), PYTHON=sys.executable, SESSION_BUDGET_S="400")
    result = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)
    out = tmp_path / "out"
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = {line.split("\t")[0]: line.split("\t")[1] for line in (out / "steps.tsv").read_text().splitlines()}
    logs = {name: (out / f"{name}.log").read_text()[-2000:] for name in steps if (out / f"{name}.log").is_file()}
    for name in ("environment", "pytest", "install", "kernels", "gpu_tests", "attention", "e2e", "report"):
        assert steps.get(name) == "ok", f"step {name}: {steps.get(name)}\n{logs.get(name, '')}"

    report = (out / "gpu_results.md").read_text()
    assert "DRY RUN" in report and "## Attention throughput" in report and "## Kernel numerics" in report
    results = json.loads((out / "gpu_results.json").read_text())
    assert results["dry_run"] is True
    cases = results["attention"]["cases"]
    assert {(c["past_len"], c["timestamp_queries"]) for c in cases} == {(150, 3), (150, 0), (300, 3), (300, 0)}
    for case in cases:
        for variant in ("ours simt", "ours mma"):  # the emulated device has (emulated) tensor cores
            row = case["rows"][variant]
            assert row.get("ms", 0) > 0, row
            if case["timestamp_queries"] == 0:  # same pairs as SDPA: the outputs agree to fp16 rounding
                assert row["max_abs_diff_vs_sdpa"] < 2e-3, row
        assert case["rows"]["sdpa mask (official)"]["ms"] > 0
    assert any(t["outcome"] == "skipped" for t in results["gpu_tests"])  # collected, skipped without a GPU
    assert any("test_gpu_kernels_give_onnxruntime_tokens" in t["test"] for t in results["gpu_tests"])
    e2e = results["e2e"]  # the end-to-end bench on the emulated kernels
    assert e2e["dry_run"] and e2e["kernels"] == "on" and [r["frames"] for r in e2e["runs"]] == [8, 16]
    assert e2e["runs"][1]["scored"] and "## End to end" in report
