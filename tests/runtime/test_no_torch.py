"""The runtime never imports torch: it needs only the artifacts, numpy and onnxruntime."""

from __future__ import annotations

import subprocess
import sys


def test_runtime_run_without_torch(tiny_onnx, synthetic_video):
    script = f"""
import sys
sys.modules['torch'] = None  # any 'import torch' now fails
from videoxl.cli import main
code = main(['run', '--onnx', r'{tiny_onnx}', '--video', r'{synthetic_video}', '--max-frames', '8',
             '--max-new-tokens', '3', '--no-progress'])
assert code == 0, code
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "backend           onnxruntime" in done.stdout
