"""Prefix tuning (PEFT's ``PrefixTuningConfig``): trained keys and values in front of every layer's attention.

Without ``prefix_projection`` the prefix itself is the trained parameter, stacked like the layers so the scanned
layer gets its own slice (through :attr:`jaxft.models.hooks.Hooks.prefix`)::

    params["layers"]["prefix"] = {"key": [L, P, KVH, hd], "value": [L, P, KVH, hd]}    # trained

(PEFT's flat [P, L*2*KVH*hd] layout converts with :func:`from_flat` / :func:`to_flat`.)

With ``prefix_projection`` PEFT reparameterizes it through a two-layer MLP shared by every layer, so the trained
leaves sit in a top-level group and :func:`with_prefix` computes the stacked keys/values from them before a
forward pass::

    params["prefix_encoder"] = {"embedding": [P, KVH*hd], "hidden": {"kernel": [KVH*hd, H], "bias": [H]},
                                "out": {"kernel": [H, L*2*KVH*hd], "bias": [L*2*KVH*hd]}}

Either way PEFT numbers the real tokens after the P virtual ones, which ``hooks`` reproduces
(``Hooks.position_offset``). Packed rows and generation need nothing else: every non-padding query sees the prefix
whatever its segment (within a windowed layer's sliding window, as PEFT's: :mod:`jaxft.ops.attention`), and the KV
cache never stores it (the hook adds it at every step). A prefix cannot be folded into the base weights, so there
is nothing to merge.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxft.config import ConfigError, ModelConfig
from jaxft.models.hooks import PREFIX_SOURCES, Hooks
from jaxft.models.llama import PARAM_AXES
from jaxft.peft.adapters import config_dict, fields_from_peft, register_config
from jaxft.peft.tree import Trainable

INIT_WEIGHTS = (None, "zero")
ENCODER = "prefix_encoder"
SAVED_NAME = "prompt_embeddings"  # PEFT's one tensor of a prompt-style adapter (peft.tuners.tuners_utils)


class PromptLearning:
    """What every prompt-style adapter config (PEFT's ``PromptLearningConfig``) shares: its adapter_config.json (its
    forward's hooks come from the params, :func:`prompt_inputs`). The subclasses hold ``num_virtual_tokens``."""

    num_virtual_tokens: int

    def peft_config(self, base_model_name_or_path: str | None = None) -> dict:
        """adapter_config.json. The model's sizes (``token_dim``, ``num_layers``, ``num_attention_heads``) stay
        null: PEFT fills them in from the model it loads the adapter on, as for a config built without them."""
        return config_dict(self, base_model_name_or_path, num_transformer_submodules=1, token_dim=None,
                           num_layers=None, num_attention_heads=None, inference_mode=True, modules_to_save=None)

    @classmethod
    def from_peft(cls, d: dict, source: str):
        """The config of an adapter_config.json dict; an encoder-decoder's two transformer submodules are refused
        (jaxft's models are decoder-only)."""
        if d.get("num_transformer_submodules") not in (None, 1):
            raise ConfigError(f"{source}: num_transformer_submodules={d['num_transformer_submodules']!r}: jaxft's "
                              "models are decoder-only (1)")
        kwargs = fields_from_peft(cls, d, source, {"modules_to_save": None})
        return cls(**{k: v for k, v in kwargs.items() if v is not None or k == "encoder_hidden_size"})


@register_config
@dataclass(frozen=True)
class PrefixTuningConfig(PromptLearning):
    """PEFT's ``PrefixTuningConfig`` fields. ``encoder_hidden_size`` (default: PEFT's ``token_dim``, which for
    grouped-query attention is KVH * hd) is the MLP's width and is used only with ``prefix_projection``.
    ``init_weights="zero"`` starts the prefix (or the MLP's output layer) at zero; ``None`` draws it at random as
    torch does."""

    peft_type: ClassVar[str] = "PREFIX_TUNING"
    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    init_weights: str | None = None
    task_type: str = "CAUSAL_LM"

    def __post_init__(self):
        check_prompt_fields("prefix_tuning", self)
        if self.init_weights not in INIT_WEIGHTS:
            raise ConfigError(f"prefix_tuning.init_weights must be one of {INIT_WEIGHTS}, got {self.init_weights!r}")

    def add(self, cfg: ModelConfig, params: dict, rng) -> dict:
        """``params`` with the prefix's trained leaves added (see the module doc for where)."""
        if self.prefix_projection:
            return {**params, ENCODER: _encoder_init(self, cfg, rng)}
        shape = (cfg.num_hidden_layers, self.num_virtual_tokens, cfg.num_key_value_heads, cfg.head_dim)
        key_rng, value_rng = jax.random.split(rng)
        draw = (lambda key: jnp.zeros(shape, jnp.float32)) if self.init_weights == "zero" else (
            lambda key: jax.random.normal(key, shape, jnp.float32))  # torch's nn.Embedding init: N(0, 1)
        prefix = {"key": draw(key_rng), "value": draw(value_rng)}
        return {**params, "layers": {**params["layers"], "prefix": prefix}}

    def trainable(self, cfg: ModelConfig, params: dict) -> Trainable:
        """The prefix's leaves (the encoder's with ``prefix_projection``)."""
        if self.prefix_projection:
            return Trainable(frozenset(f"{ENCODER}/{path}" for path in _ENCODER_LEAVES))
        return Trainable(frozenset({"layers/prefix/key", "layers/prefix/value"}))

    def saved_tensors(self, cfg: ModelConfig, params: dict) -> dict:
        """PEFT's adapter file: the prefix [P, L*2*KVH*hd] as ``prompt_embeddings`` (with ``prefix_projection``
        the prefix the MLP computes, as PEFT saves it)."""
        return {SAVED_NAME: to_flat(with_prefix(cfg, params)["layers"]["prefix"])}

    def saved_shapes(self, cfg: ModelConfig) -> dict:
        return {SAVED_NAME: (self.num_virtual_tokens, cfg.num_hidden_layers * 2 * kv_width(cfg))}

    def with_saved(self, cfg: ModelConfig, params: dict, tensors: dict) -> dict:
        """The base ``params`` with the prefix of PEFT's file, stacked (the file holds the computed prefix, never
        the MLP, so a loaded adapter is the prefix itself whatever ``prefix_projection`` says)."""
        prefix = from_flat(cfg, jnp.asarray(tensors[SAVED_NAME], jnp.float32))
        return {**params, "layers": {**params["layers"], "prefix": prefix}}


def check_prompt_fields(section: str, pcfg) -> None:
    """The fields every prompt-style config shares: ``num_virtual_tokens``, ``encoder_hidden_size`` (where it has
    one) and ``task_type`` (jaxft's models are decoder-only language models: CAUSAL_LM)."""
    if not isinstance(pcfg.num_virtual_tokens, int) or pcfg.num_virtual_tokens < 1:
        raise ConfigError(f"{section}.num_virtual_tokens must be a positive integer, got {pcfg.num_virtual_tokens!r}")
    hidden = getattr(pcfg, "encoder_hidden_size", None)
    if hidden is not None and (not isinstance(hidden, int) or hidden < 1):
        raise ConfigError(f"{section}.encoder_hidden_size must be a positive integer or None (PEFT's token_dim), "
                          f"got {hidden!r}")
    if pcfg.task_type != "CAUSAL_LM":
        raise ConfigError(f"{section}.task_type {pcfg.task_type!r} is not supported: jaxft's prompt-style methods "
                          "are for CAUSAL_LM models")


def prefix_hooks(num_virtual_tokens: int) -> Hooks:
    """The hooks of every prompt-style method: each layer's stacked prefix, and the real tokens numbered after the
    ``num_virtual_tokens`` virtual ones (as PEFT numbers them)."""
    return Hooks(prefix=layer_prefix, position_offset=num_virtual_tokens)


_ENCODER_LEAVES = ("embedding", "hidden/kernel", "hidden/bias", "out/kernel", "out/bias")


# The logical axes of the prefix's leaves (jaxft.parallel shards by them; none but "layer" is in a sharding rule, so
# these small leaves are replicated), declared beside the model's own.
PARAM_AXES.update({
    ("layers", "prefix"): dict.fromkeys(("key", "value"), ("layer", "virtual_tokens", "prefix_heads", "head_dim")),
    (ENCODER,): {"embedding": ("virtual_tokens", "prefix_width")},
    (ENCODER, "hidden"): {"kernel": ("prefix_width", "encoder_hidden"), "bias": ("encoder_hidden",)},
    (ENCODER, "out"): {"kernel": ("encoder_hidden", "prefix_out"), "bias": ("prefix_out",)},
})


def kv_width(cfg: ModelConfig) -> int:
    """Keys (or values) per token of one layer: KVH * hd, PEFT's ``token_dim`` for grouped-query attention."""
    return cfg.num_key_value_heads * cfg.head_dim


def layer_prefix(lp: dict) -> tuple[jax.Array, jax.Array]:
    """The ``Hooks.prefix`` function of every prompt-style method: the layer's (key, value) slices [P, KVH, hd]."""
    return lp["prefix"]["key"], lp["prefix"]["value"]


def _encoder_init(pcfg: PrefixTuningConfig, cfg: ModelConfig, rng) -> dict:
    """PEFT's prefix encoder at torch's default init: N(0, 1) embeddings, uniform(±1/sqrt(fan_in)) linears."""
    token_dim = kv_width(cfg)
    hidden = pcfg.encoder_hidden_size or token_dim
    width = cfg.num_hidden_layers * 2 * token_dim
    keys = jax.random.split(rng, 5)

    def uniform(key, shape, fan_in):
        bound = 1 / math.sqrt(fan_in)
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound)

    out = {"kernel": uniform(keys[3], (hidden, width), hidden), "bias": uniform(keys[4], (width,), hidden)}
    if pcfg.init_weights == "zero":
        out = jax.tree.map(jnp.zeros_like, out)
    return {"embedding": jax.random.normal(keys[0], (pcfg.num_virtual_tokens, token_dim), jnp.float32),
            "hidden": {"kernel": uniform(keys[1], (token_dim, hidden), token_dim),
                       "bias": uniform(keys[2], (hidden,), token_dim)},
            "out": out}


def from_flat(cfg: ModelConfig, flat: jax.Array) -> dict:
    """PEFT's prefix [P, L*2*KVH*hd] (per token: layer-major, key before value) as the stacked ``prefix`` group."""
    p = flat.shape[0]
    per_layer = jnp.moveaxis(flat.reshape(p, cfg.num_hidden_layers, 2, cfg.num_key_value_heads, cfg.head_dim), 0,
                             1)  # [L, P, 2, KVH, hd]
    return {"key": per_layer[:, :, 0], "value": per_layer[:, :, 1]}


def to_flat(prefix: dict) -> jax.Array:
    """The inverse of :func:`from_flat`: PEFT's ``prompt_embeddings`` tensor of a prefix."""
    stacked = jnp.stack([prefix["key"], prefix["value"]], axis=2)  # [L, P, 2, KVH, hd]
    return jnp.moveaxis(stacked, 1, 0).reshape(stacked.shape[1], -1)


def encoded(encoder: dict) -> jax.Array:
    """PEFT's prefix [P, L*2*KVH*hd] from its encoder: ``tanh(E W1 + b1) W2 + b2``."""
    h = jnp.tanh(encoder["embedding"] @ encoder["hidden"]["kernel"] + encoder["hidden"]["bias"])
    return h @ encoder["out"]["kernel"] + encoder["out"]["bias"]


PREFIX_SOURCES[ENCODER] = lambda cfg, params, rng: from_flat(cfg, encoded(params[ENCODER]))


def prompt_groups(params: dict) -> list[str]:
    """The paths of the prompt-style groups in ``params`` (a stacked prefix, or a group that computes one)."""
    stacked = ["layers/prefix"] if "prefix" in params.get("layers", {}) else []
    return stacked + [name for name in PREFIX_SOURCES if name in params]


def without_prompt(params: dict) -> dict:
    """The tree without its prompt-style groups (:func:`prompt_groups`): the model PEFT's ``disable_adapter``
    runs, with no virtual tokens in front."""
    rest = {k: v for k, v in params.items() if k not in PREFIX_SOURCES}
    if "prefix" not in rest.get("layers", {}):
        return rest
    return {**rest, "layers": {k: v for k, v in rest["layers"].items() if k != "prefix"}}


def prompt_inputs(cfg: ModelConfig, params: dict, rng=None) -> tuple[dict, Hooks]:
    """(params, hooks) as a forward pass or ``generate`` reads a tree holding a prompt-style method: the stacked
    prefix computed (:func:`with_prefix`) and the hooks that feed it, with the real tokens numbered after it; a
    tree without one comes back as it is, with ``Hooks()``. The prefix length is a static shape, so this traces
    under ``jit``: whoever holds the params gets the method's forward, with no setting to forget. ``rng``
    (training only) turns on the prompt encoder's dropout (P-tuning's LSTM)."""
    params = with_prefix(cfg, params, rng)
    prefix = params.get("layers", {}).get("prefix")
    return params, Hooks() if prefix is None else prefix_hooks(prefix["key"].shape[-3])


def with_prefix(cfg: ModelConfig, params: dict, rng=None) -> dict:
    """``params`` as the forward pass reads them: a group of :data:`PREFIX_SOURCES` (prefix tuning's MLP, prompt
    or P-tuning's virtual tokens) replaced by the stacked prefix it computes; a tree without one is returned as it
    is. Differentiable: gradients reach that group's leaves. ``rng``: as :func:`prompt_inputs`'s."""
    sources = [name for name in PREFIX_SOURCES if name in params]
    if not sources:
        return params
    if len(sources) > 1:
        raise ConfigError(f"params hold {sources}: at most one prompt-style method (prompt tuning, P-tuning or "
                          "prefix tuning) can be active")
    rest = {k: v for k, v in params.items() if k != sources[0]}
    return {**rest, "layers": {**rest["layers"], "prefix": PREFIX_SOURCES[sources[0]](cfg, params, rng)}}
