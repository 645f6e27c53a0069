"""A deterministic, resumable, per-process iterator of packed fixed-shape batches.

The training engine consumes any `DataIterator`: an endless iterator of batches (dicts of numpy arrays) whose
position is a small JSON-able dict stored in the checkpoint. Batches here are

| key           | shape  | dtype | meaning                                                                  |
|---------------|--------|-------|--------------------------------------------------------------------------|
| `input_ids`   | [B, T] | int32 | tokens; padding is the tokenizer's pad id (or 0)                          |
| `labels`      | [B, T] | int32 | target of the logit at the same position (already shifted); -100 = none  |
| `segment_ids` | [B, T] | int32 | document number within the row, from 1; 0 = padding                      |
| `positions`   | [B, T] | int32 | position within the document, restarting at 0                             |

Everything that decides a batch (which samples, their order, the rows they are packed into) is a pure
function of `(seed, process_index, epoch)` and the samples, so `set_state(get_state())` on a fresh iterator
over the same data resumes at the exact batch. Iteration never stops: after the last batch of an epoch the
next epoch starts with a new order. Processes of a multi-host run hold disjoint shards of the examples
(`shard_indices`), so their epochs may end a batch apart; the engine counts steps, not epochs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

from jaxft.data.chat import Sample
from jaxft.data.formats import DataError, DataReport
from jaxft.data.mixture import mixture_plan
from jaxft.data.packing import best_fit_decreasing, extras_layout, packing_efficiency, rows_to_batch

STATE_VERSION = 1


@runtime_checkable
class DataIterator(Protocol):
    """The training engine's view of its data: batches, and a checkpointable position.

    `get_state()` returns a JSON-serializable dict; `set_state(state)` on an iterator built from the same
    data and settings makes the next `next()` return the batch that followed when the state was taken. An eval
    iterator also has `rewind()` (back to its first batch) and `batches_up_to(n)`: ``min(n, batches of one
    epoch)``, counting no further than ``n`` where counting costs (`jaxft.recipes.skeleton.eval_batches`).
    """

    def __iter__(self) -> "DataIterator": ...

    def __next__(self) -> dict[str, np.ndarray]: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


def shard_indices(num_items: int, *, seed: int, process_index: int, process_count: int) -> np.ndarray:
    """This process's share of `num_items` items: a seeded permutation, every `process_count`-th entry.

    The permutation spreads long and short (or early and late) records evenly over processes.
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside 0..{process_count - 1}")
    return np.sort(np.random.default_rng([seed, num_items]).permutation(num_items)[process_index::process_count])


class PackedIterator:
    """Endless batches of `batch_size` rows of `row_length` tokens over one process's samples.

    `sources` are lists of samples (one per dataset); `weights` mix them per epoch (`mixture_plan`). With
    `packing`, rows hold several documents (best-fit-decreasing); without, one sample per row, padded.
    The last batch of an epoch is filled up with all-padding rows rather than dropping samples.
    """

    def __init__(self, sources: Sequence[Sequence[Sample]], *, batch_size: int, row_length: int,
                 packing: bool = True, weights: Sequence[float] | None = None, seed: int = 0, pad_id: int = 0,
                 process_index: int = 0, process_count: int = 1):
        self.samples = [sample for source in sources for sample in source]
        if not self.samples:
            raise DataError(f"process {process_index} of {process_count}", "no samples", "no samples to iterate over")
        too_long = [s.source for s in self.samples if len(s.input_ids) > row_length]
        if too_long:
            raise ValueError(f"{len(too_long)} samples are longer than row_length {row_length}, e.g. {too_long[0]}")
        self.sizes = [len(source) for source in sources]
        self.offsets = np.cumsum([0, *self.sizes[:-1]])
        self.batch_size, self.row_length, self.packing = batch_size, row_length, packing
        self.weights = None if weights is None else [float(w) for w in weights]
        self.seed, self.pad_id = seed, pad_id
        self.process_index, self.process_count = process_index, process_count
        self.extras_layout = extras_layout(self.samples)  # fixed for every batch, all-padding ones included
        self.fingerprint = self._fingerprint()
        self.epoch, self.batch_index = 0, 0
        self._rows: list[list[int]] | None = None
        self.epoch_stats: dict = {}

    def add_extras(self, key: str, values: Sequence[np.ndarray]) -> None:
        """Give every sample (in ``self.samples`` order) the per-token array ``values[i]`` as its extra ``key``:
        arrays derived from the samples after they were read (a precomputed reference's log-probs), so the
        fingerprint stays the data's and saved positions still resume."""
        if len(values) != len(self.samples):
            raise ValueError(f"extras {key!r}: {len(values)} arrays for {len(self.samples)} samples")
        self.samples = [dataclasses.replace(s, extras={**(s.extras or {}), key: v})
                        for s, v in zip(self.samples, values)]
        self.extras_layout = extras_layout(self.samples)

    def _fingerprint(self) -> str:
        """Identifies the data and settings a state belongs to, so a mismatched resume fails loudly."""
        digest = hashlib.sha1()
        for sample in self.samples:
            digest.update(sample.input_ids.tobytes())
            digest.update(sample.labels.tobytes())
            if sample.documents is not None:  # absent from SFT samples, whose fingerprints stay as runs saved them
                digest.update(repr(sample.documents).encode())
            for key, value in sorted((sample.extras or {}).items()):
                digest.update(key.encode())
                digest.update(value.tobytes())
        settings = [self.sizes, self.batch_size, self.row_length, self.packing, self.weights, self.pad_id]
        digest.update(json.dumps(settings).encode())
        return digest.hexdigest()[:16]

    def _plan_epoch(self, epoch: int) -> list[list[int]]:
        key = (self.seed, self.process_index)
        plan = mixture_plan(self.sizes, self.weights, epoch=epoch, seed=key)
        order = (self.offsets[plan[:, 0]] + plan[:, 1]).tolist()
        if self.packing:
            lengths = [len(self.samples[i].input_ids) for i in order]
            rows = [[order[j] for j in row] for row in best_fit_decreasing(lengths, self.row_length)]
            # best-fit-decreasing emits rows long documents first; shuffle so batches are not sorted by length
            shuffle = np.random.default_rng([*key, epoch, 1]).permutation(len(rows))
            rows = [rows[j] for j in shuffle]
        else:
            rows = [[i] for i in order]
        used = sum(len(self.samples[i].input_ids) for i in order)
        self.epoch_stats = {"epoch": epoch, "samples": len(order), "rows": len(rows),
                            "packing_efficiency": packing_efficiency([used], len(rows), self.row_length)}
        rows += [[] for _ in range(-len(rows) % self.batch_size)]
        return rows

    @property
    def batches_per_epoch(self) -> int:
        if self._rows is None:
            self._rows = self._plan_epoch(self.epoch)
        return len(self._rows) // self.batch_size

    def batches_up_to(self, n: int) -> int:
        """``min(n, batches_per_epoch)``; the epoch's plan is in memory already, so this costs no reading."""
        return max(0, min(n, self.batches_per_epoch))

    def __iter__(self) -> "PackedIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._rows is None:
            self._rows = self._plan_epoch(self.epoch)
        if self.batch_index * self.batch_size >= len(self._rows):
            self.epoch, self.batch_index = self.epoch + 1, 0
            self._rows = self._plan_epoch(self.epoch)
        start = self.batch_index * self.batch_size
        self.batch_index += 1
        return rows_to_batch(self.samples, self._rows[start:start + self.batch_size], self.row_length, self.pad_id,
                             self.extras_layout)

    def rewind(self) -> None:
        """Back to the first batch of the first epoch (an evaluation reads the same batches each time)."""
        self.epoch, self.batch_index, self._rows = 0, 0, None

    def get_state(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "batch": self.batch_index, "seed": self.seed,
                "process_index": self.process_index, "process_count": self.process_count,
                "fingerprint": self.fingerprint}

    def set_state(self, state: dict) -> None:
        check_state(state, {"version": STATE_VERSION, "seed": self.seed, "process_index": self.process_index,
                            "process_count": self.process_count, "fingerprint": self.fingerprint},
                    "data iterator state", "does not match this data", "a different file, cleaning, tokenizer, "
                    "seed, batch shape or process layout would not resume at the same sample")
        self.epoch, self.batch_index = int(state["epoch"]), int(state["batch"])
        self._rows = None


def check_state(state: dict, expected: dict, location: str, reason: str, why: str) -> None:
    """DataError unless a saved iterator ``state`` has the ``expected`` values (version, seed, process layout,
    fingerprint), naming each that differs and ``why`` it matters."""
    wrong = {key: (state.get(key), value) for key, value in expected.items() if state.get(key) != value}
    if wrong:
        details = ", ".join(f"{key}: checkpoint {got!r} vs now {want!r}" for key, (got, want) in wrong.items())
        raise DataError(location, reason, f"{details}; {why}")


class DataPipeline(NamedTuple):
    """What a run needs from its data: the batches, the report of what was dropped, and the chat template
    used (None for non-chat data), to save with the run and export with the adapter."""

    iterator: PackedIterator
    report: DataReport
    chat_template: str | None
