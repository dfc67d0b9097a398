"""The dense tier's bookkeeping (runtime/dense_tier.py): resident rows, compaction moves, staged gathers."""

from __future__ import annotations

import numpy as np
import pytest

from videoxl.layout import chunk_visibility, num_chunks, prefix_visibility
from videoxl.runtime.dense_tier import ResidentRows, runs, split_gather


def _apply(buffer: np.ndarray, moves) -> None:
    """The moves, in order, as the device does them (each piece a plain copy)."""
    for source, target, count in moves:
        assert target + count <= source or count == 0  # a piece never overlaps itself
        buffer[target : target + count] = buffer[source : source + count]


def test_a_streaming_prefill_keeps_what_later_chunks_read_in_position_order(make_layout):
    """Chunk by chunk as the backend does it: keep what the chunk reads, compact when full, append it.
    Every remapped row holds its position, lies below past_len, and the area never overflows."""
    layout = make_layout(13)
    chunk_groups, window = 2, 1
    stamps = int((layout.group_visual_starts - layout.group_starts).sum())
    group = int((layout.group_ends - layout.group_starts).max())
    capacity = layout.prefix_len + stamps + (window + 1) * chunk_groups * group + group  # little slack: compactions
    resident, device = ResidentRows(capacity), np.full(capacity, -1, np.int64)  # device[row] = position held
    compactions = 0
    chunks = [chunk_visibility(layout, k, chunk_groups=chunk_groups, window_chunks=window, rule="streaming")
              for k in range(num_chunks(layout, chunk_groups))]
    for vis in [prefix_visibility(layout), *chunks]:
        visible = vis.visible_past_index
        resident.keep_only(visible)
        rows = vis.end - vis.start
        if resident.end + rows > capacity:
            _apply(device, resident.compact())
            compactions += 1
        remapped = resident.rows_of(visible)
        assert np.all(remapped >= 0) and np.all(np.diff(remapped) > 0)
        assert np.array_equal(device[remapped], visible)  # each row holds the position it stands for
        assert np.all(remapped <= visible) and (not len(remapped) or remapped.max() < vis.start)  # < past_len
        first = resident.append(vis.start, rows)
        device[first : first + rows] = np.arange(vis.start, vis.end)
    assert compactions >= 3
    assert np.array_equal(device[resident.rows_of(resident.held)], resident.held)


def test_keep_only_refuses_rows_already_dropped():
    resident = ResidentRows(10)
    resident.append(0, 6)
    resident.keep_only(np.array([0, 1, 4]))
    with pytest.raises(RuntimeError, match="no longer holds"):
        resident.keep_only(np.array([0, 2]))
    with pytest.raises(ValueError, match="do not fit"):
        resident.append(6, 5)


def test_compaction_cuts_long_runs_into_pieces_that_do_not_overlap():
    resident = ResidentRows(40)
    resident.append(0, 30)
    resident.keep_only(np.r_[0:2, 5:30])  # 3 rows dropped: 25 rows move down by 3
    device = np.arange(40)
    moves = resident.compact()
    assert moves == [(5 + 3 * i, 2 + 3 * i, min(3, 25 - 3 * i)) for i in range(9)]
    _apply(device, moves)
    assert np.array_equal(device[:27], np.r_[0:2, 5:30]) and resident.end == 27


def test_runs_of_positions():
    assert runs(np.array([3, 4, 5, 9, 11, 12])) == [(3, 0, 3), (9, 3, 1), (11, 4, 2)]
    assert runs(np.zeros(0, np.int64)) == []


@pytest.mark.parametrize("staging_rows", [4, 7, 64])
def test_split_gather_reads_resident_rows_in_place_and_stages_the_rest(staging_rows):
    rng = np.random.default_rng(staging_rows)
    sparse_rows, sparse_capacity, dense_rows = 11, 16, 60
    resident = ResidentRows(24)
    resident.append(0, 20)
    resident.keep_only(np.r_[0:5, 12:20])
    # a decode-cache-like plan: sparse rows, dense copies and pooled dense rows, in block order
    plan = np.concatenate([
        np.repeat(np.arange(0, 4)[:, None], 4, axis=1),
        np.repeat(sparse_rows + np.arange(0, 9)[:, None], 4, axis=1),
        sparse_rows + np.arange(20, 40).reshape(-1, 4),
        np.repeat(np.arange(4, 11)[:, None], 4, axis=1),
        np.repeat(sparse_rows + np.arange(44, 60)[:, None], 4, axis=1),
    ])
    sparse_data, dense_data = rng.standard_normal(sparse_rows), rng.standard_normal(dense_rows)
    source = np.concatenate([sparse_data, dense_data])
    expected = source[plan]
    pieces = split_gather(plan, sparse_rows=sparse_rows, sparse_capacity=sparse_capacity, resident=resident, staging_rows=staging_rows)
    assert pieces[0].first == 0 and pieces[-1].last == len(plan)
    assert all(a.last == b.first for a, b in zip(pieces, pieces[1:]))
    device = np.full(sparse_capacity + resident.capacity + staging_rows, np.nan)
    device[:sparse_rows] = sparse_data
    held = resident.held
    device[sparse_capacity + resident.rows_of(held)] = dense_data[held]
    staged_total = []
    for piece in pieces:
        assert len(piece.staged) <= staging_rows and not np.isin(piece.staged, held).any()
        device[sparse_capacity + resident.capacity : sparse_capacity + resident.capacity + len(piece.staged)] = dense_data[piece.staged]
        np.testing.assert_array_equal(device[piece.gather_index], expected[piece.first : piece.last])
        staged_total += piece.staged.tolist()
    needed = sorted(set(plan[plan >= sparse_rows].ravel() - sparse_rows) - set(held.tolist()))
    assert sorted(staged_total) == needed  # every missing row staged exactly once
    assert len(pieces) == (1 if staging_rows >= len(needed) else len(pieces)) and (staging_rows >= len(needed) or len(pieces) > 1)
