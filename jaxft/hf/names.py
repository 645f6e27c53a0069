"""Hugging Face names of the param tree's modules and tensors (transformers' ``LlamaForCausalLM`` layout).

A param-tree group such as ``("layers", "q_proj")`` is the HF module ``model.layers.{i}.self_attn.q_proj``; its
``kernel``, ``embedding`` or ``scale`` leaf is that module's ``weight``, its ``bias`` the ``bias``. A task head's
group is the module of the same name (``score``, ``qa_outputs``), as in transformers' ``*For<Task>`` classes.

These are the canonical names, with the decoder under ``model.``. transformers' Llama and Qwen2 question-answering
classes keep it under ``transformer.`` instead (their ``base_model_prefix``): :func:`saved_name` gives the name
transformers writes for a model, :func:`canonical_name` reads either spelling back.
"""
from __future__ import annotations

from jaxft.config import ModelConfig
from jaxft.models.llama import ATTN_PROJ, LAYER_NORMS

_TOP_LEVEL = {"embed_tokens": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head",
              "score": "score", "qa_outputs": "qa_outputs"}
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


BASE_PREFIX = "model."
# model types whose transformers QA class names its decoder ``transformer`` (base_model_prefix); Mistral's keeps model
_QA_BASE_PREFIX = {"llama": "transformer.", "qwen2": "transformer."}


def base_prefix(cfg: ModelConfig) -> str:
    """The prefix transformers gives the decoder's tensors in a checkpoint of ``cfg``'s class."""
    if cfg.head is not None and cfg.head.kind == "qa":
        return _QA_BASE_PREFIX.get(cfg.model_type, BASE_PREFIX)
    return BASE_PREFIX


def saved_name(cfg: ModelConfig, name: str) -> str:
    """The name transformers writes for the canonical tensor (or module) ``name`` of a ``cfg`` model."""
    prefix = base_prefix(cfg)
    return prefix + name[len(BASE_PREFIX):] if name.startswith(BASE_PREFIX) else name


def canonical_name(name: str) -> str:
    """The canonical name of a tensor (or module) named either way (``transformer.`` read as ``model.``)."""
    for prefix in set(_QA_BASE_PREFIX.values()):
        if name.startswith(prefix):
            return BASE_PREFIX + name[len(prefix):]
    return name
