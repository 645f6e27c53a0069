"""Prompt tuning (PEFT's ``PromptTuningConfig``) and P-tuning (``PromptEncoderConfig``): P trained virtual token
embeddings in front of every sequence, given as they are or computed by a prompt encoder (an MLP, or a
bidirectional LSTM and an MLP).

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
    params["prompt_encoder"] = {"embedding": [P, D],                                      # P-tuning, LSTM encoder
                                "lstm_head": {"weight_ih_l0": [4H, D], "weight_hh_l0": [4H, H],
                                              "bias_ih_l0": [4H], "bias_hh_l0": [4H], "weight_ih_l0_reverse": ...,
                                              "weight_ih_l1": [4H, 2H], ...},
                                "lstm_mlp": {"hidden": {"kernel": [2H, 2H], "bias": [2H]},
                                             "out": {"kernel": [2H, D], "bias": [D]}},
                                "dropout"?: []}  # the rate between LSTM layers (not trained; only when > 0)

The LSTM's leaves are torch's ``nn.LSTM`` parameters under torch's names and in its layout (gates i, f, g, o along
the 4H rows), so PEFT's ``lstm_head`` state dict maps onto them one to one; the MLP after it is PEFT's
``mlp_head.0`` and ``.2`` in jaxft's [in, out] kernels.

PEFT saves (and loads) both as the computed embeddings ``prompt_embeddings`` [P, D]; nothing merges.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxft.config import ConfigError, ModelConfig
from jaxft.models.hooks import PREFIX_SOURCES
from jaxft.models.llama import PARAM_AXES, hidden_states
from jaxft.models.sample import init_cache
from jaxft.ops.linear import embedding_table, inverted_dropout
from jaxft.peft.adapters import register_config
from jaxft.peft.prefix import SAVED_NAME, PromptLearning, check_prompt_fields
from jaxft.peft.tree import Trainable

PROMPT = "prompt_embeddings"
ENCODER = "prompt_encoder"
PROMPT_TUNING_INITS = ("RANDOM", "SAMPLE_VOCAB", "TEXT")
ENCODER_TYPES = ("MLP", "LSTM")
MLP_LAYERS = ("in", "hidden", "out")  # PEFT's mlp_head.0, .2 and .4 (ReLUs between)
LSTM_MLP_LAYERS = ("hidden", "out")  # the LSTM encoder's PEFT mlp_head.0 and .2 (a ReLU between)
LSTM_DIRECTIONS = ("", "_reverse")  # torch's suffixes of the forward and backward directions' parameters
LSTM_LEAF = re.compile(r"(weight|bias)_(ih|hh)_l(\d+)(_reverse)?")  # torch's nn.LSTM parameter names


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
    tokenizer ``tokenizer_name_or_path`` names: the methods layer reads no files. A run config may leave
    ``tokenizer_name_or_path`` out: the run fills in its own tokenizer folder (``jaxft.recipes.config``)."""

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
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise ConfigError("prompt_tuning.prompt_tuning_init TEXT needs prompt_tuning_init_text (and, outside a "
                              "run, tokenizer_name_or_path: the tokenizer of its ids)")

    def peft_config(self, base_model_name_or_path: str | None = None) -> dict:
        """adapter_config.json; PEFT refuses a TEXT init that names no tokenizer, so jaxft does not write one."""
        if self.prompt_tuning_init == "TEXT" and not self.tokenizer_name_or_path:
            raise ConfigError("prompt_tuning with prompt_tuning_init TEXT: PEFT's adapter_config.json needs "
                              "tokenizer_name_or_path (the tokenizer of prompt_tuning_init_text); set it")
        return super().peft_config(base_model_name_or_path)

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
    """PEFT's ``PromptEncoderConfig`` (P-tuning) fields. ``encoder_reparameterization_type`` MLP: three linears with
    ReLUs between, ``encoder_hidden_size`` (H) wide, default the model's hidden size. LSTM: a bidirectional LSTM of
    ``encoder_num_layers`` layers, H wide per direction, with dropout ``encoder_dropout`` between its layers in
    training (as torch's ``nn.LSTM``), then two linears (2H wide, a ReLU between); the MLP ignores both fields."""

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
                              f"is not supported; jaxft implements {ENCODER_TYPES}")
        if not isinstance(self.encoder_num_layers, int) or self.encoder_num_layers < 1:
            raise ConfigError(f"p_tuning.encoder_num_layers must be a positive integer, got "
                              f"{self.encoder_num_layers!r}")
        if not 0 <= self.encoder_dropout < 1:
            raise ConfigError(f"p_tuning.encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")

    @property
    def lstm(self) -> bool:
        return self.encoder_reparameterization_type == "LSTM"

    def add(self, cfg: ModelConfig, params: dict, rng) -> dict:
        """``params`` with the ``prompt_encoder`` group at torch's default init."""
        d, h = cfg.hidden_size, self.encoder_hidden_size or cfg.hidden_size
        embed_rng, head_rng, lstm_rng = jax.random.split(rng, 3)
        embedding = jax.random.normal(embed_rng, (self.num_virtual_tokens, d), jnp.float32)
        if not self.lstm:
            mlp = {name: _torch_linear(key, fan_in, fan_out) for name, key, fan_in, fan_out in
                   zip(MLP_LAYERS, jax.random.split(head_rng, 3), (d, h, h), (h, h, d))}
            return {**params, ENCODER: {"embedding": embedding, "mlp": mlp}}
        mlp = {name: _torch_linear(key, 2 * h, fan_out) for name, key, fan_out in
               zip(LSTM_MLP_LAYERS, jax.random.split(head_rng, 2), (2 * h, d))}
        encoder = {"embedding": embedding, "lstm_head": _torch_lstm(lstm_rng, d, h, self.encoder_num_layers),
                   "lstm_mlp": mlp}
        if self.encoder_dropout and self.encoder_num_layers > 1:  # torch drops nothing after the last layer
            encoder["dropout"] = jnp.asarray(self.encoder_dropout, jnp.float32)
        return {**params, ENCODER: encoder}

    def trainable(self, cfg: ModelConfig, params: dict) -> Trainable:
        """The encoder's embedding and weights (not the LSTM's dropout rate)."""
        if not self.lstm:
            return Trainable(frozenset(f"{ENCODER}/{path}" for path in ["embedding"] + [
                f"mlp/{name}/{leaf}" for name in MLP_LAYERS for leaf in ("kernel", "bias")]))
        return Trainable(frozenset(f"{ENCODER}/{path}" for path in ["embedding"] + [
            f"lstm_mlp/{name}/{leaf}" for name in LSTM_MLP_LAYERS for leaf in ("kernel", "bias")] + [
            f"lstm_head/{kind}_{part}_l{layer}{direction}" for kind in ("weight", "bias") for part in ("ih", "hh")
            for layer in range(self.encoder_num_layers) for direction in LSTM_DIRECTIONS]))


def _torch_linear(rng, fan_in: int, fan_out: int) -> dict:
    """torch's ``nn.Linear`` init: kernel and bias uniform in ±1/sqrt(fan_in)."""
    bound = 1 / math.sqrt(fan_in)
    k_rng, b_rng = jax.random.split(rng)
    return {"kernel": jax.random.uniform(k_rng, (fan_in, fan_out), jnp.float32, -bound, bound),
            "bias": jax.random.uniform(b_rng, (fan_out,), jnp.float32, -bound, bound)}


def _torch_lstm(rng, input_size: int, hidden: int, num_layers: int) -> dict:
    """torch's bidirectional ``nn.LSTM`` init: every weight and bias uniform in ±1/sqrt(hidden); a layer after the
    first reads both directions of the one before (2 * hidden inputs)."""
    bound = 1 / math.sqrt(hidden)
    shapes = {}
    for layer in range(num_layers):
        fan_in = input_size if layer == 0 else 2 * hidden
        for direction in LSTM_DIRECTIONS:
            shapes.update({f"weight_ih_l{layer}{direction}": (4 * hidden, fan_in),
                           f"weight_hh_l{layer}{direction}": (4 * hidden, hidden),
                           f"bias_ih_l{layer}{direction}": (4 * hidden,),
                           f"bias_hh_l{layer}{direction}": (4 * hidden,)})
    keys = jax.random.split(rng, len(shapes))
    return {name: jax.random.uniform(key, shape, jnp.float32, -bound, bound)
            for key, (name, shape) in zip(keys, shapes.items())}


def encoded(encoder: dict, rng=None) -> jax.Array:
    """P-tuning's virtual embeddings [P, D]: the MLP of the encoder's embeddings (ReLU between its linears), or
    with an LSTM encoder the MLP of the LSTM's outputs. ``rng`` (training only) turns on the LSTM's dropout."""
    if "lstm_head" in encoder:
        return _mlp(encoder["lstm_mlp"], LSTM_MLP_LAYERS, lstm_outputs(encoder["lstm_head"], encoder["embedding"],
                                                                      encoder.get("dropout"), rng))
    return _mlp(encoder["mlp"], MLP_LAYERS, encoder["embedding"])


def _mlp(mlp: dict, names: tuple[str, ...], x: jax.Array) -> jax.Array:
    """The linears ``names`` of ``mlp`` in turn, a ReLU after each but the last."""
    for name in names:
        x = x @ mlp[name]["kernel"] + mlp[name]["bias"]
        x = x if name == names[-1] else jax.nn.relu(x)
    return x


def lstm_outputs(lstm: dict, x: jax.Array, dropout=None, rng=None) -> jax.Array:
    """torch's bidirectional multi-layer ``nn.LSTM`` over the sequence ``x`` [P, in], from zero states: [P, 2H],
    each token's forward and backward hidden states. Dropout (rate ``dropout``, only with an ``rng``) acts on each
    layer's output but the last's, as torch's in training."""
    num_layers = 1 + max(int(LSTM_LEAF.fullmatch(name).group(3)) for name in lstm)
    for layer in range(num_layers):
        x = jnp.concatenate([_lstm_direction(lstm, f"l{layer}{direction}", x, reverse=bool(direction))
                             for direction in LSTM_DIRECTIONS], axis=-1)
        if layer < num_layers - 1 and rng is not None:
            rng, drop_rng = jax.random.split(rng)
            x = inverted_dropout(x, dropout, drop_rng)
    return x


def _lstm_direction(lstm: dict, suffix: str, x: jax.Array, reverse: bool) -> jax.Array:
    """One direction of one LSTM layer (torch's parameters ``*_{suffix}``): a scan over the tokens, backwards for
    the reverse direction, its outputs [P, H] in token order. torch's gates: i, f, g, o; two biases, summed."""
    w_hh = lstm[f"weight_hh_{suffix}"]
    inputs = x @ lstm[f"weight_ih_{suffix}"].T + lstm[f"bias_ih_{suffix}"] + lstm[f"bias_hh_{suffix}"]

    def step(state, gates_in):
        h, c = state
        i, f, g, o = jnp.split(gates_in + w_hh @ h, 4)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros(w_hh.shape[1], x.dtype)
    return jax.lax.scan(step, (zeros, zeros), inputs, reverse=reverse)[1]


def virtual_prefix(cfg: ModelConfig, params: dict, embeds: jax.Array) -> dict:
    """The stacked prefix {"key", "value": [L, P, KVH, hd]} of virtual embeddings [P, D]: the keys (after RoPE, at
    positions 0..P-1) and values every layer computes for them when they start a sequence."""
    p = embeds.shape[0]
    cache = init_cache(cfg, 1, p)
    model = {k: v for k, v in params.items() if k not in PREFIX_SOURCES}  # the virtual tokens run on the bare model
    out = hidden_states(cfg, model, None, jnp.arange(p)[None], inputs_embeds=embeds[None], cache=cache)
    return {"key": out.cache["k"][:, 0], "value": out.cache["v"][:, 0]}


class _LstmAxes:
    """The logical axes of torch's LSTM parameters by name, for any number of layers: the gate rows (4H), and the
    layer's inputs (the embeddings for layer 0, both directions of the layer before for the others) or H."""

    def __contains__(self, leaf: str) -> bool:
        return LSTM_LEAF.fullmatch(leaf) is not None

    def __getitem__(self, leaf: str) -> tuple[str, ...]:
        kind, part, layer, _ = LSTM_LEAF.fullmatch(leaf).groups()
        if kind == "bias":
            return ("lstm_gates",)
        inputs = ("embed" if layer == "0" else "lstm_out") if part == "ih" else "encoder_hidden"
        return ("lstm_gates", inputs)


# The logical axes of the virtual tokens' leaves, declared beside the model's own (jaxft.parallel shards by them).
PARAM_AXES.update({
    (PROMPT,): {"embedding": ("virtual_tokens", "embed")},
    (ENCODER,): {"embedding": ("virtual_tokens", "embed"), "dropout": ()},
    (ENCODER, "mlp", "in"): {"kernel": ("embed", "encoder_hidden"), "bias": ("encoder_hidden",)},
    (ENCODER, "mlp", "hidden"): {"kernel": ("encoder_hidden", "encoder_hidden"), "bias": ("encoder_hidden",)},
    (ENCODER, "mlp", "out"): {"kernel": ("encoder_hidden", "embed"), "bias": ("embed",)},
    (ENCODER, "lstm_head"): _LstmAxes(),
    (ENCODER, "lstm_mlp", "hidden"): {"kernel": ("lstm_out", "lstm_out"), "bias": ("lstm_out",)},
    (ENCODER, "lstm_mlp", "out"): {"kernel": ("lstm_out", "embed"), "bias": ("embed",)},
})
PREFIX_SOURCES[PROMPT] = lambda cfg, params, rng: virtual_prefix(cfg, params, params[PROMPT]["embedding"])
PREFIX_SOURCES[ENCODER] = lambda cfg, params, rng: virtual_prefix(cfg, params, encoded(params[ENCODER], rng))
