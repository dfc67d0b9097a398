"""The dense KV tier in pinned host memory: which rows the device keeps, and the plans that move rows.

Pure bookkeeping (integers and index arrays, tested on the CPU); the TensorRT backend does the
copies. Under the streaming prefill rule a chunk reads only its ``visible_past_index`` rows (the
prefix, the timestamp rows of earlier chunks, its window), and a later chunk reads a subset of
those plus the rows written since. So the device keeps a **resident area** per layer::

    resident row  0 ............................................. end ......... capacity
                  | prefix | timestamp rows of old chunks | window chunks | (free)   |
                    rows in position order; holes where evicted visual rows were

Every chunk appends its rows at ``end`` and, at the same time, they go to the host tier (the
whole dense tier, row = position). Before a chunk runs, the rows it does not read are dropped
(holes); when its rows no longer fit, the holes are squeezed out (``compact``: a few device to
device moves, ~one chunk per chunk on average). Rows stay in position order, so resident row
``r`` holds a position ``>= r``: a remapped index is below ``past_len`` like the original, which
is what the attention kernels' bound (``min(past_len, rows)``) needs.

At question time a gather reads resident rows in place and the other dense rows from a
**staging** area that is filled from the host tier, one copy per run of consecutive positions
(``split_gather``; more than one pass when the chosen rows exceed the staging area).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class ResidentRows:
    """Which positions rows [0, end) of the resident area hold (-1: a hole), in position order."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.positions = np.full(capacity, -1, np.int64)
        self.end = 0

    def clear(self) -> None:
        self.positions[:] = -1
        self.end = 0

    @property
    def held(self) -> np.ndarray:
        """Positions held, ascending."""
        live = self.positions[: self.end]
        return live[live >= 0]

    def rows_of(self, positions: np.ndarray) -> np.ndarray:
        """Resident row of each position, -1 where the device does not hold it."""
        positions = np.asarray(positions, np.int64)
        live = self.positions[: self.end]
        rows = np.flatnonzero(live >= 0)
        held = live[rows]
        if not len(held):
            return np.full(positions.shape, -1, np.int64)
        at = np.minimum(np.searchsorted(held, positions), len(held) - 1)
        return np.where(held[at] == positions, rows[at], -1)

    def keep_only(self, positions: np.ndarray) -> None:
        """Drop (as holes) every held row whose position is not in ``positions``; all of them must be held."""
        rows = self.rows_of(positions)
        if np.any(rows < 0):
            missing = np.asarray(positions)[rows < 0]
            raise RuntimeError(
                f"a prefill chunk reads {len(missing)} dense rows the device no longer holds (positions {missing[:4].tolist()}...): "
                "its window reaches further back than the previous chunk's"
            )
        keep = np.zeros(self.end, bool)
        keep[rows] = True
        self.positions[: self.end][~keep] = -1

    def append(self, start: int, rows: int) -> int:
        """Positions [start, start + rows) at the end; returns their first row."""
        if self.end + rows > self.capacity:
            raise ValueError(f"{rows} rows do not fit the resident area ({self.end} of {self.capacity} in use)")
        held = self.held
        if len(held) and held[-1] >= start:
            raise ValueError(f"positions from {start} appended after position {held[-1]}")
        first = self.end
        self.positions[first : first + rows] = np.arange(start, start + rows, dtype=np.int64)
        self.end += rows
        return first

    def compact(self) -> list[tuple[int, int, int]]:
        """Squeeze out the holes; returns the moves ``(source_row, target_row, rows)`` to make, in order.

        Every row moves down; a run moving by d rows is cut into pieces of at most d rows, so no
        piece overlaps itself and, done in order, none overwrites a row not yet moved.
        """
        live = self.positions[: self.end]
        old = np.flatnonzero(live >= 0)
        moves: list[tuple[int, int, int]] = []
        if len(old):
            shift = old - np.arange(len(old))
            # runs of consecutive rows with one shift
            breaks = np.flatnonzero((np.diff(old) != 1) | (np.diff(shift) != 0)) + 1
            for first, last in zip(np.r_[0, breaks], np.r_[breaks, len(old)]):
                source, d, length = int(old[first]), int(shift[first]), int(last - first)
                if d == 0:
                    continue
                for offset in range(0, length, d):
                    moves.append((source + offset, source + offset - d, min(d, length - offset)))
        kept = live[old].copy()
        self.clear()
        self.positions[: len(kept)] = kept
        self.end = len(kept)
        return moves


def runs(positions: np.ndarray) -> list[tuple[int, int, int]]:
    """(first position, index of it in ``positions``, length) of each run of consecutive positions (sorted input)."""
    positions = np.asarray(positions, np.int64)
    if not len(positions):
        return []
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    return [(int(positions[a]), int(a), int(b - a)) for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(positions)])]


@dataclass(frozen=True)
class GatherPiece:
    """Output rows [first, last) of a gather plan, with source rows remapped and what to upload first.

    ``gather_index`` indexes the bound source ``[sparse tier | resident area | staging]``;
    ``staged`` are the positions whose rows are uploaded to staging rows 0..len-1 (ascending).
    """

    first: int
    last: int
    gather_index: np.ndarray
    staged: np.ndarray


def split_gather(
    gather_index: np.ndarray, *, sparse_rows: int, sparse_capacity: int, resident: ResidentRows, staging_rows: int
) -> list[GatherPiece]:
    """A gather over ``[sparse tier (sparse_rows) | dense tier]`` source rows, remapped to the device's
    ``[sparse tier (sparse_capacity rows) | resident area | staging]`` and cut into pieces whose
    non-resident rows fit the staging area.

    A piece is the longest run of output rows whose non-resident rows span fewer than
    ``staging_rows`` distinct positions (in position order; gather plans go through the blocks in
    order, so pieces are few: one when the chosen blocks fit the staging area).
    """
    index = np.asarray(gather_index, np.int64)
    dense = index >= sparse_rows
    position = np.where(dense, index - sparse_rows, -1)
    resident_row = np.where(dense, resident.rows_of(position), -1)
    missing = dense & (resident_row < 0)
    source = np.where(dense, sparse_capacity + resident_row, index)
    if not missing.any():
        return [GatherPiece(0, len(index), source, np.zeros(0, np.int64))]
    wanted = np.unique(position[missing])
    rank = np.where(missing, np.searchsorted(wanted, position), -1)
    big = np.iinfo(np.int64).max
    low = np.where(missing, rank, big).min(axis=1)  # per output row; big / -1 when it needs no upload
    high = rank.max(axis=1)
    staging_base = sparse_capacity + resident.capacity
    pieces, first = [], 0
    while first < len(index):
        later = low[first:]
        r0 = int(later.min()) if later.min() != big else len(wanted)
        bad = (high[first:] >= r0 + staging_rows) | (low[first:] < r0)
        last = first + int(np.argmax(bad)) if bad.any() else len(index)
        if last == first:
            raise ValueError(f"one output row needs more than the {staging_rows} staging rows")
        r1 = max(int(high[first:last].max()) + 1, r0)
        piece_source = source[first:last].copy()
        piece_missing = missing[first:last]
        piece_source[piece_missing] = staging_base + rank[first:last][piece_missing] - r0
        pieces.append(GatherPiece(first, last, piece_source, wanted[r0:r1]))
        first = last
    return pieces
