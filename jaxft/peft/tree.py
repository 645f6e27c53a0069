"""One predicate decides what is trained: it drives ``split`` and so the gradients and the optimizer state.

A leaf is trainable when its key is an adapter weight (``lora_a``, ``lora_b``, ``lora_magnitude``, …) or when its
path is listed in ``params["trainable"]`` — a dict of ``"a/b/leaf" -> None`` that methods such as
``modules_to_save`` or ``bias="all"`` fill. Its values are ``None``, so it holds no arrays: it lives in the
tree's structure (static under ``jit``) and travels with the params through every tree transformation.
"""
from __future__ import annotations

import jax
import numpy as np
from flax import traverse_util

from jaxft.ops.nf4 import QuantizedTensor

TRAINABLE_KEYS = frozenset({"lora_a", "lora_b", "lora_magnitude", "lora_embedding_a", "lora_embedding_b",
                            "trainable_rows"})
MARKER = "trainable"


def path_names(path) -> tuple[str, ...]:
    """A jax key path as one name per step: dict key, attribute (namedtuple field) or sequence index."""
    return tuple(jax.tree_util.keystr((entry,), simple=True) for entry in path)


def path_str(path) -> str:
    """A jax key path as the ``"a/b/leaf"`` string that marks, messages and file layouts use."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def leaf_paths(params: dict) -> list[str]:
    """The ``"a/b/leaf"`` path of every array (or 4-bit tensor) of a nested-dict tree; ``None`` holes skipped."""
    return [path for path, leaf in traverse_util.flatten_dict(params, sep="/").items() if leaf is not None]


def is_trainable(params: dict):
    """The predicate ``(path, leaf) -> bool`` for this tree."""
    marked = frozenset(params.get(MARKER) or ())

    def predicate(path, _leaf) -> bool:
        name = path_str(path)
        return name.rsplit("/", 1)[-1] in TRAINABLE_KEYS or name in marked

    return predicate


def _is_quantized(x) -> bool:
    return isinstance(x, QuantizedTensor)


def split(params: dict, predicate=None) -> tuple[dict, dict]:
    """(trainable, frozen): two trees of the same structure, ``None`` where the other one holds the leaf."""
    predicate = predicate or is_trainable(params)
    keep = jax.tree_util.tree_map_with_path(lambda p, x: predicate(p, x), params, is_leaf=_is_quantized)
    trainable = jax.tree.map(lambda x, k: x if k else None, params, keep, is_leaf=_is_quantized)
    frozen = jax.tree.map(lambda x, k: None if k else x, params, keep, is_leaf=_is_quantized)
    return trainable, frozen


def combine(trainable: dict, frozen: dict) -> dict:
    """Inverse of :func:`split`."""
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None)


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def summary(params: dict, trainable_count: int | None = None) -> str:
    """A one-line count of trainable vs total parameters and bytes.

    ``trainable_count`` overrides the raw leaf count where padding (ranks padded to the largest) is not real.
    """
    trainable, frozen = split(params)
    n_train = sum(x.size for x in jax.tree.leaves(trainable)) if trainable_count is None else trainable_count
    n_frozen = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen, is_leaf=_is_quantized))
    total = n_train + n_frozen
    return (f"trainable params: {n_train:,} || all params: {total:,} || trainable%: {100 * n_train / total:.4f} "
            f"|| trainable bytes: {nbytes(trainable):,} || frozen bytes: {nbytes(frozen):,}")

