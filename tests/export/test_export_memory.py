"""The export's memory check: refused before loading anything when the working set does not fit."""

from __future__ import annotations

import pytest

from videoxl.export.onnx_export import check_export_memory, export_memory


def test_working_set_counts_visual_weights_and_the_largest_llm_tensor(tiny_checkpoint) -> None:
    fp32, fp16 = export_memory(tiny_checkpoint, "fp32"), export_memory(tiny_checkpoint, "fp16")
    assert fp32.vision_weight_bytes == 2 * fp16.vision_weight_bytes > 0
    assert fp32.llm_weight_bytes == 2 * fp16.llm_weight_bytes > 0
    assert fp32.largest_llm_tensor in ("model.embed_tokens.weight", "lm_head.weight")
    assert fp32.need_bytes > fp16.need_bytes


def test_refused_with_the_numbers_when_memory_is_short(tiny_checkpoint) -> None:
    need = export_memory(tiny_checkpoint, "fp16").need_bytes
    assert check_export_memory(tiny_checkpoint, "fp16", available=need).need_bytes == need
    with pytest.raises(MemoryError, match=r"needs about .* GiB of memory .* only 0\.5 GiB is available"):
        check_export_memory(tiny_checkpoint, "fp16", available=2**29)
