"""One predicate decides what is trained: it drives ``split``, the gradients and the optax mask.

A leaf is trainable when its key is an adapter weight (``lora_a``, ``lora_b``, ``lora_magnitude``, …) or when its
path is listed in ``params["trainable"]`` — a dict of ``"a/b/leaf" -> None`` that methods such as
``modules_to_save`` or ``bias="all"`` fill. Its values are ``None``, so it holds no arrays: it lives in the
tree's structure (static under ``jit``) and travels with the params through every tree transformation.
"""
from __future__ import annotations

import jax
import numpy as np

from jaxft.ops.nf4 import QuantizedTensor

TRAINABLE_KEYS = frozenset({"lora_a", "lora_b", "lora_magnitude", "lora_embedding_a", "lora_embedding_b",
                            "trainable_rows"})
MARKER = "trainable"


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


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


def optax_mask(params: dict, predicate=None) -> dict:
    """The same predicate as a boolean tree, for ``optax.masked`` when a tree holds both parts."""
    predicate = predicate or is_trainable(params)
    return jax.tree_util.tree_map_with_path(lambda p, x: predicate(p, x), params, is_leaf=_is_quantized)


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

