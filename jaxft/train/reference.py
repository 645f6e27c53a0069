"""Reference log-probs precomputed once over a run's packing units, before training (``precompute_reference``,
``reference_model``): the reference policy is then never evaluated in the train step, and its weights never sit in
memory beside the policy's.

The preference objectives read the reference only as per-document totals (:func:`jaxft.train.sequences.
segment_totals` of ``ref_logps``), so a unit's reference is stored as one float32 total per document, and the batch
array ``ref_logps`` [B, T] holds each total at its document's last labelled token (0 elsewhere): it sums per document
to the same totals as per-token log-probs would, and a cache of N units holds 2N numbers rather than N rows of them.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from jaxft.config import ModelConfig
from jaxft.data.chat import IGNORE_INDEX, Sample
from jaxft.data.packing import rows_to_batch
from jaxft.train.sequences import label_logprobs, segment_totals


def _document_totals(cfg: ModelConfig, chunk_size: int, params: dict, batch: dict) -> jax.Array:
    """[B, T]: each document's summed label log-probs, at index s for segment id s."""
    logps = label_logprobs(cfg, params, batch, chunk_size=chunk_size)
    return segment_totals(logps, batch["segment_ids"])


def documents(sample: Sample) -> tuple[int, ...]:
    """The lengths of the documents a sample is made of."""
    return sample.documents or (len(sample.input_ids),)


def reference_totals(cfg: ModelConfig, params: dict, samples: Sequence[Sample], *, rows: int, row_length: int,
                     pad_id: int, chunk_size: int, sharding=None, desc: str = "reference") -> list[np.ndarray]:
    """Per sample, its documents' reference log-probs [documents] float32: one pass over ``samples`` alone in rows
    of ``row_length`` tokens, ``rows`` per batch (this process's rows; a row holds one unit, so its documents' ids
    are 1, 2, ... as in any packed row). With a ``sharding`` (of [B, T] batches on the run's mesh) every process
    passes over its own samples, in as many batches as the process with the most."""
    step = jax.jit(partial(_document_totals, cfg, chunk_size))
    n_batches = -(-len(samples) // rows)
    if sharding is not None and jax.process_count() > 1:  # collectives: every process runs every batch
        n_batches = int(multihost_utils.process_allgather(np.array([n_batches])).max())
    totals = []
    for b in tqdm(range(n_batches), desc=desc, unit="batch", dynamic_ncols=True, disable=jax.process_index() != 0):
        chunk = list(range(b * rows, min((b + 1) * rows, len(samples))))
        batch = rows_to_batch(samples, [[i] for i in chunk] + [[]] * (rows - len(chunk)), row_length, pad_id, {})
        batch = {k: batch[k] for k in ("input_ids", "labels", "segment_ids", "positions")}
        if sharding is None:
            out = np.asarray(step(params, batch))
        else:
            placed = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
            out = np.asarray(multihost_utils.global_array_to_host_local_array(step(params, placed), sharding.mesh,
                                                                              sharding.spec))
        totals += [out[r, 1:1 + len(documents(samples[i]))].astype(np.float32) for r, i in enumerate(chunk)]
    return totals


def per_token(sample: Sample, totals: np.ndarray) -> np.ndarray:
    """[tokens] float32: each document's total at its last labelled token, 0 elsewhere (a document without labels
    has total 0 and needs no place)."""
    out = np.zeros(len(sample.input_ids), np.float32)
    start = 0
    for length, total in zip(documents(sample), totals, strict=True):
        labelled = np.flatnonzero(sample.labels[start:start + length] != IGNORE_INDEX)
        if len(labelled):
            out[start + labelled[-1]] = total
        start += length
    return out
