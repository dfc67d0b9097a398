"""The README's Python example runs as written (paths swapped for the tiny artifacts)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tiny_onnx, synthetic_video, capsys) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1, "the README should hold exactly one Python example"
    code = blocks[0].replace('"onnx/"', repr(str(tiny_onnx))).replace('"talk.mp4"', repr(str(synthetic_video)))
    assert str(tiny_onnx) in code and str(synthetic_video) in code
    exec(compile(code, str(README), "exec"), {})
    out = capsys.readouterr().out
    assert len(re.findall(r"^frames +\d+ \(\d+ groups of 4\)$", out, flags=re.M)) == 2 and "tokens/s" in out
    assert out.count("reused (done once for this video)") == 1  # the second question
