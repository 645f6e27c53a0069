"""Mixing several datasets at set ratios: one epoch's order of (source, index) pairs."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxft.data.formats import DataError


def mixture_plan(sizes: Sequence[int], weights: Sequence[float] | None, *, epoch: int,
                 seed: int | Sequence[int]) -> np.ndarray:
    """One epoch's order as `[N, 2]` rows of `(source, index)`, shuffled; a function of its arguments only.

    Without weights every sample of every source appears once. With weights the epoch keeps the total size
    `N = sum(sizes)` and gives source `i` a share `w_i / sum(w)` of it, counted in samples: a small source with
    a large weight is repeated (a fresh permutation each pass), a large one is subsampled (different samples
    each epoch).
    """
    key = [seed] if isinstance(seed, int) else list(seed)
    sizes = [int(n) for n in sizes]
    total = sum(sizes)
    if weights is None:
        counts = sizes
    else:
        empty = [i for i, (n, w) in enumerate(zip(sizes, weights)) if n == 0 and w > 0]
        if empty:
            raise DataError("data.weights", "empty source", f"mixture source(s) {empty} have weight > 0 but no "
                            "samples left after cleaning")
        shares = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        counts = np.round(shares * total).astype(int).tolist()
    parts = []
    for source, (size, count) in enumerate(zip(sizes, counts)):
        picks, cycle = [], 0
        while sum(len(p) for p in picks) < count:
            picks.append(np.random.default_rng([*key, epoch, source, cycle]).permutation(size))
            cycle += 1
        indices = np.concatenate(picks)[:count] if picks else np.zeros(0, np.int64)
        parts.append(np.stack([np.full(count, source), indices], axis=1))
    plan = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
    return plan[np.random.default_rng([*key, epoch]).permutation(len(plan))]
