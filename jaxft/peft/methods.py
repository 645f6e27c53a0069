"""Tree walks over the registered methods (:mod:`jaxft.ops.registry`): merge, unmerge, the adapters alone, and
counts. They name no method: a method registered in a test file merges and counts like LoRA."""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.config import ConfigError
from jaxft.ops import nf4
from jaxft.ops.linear import dense_kernel
from jaxft.ops.registry import REGISTRY, methods_in, own_leaves
from jaxft.peft.prefix import prompt_groups
from jaxft.peft.tree import Trainable, nbytes, path_names, split


def _is_group(value) -> bool:
    return isinstance(value, dict)


def _walk(tree: dict, fn) -> dict:
    """``fn(group)`` on every dict holding a method namespace; other dicts are walked into."""
    if any(name in tree for name in REGISTRY if _is_group(tree.get(name))):
        return fn(tree)
    return {k: _walk(v, fn) if _is_group(v) else v for k, v in tree.items()}


def _merge_group(group: dict) -> dict:
    own = own_leaves(group)
    dtypes = {k: jnp.float32 if isinstance(v, nf4.QuantizedTensor) else v.dtype for k, v in own.items()}
    merged = {k: dense_kernel(v, jnp.float32) if k == "kernel" else v.astype(jnp.float32) for k, v in own.items()}
    for method in methods_in(group):
        merged = method.merge(group[method.name], merged)
    out = {k: merged[k].astype(dtypes[k]) for k in own}
    kernel = own.get("kernel")
    if isinstance(kernel, nf4.QuantizedTensor):
        drift = float(jnp.max(jnp.abs(out["kernel"].astype(jnp.float32) - merged["kernel"])))
        warnings.warn(f"merging into an NF4 base: the {kernel.shape} kernel was dequantized to float32 (max drift "
                      f"from rounding: {drift:.3g}); the merged model is dense", stacklevel=4)
    return out


def merge(params: dict) -> dict:
    """A new tree with every method folded into its group's base weights (LoRA: W + s·A·B; DoRA: m ⊙ (W + s·A·B) /
    ‖W + s·A·B‖; trainable tokens: rows written into the table), in float32 and cast back to each leaf's dtype.
    Merging into an NF4 base dequantizes that weight to float32 and says so. Prompt-style methods (prompt, P- and
    prefix tuning) put keys and values in front of the attention, which no base weight can hold: refused."""
    prompt_style = prompt_groups(params)
    if prompt_style:
        raise ConfigError(f"cannot merge {prompt_style}: prompt, P- and prefix tuning add virtual tokens (keys and "
                          "values in front of every layer's attention), which no base weight can hold; keep the "
                          "adapter and run with its hooks, or save it as a PEFT adapter")
    return _walk(params, _merge_group)


def without_methods(params: dict) -> dict:
    """The tree with every method's namespace removed: the model as loaded, every adapter switched off (PEFT's
    ``disable_adapter``). A preference objective's reference policy: the same base, no second copy of it."""
    return _walk(params, own_leaves)


def adapter_tree(params: dict) -> dict:
    """Only the methods' namespaces, in the tree's structure: what :func:`unmerge` takes back."""
    out = {}
    for key, value in params.items():
        if key in REGISTRY and _is_group(value):
            out[key] = value
        elif _is_group(value):
            sub = adapter_tree(value)
            if sub:
                out[key] = sub
    return out


def unmerge(merged: dict, adapters: dict) -> dict:
    """Take merged methods out again (in the reverse order of merging), returning the tree with ``adapters``
    re-attached. A method that cannot be unmerged (DoRA) raises and says why."""
    out = dict(merged)
    for key, sub in adapters.items():
        if not any(name in sub for name in REGISTRY):
            out[key] = unmerge(out[key], sub)
            continue
        group = dict(out[key])
        own = {k: v.astype(jnp.float32) for k, v in group.items()}
        for method in reversed(methods_in(sub)):
            own = method.unmerge(sub[method.name], own)
        out[key] = {**{k: own[k].astype(group[k].dtype) for k in group}, **sub}
    return out


def trainable_count(params: dict, trainable: Trainable) -> int:
    """Trained parameters as PEFT counts them (``get_nb_trainable_parameters()[0]``): each method's own count
    (without LoRA's rank padding), plus the whole leaves ``trainable`` selects."""
    total = 0

    def count(group: dict) -> dict:
        nonlocal total
        total += sum(method.count(group[method.name]) for method in methods_in(group))
        return group

    _walk(params, count)
    selected, _ = split(params, _selected_whole(trainable))
    return total + sum(int(np.prod(x.shape)) for x in jax.tree.leaves(selected))


def _selected_whole(trainable: Trainable):
    """The predicate of the model leaves ``trainable`` trains whole (not a method's leaves)."""
    return lambda path, leaf: trainable(path) and (len(path) < 2 or path_names(path)[-2] not in REGISTRY)


def summary(params: dict, trainable: Trainable) -> str:
    """Trainable vs total parameters and bytes, with rank padding not counted as trainable."""
    trained, frozen = split(params, trainable)
    n_train = trainable_count(params, trainable)
    n_frozen = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen, is_leaf=lambda x: isinstance(
        x, nf4.QuantizedTensor)))
    total = n_train + n_frozen
    return (f"trainable params: {n_train:,} || all params: {total:,} || trainable%: {100 * n_train / total:.4f} "
            f"|| trainable bytes: {nbytes(trained):,} || frozen bytes: {nbytes(frozen):,}")
