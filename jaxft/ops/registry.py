"""The method registry: the one place a fine-tuning method declares itself.

A method owns a namespace inside a leaf group of the param tree, next to the model's own leaves::

    {"kernel": W, "bias"?: b, "lora": {"a": ..., "b": ..., "scale": ...}, "channel_scale": {"scale": ...}}

and says, in one object (a :class:`Method` subclass, registered with :func:`register`): which of its leaves train,
their logical axes, what it does in the forward pass (of a linear group, or to an embedding group's table and
lookup), how it merges into the base weight and back out (or that it cannot), and how many parameters it really
trains. ``ops.linear.linear`` composes the base with the methods present in a group; ``jaxft.peft.methods`` walks
trees with the same declarations (split, merge, unmerge, counts), ``jaxft.parallel`` shards by their axes and
``jaxft.hf.peft_format`` writes the ones that have a PEFT format. Nothing else in jaxft names a method.
"""
from __future__ import annotations

import abc
from typing import Callable, NamedTuple

import jax.numpy as jnp

from jaxft.config import ConfigError

BASE_LEAVES = frozenset({"kernel", "bias", "embedding", "scale"})  # the model's own leaves of a group


class PeftTensor(NamedTuple):
    """One tensor of a method in PEFT's adapter file, named ``<the module's HF name>.<suffix>``."""

    suffix: str  # e.g. "lora_A.weight"
    leaf: str  # the method's leaf that holds it
    layer: int | None  # index on the stacked layer axis (None: an unstacked group)
    transpose: bool = False  # torch keeps the two dims the other way round ([out, in])
    rank: int | None = None  # only the first ``rank`` entries of ``rank_axis`` are real (the rest is padding)
    rank_axis: int | None = None  # of the leaf's slice for ``layer``, in jax's layout


class Method(abc.ABC):
    """A fine-tuning method's declarations. Subclass, set ``name`` and ``trained``, override what applies.

    Methods in one group compose in registration order: each one's ``linear`` gets the one registered before it
    as ``inner`` (``None`` when it is the first: then the base is the plain kernel, which a method may fuse with
    its own matmul, as LoRA does). Merging goes in the same order, unmerging in the reverse one.
    """

    name: str = ""                         # the namespace key inside a leaf group
    trained: frozenset[str] = frozenset()  # the leaves of its namespace that train

    @abc.abstractmethod
    def axes(self, base: dict[str, tuple]) -> dict[str, tuple]:
        """Logical axes of its leaves, given the axes the model declares for the group's own leaves (``base``,
        e.g. ``{"kernel": ("layer", "embed", "heads"), "bias": ...}``)."""

    def linear(self, p: dict, group: dict, x, rng, inner: Callable | None):
        """y of the group for input x [..., in]; ``p`` is this method's namespace, ``inner(x)`` the output of the
        group without this method (``None``: the plain base, ``base_linear(group, x)``)."""
        raise ConfigError(f"method {self.name!r} has no form for a linear layer")

    def table(self, p: dict, table: jnp.ndarray) -> jnp.ndarray:
        """An embedding group's [V, D] table as the model sees it (also as the tied output head)."""
        return table

    def embed(self, p: dict, ids, x: jnp.ndarray) -> jnp.ndarray:
        """The embeddings x [..., D] of ``ids`` after the table lookup."""
        return x

    def norm(self, p: dict, scale: jnp.ndarray) -> jnp.ndarray:
        """A norm group's scale [..., D] as the model applies it."""
        return scale

    def merge(self, p: dict, group: dict) -> dict:
        """The group's own leaves with this method folded into them (float32 base weights in, base dtypes out
        are the caller's business)."""
        raise ConfigError(f"method {self.name!r} cannot be merged into the base weights")

    def unmerge(self, p: dict, group: dict) -> dict:
        """The inverse of :meth:`merge`: the group's own leaves with this method taken out again."""
        raise ConfigError(f"method {self.name!r} cannot be unmerged from merged weights")

    def peft_tensors(self, p: dict, group: dict, stacked: bool) -> list[PeftTensor]:
        """Its tensors in PEFT's adapter format (``stacked``: the group's leaves lead with the layer axis)."""
        raise ConfigError(f"method {self.name!r} has no PEFT adapter format; merge it into the weights "
                          "(jaxft.merge) and save the full model instead")

    def count(self, p: dict) -> int:
        """Parameters it really trains (a method with padding, as LoRA's ranks, counts without it)."""
        return sum(int(p[leaf].size) for leaf in self.trained if leaf in p)


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make ``method`` known by its name (re-registering a name replaces the method: a re-imported module)."""
    if not method.name or method.name in BASE_LEAVES:
        raise ConfigError(f"a method needs a namespace name other than the model's leaves {sorted(BASE_LEAVES)}; "
                          f"got {method.name!r}")
    REGISTRY[method.name] = method
    return method


def methods_in(group: dict) -> list[Method]:
    """The registered methods present in a leaf group, in registration order; a namespace nobody registered is an
    error (a tree from a method whose module was not imported)."""
    unknown = [k for k, v in group.items() if isinstance(v, dict) and k not in REGISTRY]
    if unknown:
        raise ConfigError(f"leaf group with {sorted(group)}: {unknown} is no registered method's namespace; import "
                          f"the module that registers it (known: {sorted(REGISTRY)})")
    return [m for name, m in REGISTRY.items() if name in group]


def norm_scale(group: dict) -> jnp.ndarray:
    """A norm group's scale with the methods present in it applied (LN-tuning's trained copy replaces it)."""
    scale = group["scale"]
    for method in methods_in(group):
        scale = method.norm(group[method.name], scale)
    return scale


def own_leaves(group: dict) -> dict:
    """The group without any method's namespace: the model's own leaves."""
    return {k: v for k, v in group.items() if k not in REGISTRY}
