"""The official evaluation's rules at the edges: unit selections, presets, window 0, the eval prompt.

Each rule is written out here from the official source (VectorSpaceLab/Video-XL,
Video-XL-2/eval/lvu/w_chunk_bilevel) and our functions are checked against it, not against
themselves.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from videoxl.cli import main
from videoxl.layout import (
    build_layout,
    chunk_visibility,
    explicit_dense_blocks,
    num_blocks_for,
    num_chunks,
    unit_block,
    unit_dense_blocks,
    visible_key_index,
)
from videoxl.presets import PRESETS, SelectionError, load_unit_selection
from videoxl.sampling import eval_generation_config
from videoxl.text import times_as_seconds


# --- units -> blocks ---------------------------------------------------------------------------


@pytest.mark.parametrize("block_groups", range(1, 18))
def test_unit_block_is_the_official_float_rule(block_groups):
    # llava_qwen.py: block_idx = this_frame_idx // (block_size / 2) + 1, a float floor division
    for unit in range(400):
        assert unit_block(unit, block_groups) == int(unit // (block_groups / 2) + 1), (unit, block_groups)


def test_unit_block_by_hand():
    # S = 4: two units per block; S = 5 (odd): 2.5 units per block, unit 2 still in block 1, unit 3 in block 2
    assert [unit_block(u, 4) for u in range(6)] == [1, 1, 2, 2, 3, 3]
    assert [unit_block(u, 5) for u in range(6)] == [1, 1, 1, 2, 2, 3]
    assert [unit_block(u, 16) for u in (0, 7, 8, 74)] == [1, 1, 2, 10]  # LVBench: 8 units per block


def test_empty_selection_keeps_every_block_dense():
    assert unit_dense_blocks([], num_groups=10, block_groups=4) == {0, 1, 2, 3}


def test_units_plus_always_dense_blocks():
    # 16 groups, S = 4: blocks 1..4; units 2 and 3 -> block 2, unit 5 -> block 3 (the last, 4, is always dense)
    assert unit_dense_blocks([3, 2, 5], num_groups=16, block_groups=4) == {0, 1, 2, 3, 4}
    assert unit_dense_blocks([2], num_groups=16, block_groups=4) == {0, 1, 2, 4}


def test_out_of_range_units_are_dropped_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="videoxl.layout"):
        # 10 groups, S = 4: blocks 1..3, units 0..5; unit 6 would be block 4, -1 means nothing
        assert unit_dense_blocks([2, 6, 40, -1], num_groups=10, block_groups=4) == {0, 1, 2, 3}
    assert "dense units [-1, 6, 40] are outside this video" in caplog.text and "units 0..5" in caplog.text


def test_a_selection_of_only_dropped_units_keeps_only_the_always_dense_blocks(caplog):
    # officially the mapped list is not empty, so not 'all': only 0, 1 and the last stay dense
    assert unit_dense_blocks([99], num_groups=40, block_groups=4) == {0, 1, 10}


def test_unit_ids_must_be_integers():
    with pytest.raises(ValueError, match="unit ids must be integers, got 2.5"):
        unit_dense_blocks([1, 2.5], num_groups=8, block_groups=4)


def test_explicit_blocks_still_refuse_out_of_range():
    # our own block numbers: a typo is an error; units come from files made on other frame counts
    with pytest.raises(ValueError, match=r"dense blocks \[7\] out of range"):
        explicit_dense_blocks([2, 7], 5)


def test_num_blocks():
    assert [num_blocks_for(g, 4) for g in (1, 4, 5, 8, 9)] == [2, 2, 3, 3, 4]


# --- selection files ---------------------------------------------------------------------------


def _selection_file(path, chunk_size=16, compression=4):
    data = {
        "key information retrieval": None,  # the official files hold null categories
        "event understanding": {
            "config": {"selected_topk": 4, "selected_chunk_size": chunk_size, "compression": compression,
                       "relevance oracle": "languagebind"},
            "selected_unit_indices": {
                "clip_What happens from 00:02-00:05?": [1, 0],
                "clip.mp4_What colour?": [3],
                "clip_Empty?": [],
            },
        },
    }
    path.write_text(json.dumps(data))
    return path


def test_load_unit_selection(tmp_path):
    path = _selection_file(tmp_path / "lvbench_tv.json")
    found = load_unit_selection(path, ["clip.mp4_What happens from 00:02-00:05?", "clip_What happens from 00:02-00:05?"])
    assert (found.units, found.block_groups, found.key) == ((1, 0), 16, "clip_What happens from 00:02-00:05?")
    assert load_unit_selection(path, "clip_Empty?").units == ()


def test_missing_entry_and_bad_files(tmp_path):
    path = _selection_file(tmp_path / "s.json")
    with pytest.raises(SelectionError, match=r"no entry 'x_y\?'.*--prefill dense --decode dense"):
        load_unit_selection(path, "x_y?")
    with pytest.raises(SelectionError, match="pools KV by 2"):
        load_unit_selection(_selection_file(tmp_path / "c.json", compression=2), "clip.mp4_What colour?")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SelectionError, match="cannot read the selection file"):
        load_unit_selection(tmp_path / "bad.json", "k")


# --- presets -----------------------------------------------------------------------------------


def test_presets_are_the_official_settings():
    # scripts/*.sh: max_frames_num, block_size_chosed (C), prev_blocks_num (P);
    # selected_infos/*.json: selected_chunk_size (S)
    official = {"mlvu": (256, 4, 3, 4), "longvideobench": (400, 4, 3, 6), "videomme": (400, 4, 3, 6), "lvbench": (600, 4, 11, 16)}
    assert {name: (p.max_frames, p.chunk_groups, p.window_chunks, p.block_groups) for name, p in PRESETS.items()} == official
    assert all((p.fps, p.max_fps) == (1, 4) for p in PRESETS.values())


# --- window 0: kept, as our extension ----------------------------------------------------------


def test_window_zero_sees_only_its_own_chunk_prefix_and_timestamps():
    """The official mask code indexes record_block_start[-0] and crashes at P = 0; its rule with
    P -> 0 (no previous block) is what our visibility gives: checked against it written out."""
    layout = build_layout([1, 2, 3], [[7, 8]] * 6, [9, 9], image_token_id=5, tokens_per_group=4)
    chunk_groups = 2
    for chunk in range(num_chunks(layout, chunk_groups)):
        vis = chunk_visibility(layout, chunk, chunk_groups=chunk_groups, window_chunks=0)
        own = int(layout.group_starts[chunk * chunk_groups])
        for q in range(vis.end - vis.start):
            position = vis.start + q
            if layout.is_timestamp[position]:
                expected = np.arange(position + 1)
            else:
                expected = np.array([j for j in range(position + 1)
                                     if j < layout.prefix_len or layout.is_timestamp[j] or j >= own])
            assert np.array_equal(visible_key_index(vis, q), expected), (chunk, q)


# --- eval prompt ------------------------------------------------------------------------------


@pytest.mark.parametrize("question,expected", [
    ("What happens from 40:39-40:45?", "What happens from 2439 seconds-2445 seconds?"),
    ("What are the men doing at 00:26?", "What are the men doing at 26 seconds?"),
    ("at 01:30, then 01:30 again", "at 90 seconds, then 90 seconds again"),
    # the official regex has no hours and no single-digit minutes: kept as it is
    ("at 1:02:03", "at 1:123 seconds"),
    ("at 5:03PM", "at 5:03PM"),
    ("at 123:45", "at 11425 seconds"),
    ("a 00:75 mark", "a 75 seconds mark"),
    ("no times here", "no times here"),
])
def test_times_as_seconds(question, expected):
    assert times_as_seconds(question) == expected


def test_eval_generation_is_greedy_with_the_stop():
    gen = eval_generation_config()
    assert (gen.temperature, gen.stop_at_eos, gen.max_new_tokens) == (0.0, True, 1024)


# --- the command line ---------------------------------------------------------------------------

RUN = ["--max-new-tokens", "4", "--no-progress", "--chunk-groups", "2", "--window", "1"]


def _run(tiny_onnx, video, *flags):
    return main(["run", "--onnx", str(tiny_onnx), "--video", str(video), "--max-frames", "40", *RUN, *flags])


def test_run_with_units(tiny_onnx, synthetic_video, capsys):
    # 40 frames = 10 groups; S = 2: blocks 1..5, one unit per block -> unit 2 is block 3
    assert _run(tiny_onnx, synthetic_video, "--block-groups", "2", "--dense-units", "2") == 0
    assert "dense blocks [0, 1, 3, 5] of 6" in capsys.readouterr().out
    assert _run(tiny_onnx, synthetic_video, "--block-groups", "2", "--dense-units", "") == 0
    assert "dense blocks [0, 1, 2, 3, 4, 5] of 6" in capsys.readouterr().out


def test_run_with_a_selection_file(tiny_onnx, synthetic_video, tmp_path, capsys):
    path = _selection_file(tmp_path / "sel.json", chunk_size=4)
    # default key: '<file name>_<question>' ("clip.mp4_What colour?"); S = 4 from the file: blocks 1..3
    assert _run(tiny_onnx, synthetic_video, "--dense-units-file", str(path), "--question", "What colour?") == 0
    assert "dense blocks [0, 1, 2, 3] of 4" in capsys.readouterr().out
    assert _run(tiny_onnx, synthetic_video, "--dense-units-file", str(path), "--dense-units-key", "clip_Empty?") == 0
    assert "dense blocks [0, 1, 2, 3] of 4" in capsys.readouterr().out
    assert _run(tiny_onnx, synthetic_video, "--dense-units-file", str(path), "--block-groups", "2",
                "--question", "What colour?") == 2
    assert "--block-groups 2 differs from the selection's selected_chunk_size 4" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--dense-blocks", "2", "--dense-units", "1"], "--dense-blocks and --dense-units both choose the dense blocks; give one"),
    (["--dense-units-key", "k"], "--dense-units-key needs --dense-units-file"),
    (["--dense-units-file", "x.json"], "--dense-units-file without --dense-units-key needs exactly one --question"),
])
def test_conflicting_selection_flags(tiny_onnx, synthetic_video, capsys, flags, message):
    assert _run(tiny_onnx, synthetic_video, *flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_preset_sets_the_evaluation_and_explicit_flags_override(tiny_onnx, synthetic_video, capsys, caplog):
    # lvbench: S = 16 groups, so the 10 groups of 40 frames are one block; --block-groups 2 overrides it
    code = main(["run", "--onnx", str(tiny_onnx), "--video", str(synthetic_video), "--preset", "lvbench",
                 "--max-frames", "40", "--max-new-tokens", "3", "--no-progress", "--question", " at 00:07? "])
    out = capsys.readouterr().out
    assert code == 0 and "of 2" in out.split("block selection")[1].splitlines()[0]
    answer = out.split("A: ")[1].split("\n")[0]
    assert answer == answer.strip()  # printed once, stripped
    with caplog.at_level(logging.INFO, logger="videoxl"):
        assert main(["run", "--onnx", str(tiny_onnx), "--video", str(synthetic_video), "--preset", "lvbench",
                     "--max-frames", "40", "--block-groups", "2", "--max-new-tokens", "3", "--no-progress",
                     "--question", "at 00:07?"]) == 0
    assert "of 6" in capsys.readouterr().out.split("block selection")[1].splitlines()[0]
    assert "question as asked: 'at 7 seconds?'" in caplog.text


def test_window_zero_runs(tiny_onnx, synthetic_video, capsys):
    assert main(["run", "--onnx", str(tiny_onnx), "--video", str(synthetic_video), "--max-frames", "40",
                 "--chunk-groups", "2", "--window", "0", "--max-new-tokens", "2", "--no-progress"]) == 0
    assert "A: " in capsys.readouterr().out
