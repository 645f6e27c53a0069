"""BitFit: only the bias terms train, the ``peft: [{type: bitfit}]`` entry.

It selects the biases as LoRA's ``bias="all"`` does (:func:`jaxft.peft.lora.bias_leaves`) and adds no leaves. What
that means per family: Llama and Mistral have no biases, so there is nothing to train and the entry is refused;
Qwen2 has the biases of ``q_proj``, ``k_proj`` and ``v_proj``; a token-classification or question-answering head
adds its own. With LoRA (``peft: [lora, bitfit]``) the biases train beside the adapters. PEFT has no BitFit type, so
a BitFit run exports the full model, as any run whose methods PEFT's one-type adapter folder cannot hold.
"""
from __future__ import annotations

from dataclasses import dataclass

from jaxft.config import ConfigError, ModelConfig
from jaxft.peft.lora import bias_leaves
from jaxft.peft.tree import Trainable


@dataclass(frozen=True)
class BitFit:
    """The run's method entry that trains every bias of the model."""

    def add(self, cfg: ModelConfig, params: dict, rng) -> dict:
        if not bias_leaves(params):
            raise ConfigError(f"peft {{type: bitfit}} trains the bias terms only, but this {cfg.model_type} model has "
                              "none (Llama and Mistral have no biases; Qwen2 has them on q_proj, k_proj and v_proj); "
                              "choose another method, such as {type: lora}")
        return params

    def trainable(self, cfg: ModelConfig, params: dict) -> Trainable:
        return Trainable(frozenset(bias_leaves(params)))
