"""Task heads over the decoder's final hidden states, as transformers' ``*ForSequenceClassification``,
``*ForTokenClassification`` and ``*ForQuestionAnswering`` compute them, and pooled features for embeddings.

A head model's params hold ``score`` (or ``qa_outputs``) in place of ``lm_head`` (``ModelConfig.head`` says which,
:mod:`jaxft.models.llama` declares its axes). The head is a linear group like any other, so a method may adapt it.

Documents are told apart by segment ids (0: padding), as everywhere in jaxft: a sequence score is the head's output
at the **last token of each document**, which for one document per row is transformers' "rightmost token that is
not padding" (left or right padding alike), and for a packed row gives one score per document.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft.config import ModelConfig
from jaxft.models.hooks import Hooks
from jaxft.models.llama import InputError, check_inputs, hidden_states
from jaxft.ops.linear import embed, linear

POOLINGS = ("last", "mean")


def _head(cfg: ModelConfig, params: dict) -> dict:
    if cfg.head is None:
        raise InputError("this model has no task head (ModelConfig.head is None: a causal LM); load or build it with "
                         "a head, e.g. jaxft.from_pretrained(folder, head=HeadConfig('seq_cls', num_labels=2))")
    if cfg.head.group not in params:
        raise InputError(f"ModelConfig.head is {cfg.head.kind!r} but the params hold no {cfg.head.group!r} group")
    return params[cfg.head.group]


def head_logits(cfg: ModelConfig, params: dict, h: jax.Array, rng=None) -> jax.Array:
    """float32 [..., N] of the head on hidden states ``h`` [..., D] (every position). Token classification applies
    its dropout to ``h`` first when ``rng`` is given (training), as transformers' ``self.dropout`` does; ``rng``
    also reaches the methods on the head group (adapter dropout)."""
    group = _head(cfg, params)
    dropout_rng, method_rng = (None, None) if rng is None else jax.random.split(rng)
    rate = cfg.head.dropout if cfg.head.kind == "token_cls" else 0.0
    if dropout_rng is not None and rate > 0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - rate, h.shape)
        h = jnp.where(keep, h / jnp.asarray(1.0 - rate, h.dtype), jnp.zeros((), h.dtype))
    return linear(group, h, method_rng).astype(jnp.float32)


def token_logits(cfg: ModelConfig, params: dict, input_ids, positions=None, segment_ids=None, *, inputs_embeds=None,
                 hooks: Hooks = Hooks(), rng=None, activation_sharding=None) -> jax.Array:
    """float32 [B, T, N]: the head on every token (token classification's logits; a QA head's [..., 0] are the
    start logits and [..., 1] the end logits). Arguments as :func:`jaxft.models.llama.hidden_states`; ``rng``
    (training) also gives the head its dropout."""
    input_ids, positions, segment_ids, inputs_embeds = check_inputs(input_ids, positions, segment_ids,
                                                                    "token_logits", inputs_embeds, cfg.hidden_size)
    body_rng, head_rng = (None, None) if rng is None else jax.random.split(rng)
    h = hidden_states(cfg, params, input_ids, positions, segment_ids, inputs_embeds=inputs_embeds, hooks=hooks,
                      rng=body_rng, activation_sharding=activation_sharding).hidden
    return head_logits(cfg, params, h, head_rng)


def last_token_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, T] bool: the token is the last non-padding token of its document (segment id != 0, and the next slot
    holds another document or padding, or the row ends)."""
    following = jnp.pad(segment_ids[:, 1:], ((0, 0), (0, 1)))
    return (segment_ids != 0) & (following != segment_ids)


def _members(segment_ids: jax.Array, num_segments: int) -> jax.Array:
    """[B, S, T] bool: token t belongs to document s + 1 (segment ids number a row's documents from 1)."""
    return segment_ids[:, None, :] == jnp.arange(1, num_segments + 1, dtype=segment_ids.dtype)[None, :, None]


def pool(x: jax.Array, segment_ids: jax.Array, num_segments: int = 1, how: str = "last") -> tuple:
    """(pooled [B, S, ...] float32, present [B, S] bool) of per-token values ``x`` [B, T, ...] over each row's
    documents 1..S: ``last``, the value at the document's last token (a sequence score); ``mean``, the mean over its
    tokens. A row with fewer than S documents gives zeros and ``present`` False for the rest."""
    if how not in POOLINGS:
        raise InputError(f"pooling {how!r} is unknown; expected one of {POOLINGS}")
    members = _members(segment_ids, num_segments)
    present = jnp.any(members, axis=-1)
    x = x.astype(jnp.float32)
    if how == "last":
        t = segment_ids.shape[1]
        index = jnp.max(jnp.where(members & last_token_mask(segment_ids)[:, None, :], jnp.arange(t), 0), axis=-1)
        flat = jnp.take_along_axis(x, index.reshape(*index.shape, *([1] * (x.ndim - 2))), axis=1)
        return jnp.where(present.reshape(*present.shape, *([1] * (x.ndim - 2))), flat, 0.0), present
    weights = members / jnp.maximum(jnp.sum(members, axis=-1, keepdims=True), 1)
    return jnp.einsum("bst,bt...->bs...", weights, x, precision=jax.lax.Precision.HIGHEST), present


def sequence_logits(cfg: ModelConfig, params: dict, input_ids, positions=None, segment_ids=None, *,
                    num_segments: int = 1, inputs_embeds=None, hooks: Hooks = Hooks()) -> jax.Array:
    """float32 [B, S, N]: a sequence classifier's scores of each row's documents 1..S, each read at the document's
    last token (``segment_ids`` default: one document per row, no padding; S = 1 is transformers' pooled logits
    [B, N] with an added axis). A row with fewer documents gives zeros for the rest."""
    if segment_ids is None:
        b, t = (jnp.shape(input_ids) if inputs_embeds is None else jnp.shape(inputs_embeds)[:2])
        segment_ids = jnp.ones((b, t), jnp.int32)
    logits = token_logits(cfg, params, input_ids, positions, segment_ids, inputs_embeds=inputs_embeds, hooks=hooks)
    return pool(logits, jnp.asarray(segment_ids), num_segments, "last")[0]


def features(cfg: ModelConfig, params: dict, input_ids, positions=None, segment_ids=None, *, layer: int = -1,
             pooling: str = "last", num_segments: int = 1) -> jax.Array:
    """float32 [B, S, D]: pooled hidden states of each row's documents (PEFT's FEATURE_EXTRACTION: no head), for
    embeddings. ``layer`` indexes transformers' ``hidden_states`` tuple: 0 the embeddings, i the output of layer i,
    L (or -1) the last layer after the final norm. ``pooling``: ``last`` token or ``mean`` over the document."""
    n_layers = cfg.num_hidden_layers
    if not -(n_layers + 1) <= layer <= n_layers:
        raise InputError(f"features: layer {layer} is outside the model's hidden states 0..{n_layers} (or "
                         f"-{n_layers + 1}..-1)")
    layer %= n_layers + 1
    input_ids, positions, segment_ids, _ = check_inputs(input_ids, positions, segment_ids, "features")
    if segment_ids is None:
        segment_ids = jnp.ones(input_ids.shape, jnp.int32)
    if layer == 0:
        h = embed(params["embed_tokens"], input_ids, jnp.dtype(cfg.dtype))
    else:
        out = hidden_states(cfg, params, input_ids, positions, segment_ids, hooks=Hooks(taps=layer < n_layers))
        h = out.hidden if layer == n_layers else out.taps[layer - 1]
    return pool(h, segment_ids, num_segments, pooling)[0]
