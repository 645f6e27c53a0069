"""(IA)³ (PEFT's ``IA3Config``): a learned vector per targeted linear module scales its activations.

A feed-forward module (``feedforward_modules``) scales its input, ``(x ⊙ l) @ W``; any other its output,
``(x @ W + b) ⊙ l``. ``add`` puts an ``ia3`` namespace beside the frozen kernel of every targeted group, its vector
in PEFT's layout so that the adapter file holds it as it is::

    {"kernel": W [L, in, out] (dense or NF4), "bias"?, "ia3": {"input": [L, 1, in]}}    # a feed-forward module
    {"kernel": W [L, in, out] (dense or NF4), "bias"?, "ia3": {"output": [L, out, 1]}}  # any other

PEFT's defaults for the families jaxft models: Llama and Mistral target ``k_proj``, ``v_proj``, ``down_proj``,
Qwen2 ``q_proj``, ``v_proj``, ``down_proj``; ``down_proj`` is the feed-forward module. Merging scales the kernel's
rows (input) or columns and the bias (output), as PEFT's ``merge_and_unload``.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxft.config import ConfigError, ModelConfig
from jaxft.ops import nf4
from jaxft.ops.linear import base_linear
from jaxft.ops.registry import Method, PeftTensor, register
from jaxft.peft.adapters import check_task_type, config_dict, fields_from_peft, register_config
from jaxft.peft.lora import (as_tuple, fresh_group, prepare_saved_modules, saved_leaves, targeted_groups,
                             with_task_head)
from jaxft.peft.tree import Trainable

# PEFT's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / ..._FEEDFORWARD_MODULES_MAPPING for jaxft's families
DEFAULT_TARGETS = {"llama": ("k_proj", "v_proj", "down_proj"), "mistral": ("k_proj", "v_proj", "down_proj"),
                   "qwen2": ("q_proj", "v_proj", "down_proj")}
DEFAULT_FEEDFORWARD = ("down_proj",)


@register_config
@dataclass(frozen=True)
class IA3Config:
    """PEFT's ``IA3Config`` fields, validated (``exclude_modules`` and ``fan_in_fan_out`` are not supported).
    ``target_modules`` / ``feedforward_modules`` None: PEFT's defaults for the model's family."""

    peft_type: ClassVar[str] = "IA3"

    target_modules: tuple[str, ...] | str | None = None
    feedforward_modules: tuple[str, ...] | str | None = None
    modules_to_save: tuple[str, ...] | None = None
    init_ia3_weights: bool = True
    inference_mode: bool = False
    task_type: str = "CAUSAL_LM"

    def __post_init__(self):
        for name in ("target_modules", "feedforward_modules", "modules_to_save"):
            object.__setattr__(self, name, as_tuple(getattr(self, name)))
        check_task_type(self.task_type, "ia3")
        if (isinstance(self.target_modules, tuple) and isinstance(self.feedforward_modules, tuple)
                and not set(self.feedforward_modules) <= set(self.target_modules)):
            raise ConfigError(f"ia3.feedforward_modules {list(self.feedforward_modules)} must be a subset of "
                              f"target_modules {list(self.target_modules)}, as PEFT requires")
        object.__setattr__(self, "modules_to_save", with_task_head(self.modules_to_save, self.task_type))

    def resolved(self, cfg: ModelConfig) -> "IA3Config":
        """This config with PEFT's per-family defaults filled in."""
        if self.target_modules is not None and self.feedforward_modules is not None:
            return self
        if cfg.model_type not in DEFAULT_TARGETS:
            raise ConfigError(f"ia3: PEFT has no default target_modules for model_type {cfg.model_type!r}; give "
                              "target_modules and feedforward_modules")
        targets = DEFAULT_TARGETS[cfg.model_type] if self.target_modules is None else self.target_modules
        feedforward = DEFAULT_FEEDFORWARD if self.feedforward_modules is None else self.feedforward_modules
        return dataclasses.replace(self, target_modules=targets, feedforward_modules=feedforward)

    def feedforward(self, key: str) -> bool:
        """PEFT's ``_check_target_module_feedforward``: a regex matches the whole key, a name its end."""
        if isinstance(self.feedforward_modules, str):
            return re.fullmatch(self.feedforward_modules, key) is not None
        return any(key.endswith(name) for name in self.feedforward_modules)

    def add(self, cfg: ModelConfig, params: dict, rng) -> dict:
        return add(cfg, params, self.resolved(cfg), rng)

    def trainable(self, cfg: ModelConfig, params: dict) -> Trainable:
        """The leaves of ``modules_to_save``'s groups (the task head of a SEQ_CLS, TOKEN_CLS, QUESTION_ANS one)."""
        return Trainable(frozenset(saved_leaves(cfg, params, self)))

    def peft_config(self, base_model_name_or_path: str | None = None) -> dict:
        return config_dict(self, base_model_name_or_path, exclude_modules=None, fan_in_fan_out=False)

    @classmethod
    def from_peft(cls, d: dict, source: str) -> "IA3Config":
        kwargs = fields_from_peft(cls, d, source, {"exclude_modules": None, "fan_in_fan_out": False})
        return cls(**kwargs)


def _targeted_groups(cfg: ModelConfig, acfg: IA3Config) -> dict[tuple[str, ...], bool]:
    """Each targeted linear group with whether it is a feed-forward module (alike in every layer: they are
    stacked)."""
    groups = {}
    for path, found in targeted_groups(cfg, acfg, "ia3").items():
        key = found[0].key
        if found[0].kind in ("norm", "embedding") or (key == "lm_head" and cfg.tie_word_embeddings):
            raise ConfigError(f"ia3 targets {key}: jaxft's IA3 scales linear modules (and an untied lm_head); leave "
                              "it out of target_modules")
        feedforward = {acfg.feedforward(m.key) for m in found}
        if len(feedforward) > 1:
            raise ConfigError(f"ia3.feedforward_modules {acfg.feedforward_modules!r} selects {'/'.join(path)} as "
                              "feed-forward in some layers only; layers are stacked, so select it in all or none")
        groups[path] = feedforward.pop()
    return groups


def add(cfg: ModelConfig, params: dict, acfg: IA3Config, rng: jax.Array) -> dict:
    """A new tree with an ``ia3`` vector beside every targeted kernel (ones: the identity, PEFT's
    ``init_ia3_weights``; else standard normal), base leaves shared; ``acfg`` has its targets resolved."""
    params = jax.tree.map(lambda x: x, params, is_leaf=lambda x: isinstance(x, nf4.QuantizedTensor))
    groups = _targeted_groups(cfg, acfg)
    for (path, feedforward), key in zip(groups.items(), jax.random.split(rng, len(groups))):
        group = fresh_group(params, path, IA3.name, "ia3 vectors")
        *lead, fan_in, fan_out = group["kernel"].shape
        shape = (*lead, 1, fan_in) if feedforward else (*lead, fan_out, 1)
        vector = jnp.ones(shape) if acfg.init_ia3_weights else jax.random.normal(key, shape)
        group[IA3.name] = {"input" if feedforward else "output": vector}
    prepare_saved_modules(cfg, params, acfg)
    return params


class IA3(Method):
    """The (IA)³ vectors of a linear group: ``input`` [*lead, 1, in] scales x, ``output`` [*lead, out, 1] the
    group's output (its bias included, as PEFT scales the wrapped layer's result)."""

    name = "ia3"
    trained = frozenset({"input", "output"})

    def axes(self, base):
        if "kernel" not in base:
            return {}
        *lead, fan_in, fan_out = base["kernel"]
        return {"input": (*lead, None, fan_in), "output": (*lead, fan_out, None)}

    def linear(self, p, group, x, rng, inner):
        run = inner or partial(base_linear, group)
        if "input" in p:
            return run(x * p["input"][..., 0, :].astype(x.dtype))
        return run(x) * p["output"][..., 0].astype(x.dtype)

    def merge(self, p, group):
        return _scaled(p, group, lambda w, l: w * l)

    def unmerge(self, p, group):
        return _scaled(p, group, lambda w, l: w / l)

    def peft_tensors(self, p, group, stacked):
        """``ia3_l``: [1, in] of a feed-forward module, [out, 1] of any other, per layer."""
        leaf = "input" if "input" in p else "output"
        return [PeftTensor("ia3_l", leaf, layer) for layer in (range(p[leaf].shape[0]) if stacked else [None])]


register(IA3())


def _scaled(p: dict, group: dict, op) -> dict:
    """The group's kernel rows (``input``) or columns and bias (``output``) combined with the vector by ``op``."""
    if "input" in p:
        return {**group, "kernel": op(group["kernel"], jnp.swapaxes(p["input"], -1, -2))}
    out = {**group, "kernel": op(group["kernel"], jnp.swapaxes(p["output"], -1, -2))}
    if "bias" in group:
        out["bias"] = op(group["bias"], p["output"][..., 0])
    return out
