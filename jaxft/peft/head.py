"""Training a task head alone, in full, over a frozen base (a linear probe): the ``peft: [{type: head}]`` entry.

No leaves are added; the head's group (``score`` or ``qa_outputs``, :class:`jaxft.config.HeadConfig`) is selected
whole, as ``modules_to_save`` selects modules. With LoRA the head needs no such entry: PEFT's task types already
train it beside the adapters.
"""
from __future__ import annotations

from dataclasses import dataclass

from jaxft.config import ConfigError, ModelConfig
from jaxft.ops.registry import own_leaves
from jaxft.peft.tree import Trainable


@dataclass(frozen=True)
class HeadOnly:
    """The run's method entry that trains only the task head."""

    def add(self, cfg: ModelConfig, params: dict, rng) -> dict:
        if cfg.head is None:
            raise ConfigError("peft {type: head} trains the task head alone, but this model has none (a causal LM); "
                              "give the run a task with a head (task: {type: classify | token_classify | qa})")
        return params

    def trainable(self, cfg: ModelConfig, params: dict) -> Trainable:
        group = cfg.head.group
        return Trainable(frozenset(f"{group}/{leaf}" for leaf in own_leaves(params[group])))
