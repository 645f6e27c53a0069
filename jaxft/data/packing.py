"""Padding-free packing: whole documents into fixed-length rows, kept apart by segment ids.

Rows are filled by best-fit-decreasing (longest document first, each into the open row with the least room
that still fits it), which truncates no document and typically fills > 95% of the slots of SFT data.
Each document in a row gets its own segment id (1, 2, ...; 0 is padding) and positions restarting at 0, which
`jaxft.forward` turns into a block-diagonal causal mask and per-document RoPE. Labels were shifted per
document before packing (`jaxft.data.chat`), so a document's first token is never the previous one's target.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

from jaxft.data.chat import IGNORE_INDEX, Sample
from jaxft.data.formats import DataError


class _OpenSpaces:
    """Max segment tree over remaining-space values 1..capacity.

    `smallest_at_least(n)` finds the tightest open row in O(log capacity), so packing a million documents
    stays fast in pure Python.
    """

    def __init__(self, capacity: int):
        self.size = 1 << (capacity - 1).bit_length()
        self.tree = [0] * (2 * self.size)

    def _set(self, space: int, value: int) -> None:
        i = self.size + space - 1
        self.tree[i] = value
        while i > 1:
            i >>= 1
            left, right = self.tree[2 * i], self.tree[2 * i + 1]
            self.tree[i] = left if left >= right else right

    def open(self, space: int) -> None:
        self._set(space, space)

    def close(self, space: int) -> None:
        self._set(space, 0)

    def smallest_at_least(self, length: int) -> int:
        i = 1
        while i < self.size:
            i = 2 * i if self.tree[2 * i] >= length else 2 * i + 1
        return self.tree[i]


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group item indices into bins of total length <= `capacity` (every length must be 1..capacity).

    Deterministic: equal lengths are placed in index order, and among rows with equal room the oldest wins.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"packing needs lengths in 1..{capacity}, got {lengths.min()}..{lengths.max()}")
    spaces = _OpenSpaces(capacity)
    spaces.open(capacity)  # a fresh, empty row is always available
    rows_with_space: dict[int, deque] = {}
    bins: list[list[int]] = []
    for index in np.argsort(-lengths, kind="stable").tolist():
        length = int(lengths[index])
        space = spaces.smallest_at_least(length)
        if space == capacity:
            row = len(bins)
            bins.append([])
        else:
            row = rows_with_space[space].popleft()
            if not rows_with_space[space]:
                spaces.close(space)
        bins[row].append(index)
        left = space - length
        if left > 0:
            rows_with_space.setdefault(left, deque()).append(row)
            spaces.open(left)
    return bins


def packing_efficiency(lengths: Sequence[int], num_rows: int, row_length: int) -> float:
    """Share of token slots holding real tokens (1.0 = no padding)."""
    return float(np.sum(lengths)) / max(1, num_rows * row_length)


def extras_layout(samples: Sequence[Sample]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The per-token `extras` keys the samples carry: key -> (shape after the token axis, dtype).

    Every sample must carry the same keys, shapes and dtypes (one task per run) with one entry per token, or a
    batch would silently miss a target: a DataError names the first sample that differs.
    """

    def layout_of(sample: Sample) -> dict:
        return {key: (value.shape[1:], value.dtype) for key, value in (sample.extras or {}).items()}

    layout = layout_of(samples[0]) if samples else {}
    for sample in samples:
        if layout_of(sample) != layout:
            raise DataError(sample.source, "mixed sample extras",
                            f"per-token arrays {layout_of(sample)} differ from {layout} of {samples[0].source}; "
                            "the samples of one run must all be of one task")
        lengths = {len(value) for value in (sample.extras or {}).values()}
        if lengths - {len(sample.input_ids)}:
            raise DataError(sample.source, "bad sample extras",
                            f"per-token arrays of lengths {sorted(lengths)} for {len(sample.input_ids)} tokens")
    return layout


def rows_to_batch(samples: Sequence[Sample], rows: Sequence[Sequence[int]], row_length: int, pad_id: int,
                  layout: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None) -> dict[str, np.ndarray]:
    """Lay out rows of sample indices as a batch of `[len(rows), row_length]` int32 arrays.

    An empty row is all padding (segment 0, labels -100): it fills out the last batch of an epoch. A sample made of
    several `documents` takes one segment id per document. Samples'
    `extras` become `[len(rows), row_length, ...]` arrays, 0 where no document is; `layout` (`extras_layout`
    of all samples) fixes their keys, else the samples in these rows decide.
    """
    if layout is None:
        layout = extras_layout([samples[index] for row in rows for index in row])
    shape = (len(rows), row_length)
    batch = {"input_ids": np.full(shape, pad_id, np.int32), "labels": np.full(shape, IGNORE_INDEX, np.int32),
             "segment_ids": np.zeros(shape, np.int32), "positions": np.zeros(shape, np.int32)}
    batch.update({key: np.zeros(shape + tail, dtype) for key, (tail, dtype) in layout.items()})
    for r, row in enumerate(rows):
        start, segment = 0, 0
        for index in row:
            sample = samples[index]
            end = start + len(sample.input_ids)
            batch["input_ids"][r, start:end] = sample.input_ids
            batch["labels"][r, start:end] = sample.labels
            for key in layout:
                batch[key][r, start:end] = sample.extras[key]
            for length in sample.documents or (end - start,):
                segment += 1
                batch["segment_ids"][r, start:start + length] = segment
                batch["positions"][r, start:start + length] = np.arange(length)
                start += length
    return batch
