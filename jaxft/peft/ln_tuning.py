"""LN-tuning (PEFT's ``LNTuningConfig``): only the targeted RMSNorm layers train.

PEFT wraps each targeted norm and trains a copy of it (``ln_tuning_layers``), leaving the original in place; jaxft
does the same with a registered method, a trained copy of the norm's scale beside the frozen one::

    {"scale": [L, D], "ln_tuning": {"scale": [L, D]}}

A method rather than a selection of the norms' own ``scale`` leaves, because the base must stay what it was: the
reference policy of a preference objective is the model with its methods off (``without_methods``), and the
adapter file holds the copies under PEFT's names (``...input_layernorm.ln_tuning_layers.weight``). Merging
replaces the norm by the trained copy, as PEFT's ``merge_and_unload``; unmerging is refused (the merged tree no
longer holds the base norm). PEFT's defaults: Llama and Mistral train ``input_layernorm``,
``post_attention_layernorm`` and the final ``norm``; Qwen2 ``post_attention_layernorm``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxft.config import ConfigError, ModelConfig
from jaxft.ops import nf4
from jaxft.ops.registry import Method, PeftTensor, register
from jaxft.peft.adapters import check_task_type, config_dict, fields_from_peft, register_config
from jaxft.peft.lora import (as_tuple, fresh_group, prepare_saved_modules, saved_leaves, targeted_groups,
                             with_task_head)
from jaxft.peft.tree import Trainable

# PEFT's TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING for jaxft's families
DEFAULT_TARGETS = {"llama": ("input_layernorm", "post_attention_layernorm", "norm"),
                   "mistral": ("input_layernorm", "post_attention_layernorm", "norm"),
                   "qwen2": ("post_attention_layernorm",)}


@register_config
@dataclass(frozen=True)
class LNTuningConfig:
    """PEFT's ``LNTuningConfig`` fields, validated (``exclude_modules`` is not supported). ``target_modules``
    None: PEFT's default for the model's family."""

    peft_type: ClassVar[str] = "LN_TUNING"

    target_modules: tuple[str, ...] | str | None = None
    modules_to_save: tuple[str, ...] | None = None
    inference_mode: bool = False
    task_type: str = "CAUSAL_LM"

    def __post_init__(self):
        for name in ("target_modules", "modules_to_save"):
            object.__setattr__(self, name, as_tuple(getattr(self, name)))
        check_task_type(self.task_type, "ln_tuning")
        object.__setattr__(self, "modules_to_save", with_task_head(self.modules_to_save, self.task_type))

    def resolved(self, cfg: ModelConfig) -> "LNTuningConfig":
        """This config with PEFT's per-family default targets filled in."""
        if self.target_modules is not None:
            return self
        if cfg.model_type not in DEFAULT_TARGETS:
            raise ConfigError(f"ln_tuning: PEFT has no default target_modules for model_type {cfg.model_type!r}; "
                              "give target_modules")
        return dataclasses.replace(self, target_modules=DEFAULT_TARGETS[cfg.model_type])

    def add(self, cfg: ModelConfig, params: dict, rng) -> dict:
        return add(cfg, params, self.resolved(cfg))

    def trainable(self, cfg: ModelConfig, params: dict) -> Trainable:
        """The leaves of ``modules_to_save``'s groups (the task head of a SEQ_CLS, TOKEN_CLS, QUESTION_ANS one)."""
        return Trainable(frozenset(saved_leaves(cfg, params, self)))

    def peft_config(self, base_model_name_or_path: str | None = None) -> dict:
        return config_dict(self, base_model_name_or_path, exclude_modules=None)

    @classmethod
    def from_peft(cls, d: dict, source: str) -> "LNTuningConfig":
        return cls(**fields_from_peft(cls, d, source, {"exclude_modules": None}))


def add(cfg: ModelConfig, params: dict, acfg: LNTuningConfig) -> dict:
    """A new tree with a trained copy of the scale beside every targeted norm; the base leaves are shared."""
    params = jax.tree.map(lambda x: x, params, is_leaf=lambda x: isinstance(x, nf4.QuantizedTensor))
    for path, found in targeted_groups(cfg, acfg, "ln_tuning").items():
        if any(m.kind != "norm" for m in found):
            raise ConfigError(f"ln_tuning targets {found[0].key}: jaxft's LN-tuning trains norm layers only; train "
                              "other modules whole with modules_to_save")
        group = fresh_group(params, path, LNTuning.name, "ln_tuning copies")
        group[LNTuning.name] = {"scale": jnp.array(group["scale"])}
    prepare_saved_modules(cfg, params, acfg)
    return params


class LNTuning(Method):
    """A trained copy of a norm group's scale, used instead of the frozen one."""

    name = "ln_tuning"
    trained = frozenset({"scale"})

    def axes(self, base):
        return {"scale": base["scale"]} if "scale" in base else {}

    def norm(self, p, scale):
        return p["scale"].astype(scale.dtype)

    def merge(self, p, group):
        return {**group, "scale": p["scale"]}

    def unmerge(self, p, group):
        raise ConfigError("cannot unmerge LN-tuning: merging replaced the norms by their trained copies, so the "
                          "merged tree no longer holds the base norms; keep the unmerged params (merge returns a new "
                          "tree) instead")

    def peft_tensors(self, p, group, stacked):
        """``ln_tuning_layers.weight``: the trained copy of the norm's weight, per layer."""
        layers = range(p["scale"].shape[0]) if stacked else [None]
        return [PeftTensor("ln_tuning_layers.weight", "scale", layer) for layer in layers]


register(LNTuning())
