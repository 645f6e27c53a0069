"""Hugging Face names of the param tree's modules and tensors (transformers' ``LlamaForCausalLM`` layout).

A param-tree group such as ``("layers", "q_proj")`` is the HF module ``model.layers.{i}.self_attn.q_proj``; its
``kernel``, ``embedding`` or ``scale`` leaf is that module's ``weight``, its ``bias`` the ``bias``.
"""
from __future__ import annotations

from jaxft.models.llama import ATTN_PROJ, LAYER_NORMS

_TOP_LEVEL = {"embed_tokens": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}
_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def module_name(group: tuple[str, ...], layer: int | None = None) -> str:
    """HF module name of a param-tree group; ``layer`` indexes the stacked layer axis of a ``("layers", ...)``."""
    if group[0] != "layers":
        return _TOP_LEVEL[group[0]]
    if group[1] in LAYER_NORMS:
        return f"model.layers.{layer}.{group[1]}"
    return f"model.layers.{layer}.{'self_attn' if group[1] in ATTN_PROJ else 'mlp'}.{group[1]}"


def tensor_name(group: tuple[str, ...], leaf: str, layer: int | None = None) -> str:
    """HF tensor name of a param leaf, e.g. ``model.layers.3.self_attn.q_proj.weight``."""
    return f"{module_name(group, layer)}.{_LEAF[leaf]}"


def layer_name(i: int, module: str, leaf: str) -> str:
    """HF name of a per-layer tensor, e.g. ``model.layers.3.self_attn.q_proj.weight``."""
    return tensor_name(("layers", module), leaf, i)


EMBED_WEIGHT = tensor_name(("embed_tokens",), "embedding")
NORM_WEIGHT = tensor_name(("norm",), "scale")
LM_HEAD_WEIGHT = tensor_name(("lm_head",), "kernel")
