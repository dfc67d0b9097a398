#!/usr/bin/env bash
# One prepared command for a lent GPU machine (H100/H200: CUDA 13, torch, triton, nvcc; no
# TensorRT, no PyAV, no network). Run from the repository root:
#
#     bash bench/gpu_session.sh                  # results in $OUT (default bench/out)
#     DRY_RUN=1 bash bench/gpu_session.sh        # the same steps on a CPU: tiny shapes,
#                                                # kernels built for the host emulation
#
# Steps (each time-boxed; a failure is recorded and the next step runs):
#   1. environment      GPU, driver, python, torch, nvcc versions
#   2. pytest           imported, or installed offline from the wheels carried in .whl/
#   3. install          pip install -e . offline (no deps, no build isolation); falls back to
#                       a folder of links on PYTHONPATH when setuptools cannot do it offline
#   4. kernels          libvideoxl_kernels.so for the GPU found (nvidia-smi compute_cap)
#   5. gpu tests        pytest -m gpu tests/plugins (kernel numerics at the real shapes) and
#                       tests/runtime/test_torch_backend.py (the torch backend on the kernels)
#   6. attention bench  bench/bench_attention_gpu.py (ours vs SDPA flash vs the mask mode)
#   7. end to end       bench/bench_e2e_gpu.py when present (hook; see below)
#   8. report           $OUT/gpu_results.md and $OUT/gpu_results.json
# The whole session stays under SESSION_BUDGET_S (default 450 s): a step gets the smaller of
# its own limit and what is left.
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
DRY_RUN="${DRY_RUN:-0}"
PYTHON="${PYTHON:-python3}"
SESSION_BUDGET_S="${SESSION_BUDGET_S:-450}"
STARTED=$(date +%s)
STEPS="$OUT/steps.tsv"
LOG="$OUT/session.log"
: > "$STEPS"
: > "$LOG"
SHIM="$OUT/.import"
LIBRARY=""
export PYTHONUNBUFFERED=1 ROOT OUT DRY_RUN PYTHON SHIM

say() { echo "[gpu_session $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

# step NAME LIMIT_S FUNCTION: runs the (exported) shell function under timeout, output to $OUT/NAME.log, one line
# "name<TAB>status<TAB>seconds<TAB>exit code" into steps.tsv. Never stops the session.
step() {
    local name="$1" limit="$2"
    shift 2
    local left=$((SESSION_BUDGET_S - ($(date +%s) - STARTED)))
    if [ "$left" -lt 5 ]; then
        say "$name: skipped (session budget of ${SESSION_BUDGET_S}s spent)"
        printf '%s\tskipped\t0\t-\n' "$name" >> "$STEPS"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit="$left"
    say "$name: start (limit ${limit}s)"
    local t0 rc status
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" bash -c "$*" > "$OUT/$name.log" 2>&1
    rc=$?
    case "$rc" in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - t0))" "$rc" >> "$STEPS"
    say "$name: $status in $(($(date +%s) - t0))s (exit $rc; log $OUT/$name.log)"
    tail -n 3 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$LOG"
    return 0
}

# --- 1. environment -------------------------------------------------------------------------
environment() {
    date -u
    uname -a
    if [ "$DRY_RUN" = 1 ]; then
        echo "DRY_RUN=1: no GPU used"
    else
        nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv
    fi
    "$PYTHON" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "triton", "numpy", "onnxruntime", "cupy", "cuda.bindings", "pytest", "setuptools"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as err:
        print(name, "missing:", type(err).__name__)
try:
    import torch
    print("cuda available", torch.cuda.is_available(), torch.version.cuda)
except Exception:
    pass
EOF
    command -v nvcc && nvcc --version | tail -n 2 || echo "nvcc not on PATH"
}
export -f environment
step environment 30 environment

# --- 2. pytest (offline wheels in .whl/ when the image lacks it) ---------------------------
pytest_ready() {
    if "$PYTHON" -c "import pytest" 2> /dev/null; then
        "$PYTHON" -c "import pytest; print('pytest', pytest.__version__, 'already installed')"
        return 0
    fi
    if [ ! -d .whl ]; then
        echo "pytest is missing and no .whl/ folder was carried (pip download pytest pluggy iniconfig packaging -d .whl)"
        return 1
    fi
    "$PYTHON" -m pip install --no-index --find-links .whl pytest && "$PYTHON" -c "import pytest; print('pytest', pytest.__version__)"
}
export -f pytest_ready
step pytest 60 pytest_ready

# --- 3. the project, importable as videoxl ----------------------------------------------------
install_project() {
    local where
    where=$("$PYTHON" -c "import videoxl.plugins, pathlib; print(pathlib.Path(videoxl.plugins.__file__).resolve().parent)" 2> /dev/null)
    if [ "$where" = "$ROOT/plugins" ]; then
        echo "videoxl already imports from this checkout"
        return 0
    fi
    if "$PYTHON" -m pip install --no-deps --no-index --no-build-isolation -e . ; then
        "$PYTHON" -c "import videoxl.plugins.kernels, videoxl.layout; print('videoxl installed (editable)')" && return 0
    fi
    # pyproject maps videoxl.plugins -> plugins/ (and export, runtime, engines likewise):
    # mirror that with links so that PYTHONPATH finds it without setuptools.
    echo "editable install failed: importing videoxl through links in $SHIM"
    rm -rf "$SHIM" && mkdir -p "$SHIM/videoxl"
    for entry in "$ROOT"/videoxl/*; do ln -s "$entry" "$SHIM/videoxl/"; done
    for sub in plugins export runtime engines; do ln -sfn "$ROOT/$sub" "$SHIM/videoxl/$sub"; done
    PYTHONPATH="$SHIM" "$PYTHON" -c "import videoxl.plugins.kernels, videoxl.layout; print('videoxl importable via links')"
}
export -f install_project
step install 90 install_project
if ! "$PYTHON" -c "import videoxl.plugins.kernels" 2> /dev/null && [ -d "$SHIM/videoxl" ]; then
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi

# --- 4. the kernel library for this GPU ------------------------------------------------------
if [ "$DRY_RUN" = 1 ]; then
    LIBRARY="$OUT/emulated/libvideoxl_kernels_emulated.so"
    build_kernels() {
        "$PYTHON" -c "
from pathlib import Path
from videoxl.plugins import build
print(build.build_host_emulation(Path('tests/plugins/cuda_host/include'), Path('$OUT/emulated')))"
    }
else
    build_kernels() {
        local cap arch
        cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' .')
        arch="sm_${cap}"
        echo "GPU compute capability -> $arch"
        "$PYTHON" -m videoxl.plugins.build --arch "$arch"
    }
fi
export LIBRARY
export -f build_kernels
step kernels 150 build_kernels

# --- 5. kernel numerics on the GPU (the emulated run of the same file is CPU CI's) ----------
gpu_tests() {
    local extra=()
    [ "$DRY_RUN" = 1 ] && extra=(-k "not emulated")  # a dry run only proves the file collects and skips cleanly
    "$PYTHON" -m pytest -m gpu tests/plugins tests/runtime/test_torch_backend.py -q -rs -p no:cacheprovider \
        --junitxml="$OUT/gpu_tests.xml" "${extra[@]}"
}
export -f gpu_tests
step gpu_tests 200 gpu_tests

# --- 6. attention throughput -----------------------------------------------------------------
attention_bench() {
    if [ "$DRY_RUN" = 1 ]; then
        "$PYTHON" bench/bench_attention_gpu.py --dry-run --library "$LIBRARY" \
            --json "$OUT/attention.json" --markdown "$OUT/attention.md"
    else
        "$PYTHON" bench/bench_attention_gpu.py --json "$OUT/attention.json" --markdown "$OUT/attention.md"
    fi
}
export -f attention_bench
step attention 150 attention_bench

# --- 7. end to end ------------------------------------------------------------------------------
# bench/bench_e2e_gpu.py: random-weight Video-XL-2 made on the GPU in bf16, at 512 / 2,048 frames:
# vision, prefill (ours, dense SDPA, the official mask), selection, decode vs the bandwidth floor,
# peak memory. It time-boxes itself (--budget-s) inside this step's limit. --dry-run: a tiny model
# on the CPU with the emulated kernels.
if [ -f bench/bench_e2e_gpu.py ]; then
    e2e_bench() {
        local extra=(--budget-s 170)
        [ "$DRY_RUN" = 1 ] && extra=(--dry-run --library "$LIBRARY")
        "$PYTHON" bench/bench_e2e_gpu.py --json "$OUT/e2e.json" --markdown "$OUT/e2e.md" "${extra[@]}"
    }
    export -f e2e_bench
    step e2e 180 e2e_bench
else
    say "e2e: bench/bench_e2e_gpu.py not present, skipped"
    printf 'e2e\tabsent\t0\t-\n' >> "$STEPS"
fi

# --- 8. one results file -------------------------------------------------------------------------
report() {
    OUT="$OUT" DRY_RUN="$DRY_RUN" "$PYTHON" - <<'EOF'
import json, os, xml.etree.ElementTree as ET
from pathlib import Path

out = Path(os.environ["OUT"])
steps = [dict(zip(("name", "status", "seconds", "exit"), line.split("\t")))
         for line in (out / "steps.tsv").read_text().splitlines() if line.strip()]
results = {"dry_run": os.environ["DRY_RUN"] == "1", "steps": steps}
lines = ["# GPU session results" + (" (DRY RUN: CPU, emulated kernels, tiny shapes)" if results["dry_run"] else ""), ""]
lines += ["## Steps", "", "| step | status | s | exit |", "|---|---|---:|---|"]
lines += [f"| {s['name']} | {s['status']} | {s['seconds']} | {s['exit']} |" for s in steps]
env = out / "environment.log"
if env.is_file():
    lines += ["", "## Environment", "", "```", env.read_text().strip()[-3000:], "```"]

tests = out / "gpu_tests.xml"
lines += ["", "## Kernel numerics (pytest -m gpu tests/plugins)", ""]
if tests.is_file():
    cases = []
    for case in ET.parse(tests).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                message = (node.get("message") or "")[:200]
                break
        else:
            message = ""
        cases.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time") or 0), "message": message})
    results["gpu_tests"] = cases
    counts = {}
    for c in cases:
        counts[c["outcome"]] = counts.get(c["outcome"], 0) + 1
    lines.append(", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no tests collected")
    lines += ["", "| test | outcome | s | message |", "|---|---|---:|---|"]
    lines += [f"| {c['test']} | {c['outcome']} | {c['seconds']:.2f} | {c['message'].replace('|', '/')} |"
              for c in cases if c["outcome"] != "skipped" or results["dry_run"]]
else:
    lines.append("no junit file: see gpu_tests.log")

for key, title in (("attention", "Attention throughput (bench/bench_attention_gpu.py)"),
                   ("e2e", "End to end (bench/bench_e2e_gpu.py)")):
    lines += ["", f"## {title}", ""]
    table, data = out / f"{key}.md", out / f"{key}.json"
    if data.is_file():
        results[key] = json.loads(data.read_text())
    lines.append(table.read_text().strip() if table.is_file() else f"not produced: see {key}.log")

(out / "gpu_results.json").write_text(json.dumps(results, indent=2) + "\n")
(out / "gpu_results.md").write_text("\n".join(lines) + "\n")
print(out / "gpu_results.md")
EOF
}
export -f report
step report 30 report
say "done in $(($(date +%s) - STARTED))s: $OUT/gpu_results.md"
cat "$STEPS" | tee -a "$LOG"
