"""One predicate decides what is trained: it drives ``split`` and so the gradients and the optimizer state.

The predicate is a :class:`Trainable`, kept beside the params (never inside them): a leaf trains when a registered
method declares it trained (LoRA's ``a``, ``b``, ``magnitude``, ...: see :mod:`jaxft.ops.registry`), or when its
``"a/b/leaf"`` path is selected whole (``modules_to_save``, ``bias="all"``, BitFit), or always (full fine-tuning).
It is hashable, so it is static under ``jit`` and a run's state can carry it.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np
from flax import traverse_util

from jaxft.ops.nf4 import QuantizedTensor
from jaxft.ops.registry import REGISTRY


# A tree may nest a second model's own leaves (its methods' namespaces and its head) under one of these keys, over
# the outer model's base: PPO's value model (jaxft.train.ppo) beside the policy's adapters. The nested leaves have
# the model's axes (jaxft.parallel), all of them train, and a run's export is the outer model's (outer_model).
NESTED_MODELS = ("value",)


def outer_model(params: dict) -> dict:
    """``params`` without the nested models' leaves: the model itself."""
    return {k: v for k, v in params.items() if k not in NESTED_MODELS}


def path_names(path) -> tuple[str, ...]:
    """A jax key path as one name per step: dict key, attribute (namedtuple field) or sequence index."""
    return tuple(jax.tree_util.keystr((entry,), simple=True) for entry in path)


def path_str(path) -> str:
    """A jax key path as the ``"a/b/leaf"`` string that marks, messages and file layouts use."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def leaf_paths(params: dict) -> list[str]:
    """The ``"a/b/leaf"`` path of every array (or 4-bit tensor) of a nested-dict tree; ``None`` holes skipped."""
    return [path for path, leaf in traverse_util.flatten_dict(params, sep="/").items() if leaf is not None]


@dataclass(frozen=True)
class Trainable:
    """What trains: every leaf a registered method declares trained, plus the leaves at ``paths`` (``"a/b/leaf"``),
    or every leaf (``everything``: full fine-tuning). Called as the predicate ``(key path, leaf) -> bool``."""

    paths: frozenset[str] = frozenset()
    everything: bool = False

    def __post_init__(self):
        object.__setattr__(self, "paths", frozenset(self.paths))  # hashable whatever collection was given

    def __call__(self, path, _leaf=None) -> bool:
        names = path_names(path)
        if self.everything or (len(names) > 1 and names[-1] in getattr(REGISTRY.get(names[-2]), "trained", ())):
            return True
        return path_str(path) in self.paths

    def __or__(self, other: "Trainable") -> "Trainable":
        return Trainable(self.paths | other.paths, self.everything or other.everything)


def _is_quantized(x) -> bool:
    return isinstance(x, QuantizedTensor)


def split(params: dict, predicate) -> tuple[dict, dict]:
    """(trainable, frozen): two trees of the same structure, ``None`` where the other one holds the leaf.

    ``predicate`` is what trains, always given: ``Trainable()`` (the leaves the methods declare trained), a config's
    answer such as ``lcfg.trainable(cfg, params)`` (also ``modules_to_save`` and biases), or any
    ``(key path, leaf) -> bool``. No default, so a selection cannot be forgotten silently."""
    keep = jax.tree_util.tree_map_with_path(lambda p, x: predicate(p, x), params, is_leaf=_is_quantized)
    trainable = jax.tree.map(lambda x, k: x if k else None, params, keep, is_leaf=_is_quantized)
    frozen = jax.tree.map(lambda x, k: None if k else x, params, keep, is_leaf=_is_quantized)
    return trainable, frozen


def combine(trainable: dict, frozen: dict) -> dict:
    """Inverse of :func:`split`."""
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None)


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))
