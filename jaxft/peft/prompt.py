"""Prompt tuning (PEFT's ``PromptTuningConfig``) and P-tuning (``PromptEncoderConfig``): P trained virtual token
embeddings in front of every sequence, given as they are or computed by a prompt encoder (an MLP).

PEFT concatenates the virtual embeddings in front of the input, so they are the first P tokens of every sequence
(positions 0..P-1, the real tokens after them) and, the attention being causal, attend only to each other. Their
keys and values at every layer therefore do not depend on the input: they are a prefix. jaxft computes that prefix
once per forward pass, by running the model on the P virtual embeddings alone (:func:`virtual_prefix`), and feeds
it through the prefix hook (:func:`jaxft.peft.prefix.prefix_hooks`). That gives PEFT's logits on the real tokens
without changing the batch's shape, so a packed row's every document sees its own copy of the virtual tokens,
and generation keeps them in front of the KV cache.

Trained leaves (top-level groups; :func:`jaxft.peft.prefix.with_prefix` turns them into the stacked prefix)::

    params["prompt_embeddings"] = {"embedding": [P, D]}                          # prompt tuning
    params["prompt_encoder"] = {"embedding": [P, D], "mlp": {"in": {"kernel": [D, H], "bias": [H]},    # P-tuning
                                "hidden": {"kernel": [H, H], "bias": [H]}, "out": {"kernel": [H, D], "bias": [D]}}}

PEFT saves (and loads) both as the computed embeddings ``prompt_embeddings`` [P, D]; nothing merges.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxft.config import ConfigError, ModelConfig
from jaxft.models.hooks import PREFIX_SOURCES
from jaxft.models.llama import PARAM_AXES, hidden_states
from jaxft.models.sample import init_cache
from jaxft.ops.linear import embedding_table
from jaxft.peft.adapters import register_config
from jaxft.peft.prefix import SAVED_NAME, PromptLearning, check_prompt_fields
from jaxft.peft.tree import Trainable

PROMPT = "prompt_embeddings"
ENCODER = "prompt_encoder"
PROMPT_TUNING_INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")
ENCODER_TYPES = ("MLP",)
MLP_LAYERS = ("in", "hidden", "out")  # PEFT's mlp_head.0, .2 and .4 (ReLUs between)


class VirtualTokens(PromptLearning):
    """What prompt and P-tuning share: PEFT's adapter file holds their virtual embeddings [P, D] as
    ``prompt_embeddings`` (P-tuning's computed by its encoder, as PEFT saves them), and loading it gives the
    embeddings as prompt tuning holds them (the file of a P-tuning adapter holds no encoder: PEFT loads it so too)."""

    def saved_tensors(self, cfg: ModelConfig, params: dict) -> dict:
        return {SAVED_NAME: params[PROMPT]["embedding"] if PROMPT in params else encoded(params[ENCODER])}

    def saved_shapes(self, cfg: ModelConfig) -> dict:
        return {SAVED_NAME: (self.num_virtual_tokens, cfg.hidden_size)}

    def with_saved(self, cfg: ModelConfig, params: dict, tensors: dict) -> dict:
        return {**params, PROMPT: {"embedding": jnp.asarray(tensors[SAVED_NAME], jnp.float32)}}


@register_config
@dataclass(frozen=True)
class PromptTuningConfig(VirtualTokens):
    """PEFT's ``PromptTuningConfig`` fields. ``prompt_tuning_init``: RANDOM draws N(0, 1) (torch's embedding init),
    SAMPLE_VOCAB copies the rows of random vocabulary ids, TEXT the rows of ``prompt_tuning_init_text``'s tokens
    (cut or repeated to P, as PEFT does), which :meth:`add` takes already tokenized (``text_ids``) with the
    tokenizer ``tokenizer_name_or_path`` names: the methods layer reads no files."""

    peft_type: ClassVar[str] = "PROMPT_TUNING"
    num_virtual_tokens: int = 20
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    task_type: str = "CAUSAL_LM"

    def __post_init__(self):
        check_prompt_fields("prompt_tuning", self)
        if self.prompt_tuning_init not in PROMPT_TUNING_INITS:
            raise ConfigError(f"prompt_tuning.prompt_tuning_init must be one of {PROMPT_TUNING_INITS}, got "
                              f"{self.prompt_tuning_init!r}")
        if self.prompt_tuning_init == "TEXT" and not (self.prompt_tuning_init_text and self.tokenizer_name_or_path):
            raise ConfigError("prompt_tuning.prompt_tuning_init TEXT needs prompt_tuning_init_text and "
                              "tokenizer_name_or_path")

    def add(self, cfg: ModelConfig, params: dict, rng, text_ids=None) -> dict:
        """``params`` with the ``prompt_embeddings`` group; TEXT init needs ``text_ids``, the init text's token ids
        from the tokenizer ``tokenizer_name_or_path``."""
        table = embedding_table(params["embed_tokens"])
        p = self.num_virtual_tokens
        if self.prompt_tuning_init == "RANDOM":
            rows = jax.random.normal(rng, (p, cfg.hidden_size), jnp.float32)
        elif self.prompt_tuning_init == "SAMPLE_VOCAB":
            rows = table[jax.random.randint(rng, (p,), 0, table.shape[0])]
        elif not text_ids:
            raise ConfigError(f"prompt_tuning: TEXT init needs the token ids of {self.prompt_tuning_init_text!r} "
                              f"(add(..., text_ids=...), from the tokenizer {self.tokenizer_name_or_path!r})")
        else:  # PEFT cuts the text's ids to P, or repeats them until there are P
            ids = (list(text_ids) * math.ceil(p / len(text_ids)))[:p]
            rows = table[jnp.asarray(ids)]
        return {**params, PROMPT: {"embedding": rows.astype(jnp.float32)}}

    def trainable(self, cfg: ModelConfig, params: dict) -> Trainable:
        return Trainable(frozenset({f"{PROMPT}/embedding"}))


@register_config
@dataclass(frozen=True)
class PromptEncoderConfig(VirtualTokens):
    """PEFT's ``PromptEncoderConfig`` (P-tuning) fields: the MLP encoder (three linears with ReLUs between,
    ``encoder_hidden_size`` wide, default the model's hidden size); ``encoder_num_layers`` and ``encoder_dropout``
    belong to PEFT's LSTM encoder, which jaxft does not implement (refused)."""

    peft_type: ClassVar[str] = "P_TUNING"
    num_virtual_tokens: int = 20
    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    task_type: str = "CAUSAL_LM"

    def __post_init__(self):
        check_prompt_fields("p_tuning", self)
        if self.encoder_reparameterization_type not in ENCODER_TYPES:
            raise ConfigError(f"p_tuning.encoder_reparameterization_type {self.encoder_reparameterization_type!r} "
                              f"is not supported; jaxft implements {ENCODER_TYPES} (PEFT's recommended one)")

    def add(self, cfg: ModelConfig, params: dict, rng) -> dict:
        """``params`` with the ``prompt_encoder`` group at torch's default init."""
        d, h = cfg.hidden_size, self.encoder_hidden_size or cfg.hidden_size
        keys = jax.random.split(rng, 4)
        mlp = {name: _torch_linear(key, fan_in, fan_out)
               for name, key, fan_in, fan_out in zip(MLP_LAYERS, keys[1:], (d, h, h), (h, h, d))}
        embedding = jax.random.normal(keys[0], (self.num_virtual_tokens, d), jnp.float32)
        return {**params, ENCODER: {"embedding": embedding, "mlp": mlp}}

    def trainable(self, cfg: ModelConfig, params: dict) -> Trainable:
        return Trainable(frozenset(f"{ENCODER}/{path}" for path in ["embedding"] + [
            f"mlp/{name}/{leaf}" for name in MLP_LAYERS for leaf in ("kernel", "bias")]))


def _torch_linear(rng, fan_in: int, fan_out: int) -> dict:
    """torch's ``nn.Linear`` init: kernel and bias uniform in ±1/sqrt(fan_in)."""
    bound = 1 / math.sqrt(fan_in)
    k_rng, b_rng = jax.random.split(rng)
    return {"kernel": jax.random.uniform(k_rng, (fan_in, fan_out), jnp.float32, -bound, bound),
            "bias": jax.random.uniform(b_rng, (fan_out,), jnp.float32, -bound, bound)}


def encoded(encoder: dict) -> jax.Array:
    """P-tuning's virtual embeddings [P, D]: the MLP of the encoder's embeddings (ReLU between its linears)."""
    x = encoder["embedding"]
    for name in MLP_LAYERS:
        layer = encoder["mlp"][name]
        x = x @ layer["kernel"] + layer["bias"]
        x = x if name == MLP_LAYERS[-1] else jax.nn.relu(x)
    return x


def virtual_prefix(cfg: ModelConfig, params: dict, embeds: jax.Array) -> dict:
    """The stacked prefix {"key", "value": [L, P, KVH, hd]} of virtual embeddings [P, D]: the keys (after RoPE, at
    positions 0..P-1) and values every layer computes for them when they start a sequence."""
    p = embeds.shape[0]
    cache = init_cache(cfg, 1, p)
    model = {k: v for k, v in params.items() if k not in PREFIX_SOURCES}  # the virtual tokens run on the bare model
    out = hidden_states(cfg, model, None, jnp.arange(p)[None], inputs_embeds=embeds[None], cache=cache)
    return {"key": out.cache["k"][:, 0], "value": out.cache["v"][:, 0]}


# The logical axes of the virtual tokens' leaves, declared beside the model's own (jaxft.parallel shards by them).
PARAM_AXES.update({
    (PROMPT,): {"embedding": ("virtual_tokens", "embed")},
    (ENCODER,): {"embedding": ("virtual_tokens", "embed")},
    (ENCODER, "mlp", "in"): {"kernel": ("embed", "encoder_hidden"), "bias": ("encoder_hidden",)},
    (ENCODER, "mlp", "hidden"): {"kernel": ("encoder_hidden", "encoder_hidden"), "bias": ("encoder_hidden",)},
    (ENCODER, "mlp", "out"): {"kernel": ("encoder_hidden", "embed"), "bias": ("embed",)},
})
PREFIX_SOURCES[PROMPT] = lambda cfg, params: virtual_prefix(cfg, params, params[PROMPT]["embedding"])
PREFIX_SOURCES[ENCODER] = lambda cfg, params: virtual_prefix(cfg, params, encoded(params[ENCODER]))
