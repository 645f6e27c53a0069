"""A run's precomputed reference log-probs (a preference task's ``precompute_reference`` or ``reference_model``):
one pass over every packing unit of its train and eval data before training, cached in ``<run>/reference/``.

The reference is a separate model folder, loaded as the run's base is (dtype, compute dtype, quant) and dropped
before the policy loads, so the two are never in memory together; or, without one, the run's initial params with
the adapters off (the base; for full fine-tuning the initial weights). Each process passes over its own shard of
the units and caches them in its own files, ``process<i>.safetensors`` (per pipeline, every unit's document
totals, :mod:`jaxft.train.reference`) and ``process<i>.json`` (the fingerprint they belong to).

A resumed run reuses a cache whose fingerprint matches (the data iterators' fingerprints, the reference's identity:
the sha256 of its weights, dtypes, quantization and length limits) on every process; one that does not match is recomputed and replaced, not refused: the
cache is derived from the run's inputs, never its only copy, and a resume may change its eval data. A changed
train file is refused by the resume itself (the data position in the checkpoint names it).
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxft import parallel
from jaxft.config import ConfigError
from jaxft.files import write_text_atomic
from jaxft.hf.checkpoint import from_pretrained
from jaxft.hf.safetensors_io import SafetensorsFile, write_safetensors
from jaxft.peft.methods import without_methods
from jaxft.recipes.config import RunConfig
from jaxft.recipes.skeleton import Inputs, base_config
from jaxft.train.checkpoint import base_reference
from jaxft.train.reference import documents, per_token, reference_totals

CACHE_DIR = "reference"


class ReferenceLogps(NamedTuple):
    """Per pipeline (``train``, ``eval``), every unit's reference document totals, in the iterator's sample order."""

    fingerprint: dict
    totals: dict[str, list[np.ndarray]]
    seconds: float | None  # the pass's duration; None when read from the cache


def _iterators(inputs: Inputs) -> dict:
    return {"train": inputs.pipeline.iterator,
            **({"eval": inputs.eval_pipeline.iterator} if inputs.eval_pipeline is not None else {})}


def _cache_files(out: Path) -> tuple[Path, Path]:
    stem = Path(out) / CACHE_DIR / f"process{jax.process_index()}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def _fingerprint(cfg: RunConfig, inputs: Inputs, base: dict) -> dict:
    """What the cached log-probs depend on; ``base``: the run's base fingerprint (``base_reference``)."""
    task = cfg.task
    if task.reference_model is None:
        reference = {"adapters_off_of": base["sha256"]}
    else:
        folder = Path(task.reference_model).resolve()  # its weights too: a folder re-exported in place is another
        reference = {"reference_model": str(folder), "sha256": base_reference(folder)["sha256"]}
    return {"reference": reference, "dtype": cfg.dtype, "compute_dtype": cfg.compute_dtype,
            "quant": dataclasses.asdict(cfg.quant) if cfg.quant else None,
            "data": {name: it.fingerprint for name, it in _iterators(inputs).items()},
            "max_length": {"train": cfg.data.max_length, "eval": cfg.eval_data.max_length if cfg.eval_data else None},
            "max_prompt_length": task.max_prompt_length, "max_completion_length": task.max_completion_length,
            "process_count": jax.process_count()}


def _read_cache(out: Path, fingerprint: dict, inputs: Inputs) -> ReferenceLogps | None:
    """The cached totals when their fingerprint is ``fingerprint`` (and they fit the units), else None."""
    arrays, record = _cache_files(out)
    if not (arrays.is_file() and record.is_file()) or json.loads(record.read_text()) != fingerprint:
        return None
    stored, totals = SafetensorsFile(arrays), {}
    for name, it in _iterators(inputs).items():
        sizes = [len(documents(s)) for s in it.samples]
        flat = stored.get(name) if name in stored.keys() else np.zeros(0, np.float32)
        if len(flat) != sum(sizes):
            return None
        totals[name] = np.split(flat, np.cumsum(sizes)[:-1])
    return ReferenceLogps(fingerprint, totals, None)


def _everywhere(flag: bool) -> bool:
    """``flag`` holds on every process (a process that lost its cache files recomputes with all the others)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.all(multihost_utils.process_allgather(np.asarray(flag))))


def _reference_model(cfg: RunConfig, mesh):
    """The separate reference model, loaded as the run's base is; it must share the run's vocabulary."""
    folder = cfg.task.reference_model
    model_cfg, params = from_pretrained(folder, dtype=cfg.dtype, compute_dtype=cfg.compute_dtype, quant=cfg.quant,
                                        mesh=mesh)
    vocab = base_config(cfg).vocab_size
    if model_cfg.head is not None or model_cfg.vocab_size != vocab:
        raise ConfigError(f"task.reference_model {folder!r}: expected a causal LM with the base's vocabulary "
                          f"({vocab} tokens), got a {model_cfg.head.kind if model_cfg.head else 'causal LM'} "
                          f"with {model_cfg.vocab_size}; the reference scores the run's tokens")
    return cfg.train.apply(model_cfg), params


def precompute_reference(cfg: RunConfig, inputs: Inputs, out: Path, base: dict, *, resume: bool,
                         policy: tuple | None = None) -> ReferenceLogps | None:
    """The run's reference log-probs (None when its task has no precomputed reference): a resumed run's matching
    cache, else one pass of the reference. Called before the policy loads (``policy`` None) for a separate
    ``reference_model``, and after, with ``policy`` = (model config, the run's initial params), for the
    adapters-off base; the other call returns None."""
    task = cfg.task
    if not getattr(task, "precomputed_reference", False) or (policy is None) != (task.reference_model is not None):
        return None
    fingerprint = _fingerprint(cfg, inputs, base)
    cached = _read_cache(out, fingerprint, inputs) if resume else None
    if _everywhere(cached is not None):  # the pass is collective: every process reuses its cache, or none does
        return cached
    start = time.perf_counter()
    model_cfg, params = _reference_model(cfg, inputs.mesh) if policy is None else (policy[0],
                                                                                  without_methods(policy[1]))
    sharding = parallel.batch_sharding(inputs.mesh, 2)
    totals = {name: reference_totals(model_cfg, params, it.samples, rows=it.batch_size, row_length=it.row_length,
                                     pad_id=it.pad_id, chunk_size=cfg.train.loss_chunk_size, sharding=sharding,
                                     desc=f"reference log-probs ({name})")
              for name, it in _iterators(inputs).items()}
    return ReferenceLogps(fingerprint, totals, time.perf_counter() - start)


def use_reference(reference: ReferenceLogps | None, inputs: Inputs, out: Path):
    """Once the run folder is written: caches freshly computed log-probs there (the arrays first, then the
    fingerprint that vouches for them, each written atomically) and gives every pipeline its ``ref_logps``."""
    if reference is None:
        return
    arrays, record = _cache_files(out)
    if reference.seconds is not None:
        arrays.parent.mkdir(exist_ok=True)
        record.unlink(missing_ok=True)  # arrays without a matching record are never read
        write_safetensors(arrays, {name: np.concatenate(t or [np.zeros(0, np.float32)])
                                   for name, t in reference.totals.items()})
        write_text_atomic(record, json.dumps(reference.fingerprint, indent=2))
    for name, it in _iterators(inputs).items():
        it.add_extras("ref_logps", [per_token(s, t) for s, t in zip(it.samples, reference.totals[name])])
    units = sum(len(t) for t in reference.totals.values())
    if jax.process_index() == 0:
        done = (f"{reference.seconds:.1f} s, cached at" if reference.seconds is not None else "reused from")
        print(f"reference log-probs: {units} units, {done} {arrays.parent}", file=sys.stderr)
