"""Sequence-level quantities of packed rows, for objectives that compare whole sequences (preference tuning):
per-token log-probs of the labels, totals per document, and the chosen / rejected pairs of a row.

Documents are told apart by segment ids (1, 2, ...; 0 is padding), as everywhere in jaxft. Per-document totals come
back indexed by segment id, ``totals[b, s]`` for document s of row b, so every array keeps the batch's static
[B, T] shape whatever the number of documents per row. A preference pair is two consecutive documents of one row:
segment 2k - 1 the chosen, 2k the rejected completion (``jaxft.data`` lays pairs out so).
"""
from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxft.config import ModelConfig
from jaxft.data.chat import IGNORE_INDEX
from jaxft.data.formats import DataError
from jaxft.models.heads import last_token_mask
from jaxft.models.llama import hidden_states, lm_head_kernel, logits_from_hidden, plain_head
from jaxft.peft.methods import without_methods
from jaxft.peft.prefix import prompt_inputs, without_prompt
from jaxft.train.loss import token_logprobs


def label_logprobs(cfg: ModelConfig, params: dict, batch: dict, *, chunk_size: int, rng=None,
                   activation_sharding=None, temperature: float = 1.0) -> jax.Array:
    """[B, T] float32 log p(labels[t]) of every labelled position (0 elsewhere), from the chunked pass that never
    holds [tokens, V] logits (full logits when the head carries an adapter or ``chunk_size`` is 0).

    ``temperature``: the log-probs of ``softmax(logits / temperature)``, the distribution a rollout sampled from
    (TRL's policy-gradient losses score it so). A prompt-style method in the params takes part through
    :func:`jaxft.peft.prefix.prompt_inputs`, as in :class:`jaxft.train.objectives.CausalLM`.
    """
    body_rng, head_rng = (None, None) if rng is None else jax.random.split(rng)
    params, hooks = prompt_inputs(cfg, params)
    h = hidden_states(cfg, params, batch["input_ids"], batch.get("positions"), batch.get("segment_ids"), rng=body_rng,
                      activation_sharding=activation_sharding, hooks=hooks).hidden
    labels = batch["labels"]
    if chunk_size and plain_head(cfg, params):
        kernel = lm_head_kernel(cfg, params)
        # h @ (K / T) = (h @ K) / T: the scaled kernel keeps the chunked pass's one contraction
        kernel = kernel if temperature == 1.0 else kernel / temperature
        return token_logprobs(h, kernel, labels, chunk_size=chunk_size)
    logits = logits_from_hidden(cfg, params, h, head_rng)
    logp = jax.nn.log_softmax(logits if temperature == 1.0 else logits / temperature, axis=-1)
    picked = jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(labels != IGNORE_INDEX, picked, 0.0)


def adapters_off_logprobs(cfg: ModelConfig, params: dict, batch: dict, *, chunk_size: int,
                          temperature: float = 1.0) -> dict[str, jax.Array]:
    """``{"ref_logps": [B, T]}``: the label log-probs of the reference policy that is the same base with every
    adapter off (:func:`jaxft.peft.methods.without_methods`, and no prompt-style prefix): what a preference or
    policy-gradient objective's ``reference`` returns (the train step stops its gradient,
    :func:`jaxft.train.loop.with_reference`)."""
    return {"ref_logps": label_logprobs(cfg, without_prompt(without_methods(params)), batch, chunk_size=chunk_size,
                                        temperature=temperature)}


class ReferenceInputs:
    """The batch keys of an objective against a reference policy (a mixin of DPO and KTO): ``ref_logps`` [B, T]
    float32 is read from the batch when ``precomputed_reference`` (the data carries it, :mod:`jaxft.train.reference`);
    otherwise the step computes it (the objective's ``reference``, :func:`jaxft.train.loop.with_reference`)."""

    policy_keys: ClassVar[tuple[str, ...]]  # the [B, T] arrays the policy's loss reads
    reference_keys: ClassVar[tuple[str, ...]] = ("ref_logps",)
    precomputed_reference: bool

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return self.policy_keys + self.reference_keys * self.precomputed_reference

    @property
    def float_keys(self) -> dict[str, tuple[int, ...]]:
        return dict.fromkeys(self.reference_keys * self.precomputed_reference, ())


def segment_totals(values: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """[B, T, ...]: the sum of ``values`` [B, T, ...] over each document, at index s for segment id s (index 0 sums
    the padding). One scatter-add per row: no [B, T, T] mask."""
    b, t = segment_ids.shape

    def row(v, ids):
        return jax.ops.segment_sum(v, ids, num_segments=t)

    return jax.vmap(row)(values, segment_ids.reshape(b, t))


def pairs(totals: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(chosen [B, T // 2, ...], rejected [B, T // 2, ...]) of per-document totals [B, T, ...]: pair k of a row is
    its documents 2k + 1 (chosen) and 2k + 2 (rejected); entries past a row's last pair are the padding's zeros."""
    t = totals.shape[1]
    padded = jnp.pad(totals, ((0, 0), (0, 1)) + ((0, 0),) * (totals.ndim - 2))
    return padded[:, 1::2][:, :t // 2], padded[:, 2::2][:, :t // 2]


def pair_count(segment_ids: jax.Array) -> jax.Array:
    """f32: the pairs in ``segment_ids`` [..., T] (any leading axes): the rejected documents, even segment ids."""
    ids = segment_ids.reshape(-1, segment_ids.shape[-1])
    return jnp.sum(last_token_mask(ids) & (ids % 2 == 0), dtype=jnp.float32)


def pair_slots(segment_ids: jax.Array) -> jax.Array:
    """[B, T // 2] bool: pair slot k of the row holds a pair (its rejected document, segment 2k + 2, is there)."""
    return pairs(segment_totals((segment_ids != 0).astype(jnp.float32), segment_ids))[1] > 0


def evaluated_pairs(sums: dict) -> int:
    """The ``pairs`` count of an objective's eval sums, or a DataError when there are none to average over."""
    count = int(sums["pairs"])
    if count == 0:
        raise DataError("evaluate", "no pairs", "the held-out batches contain no preference pairs (empty split, or "
                        "rows without a chosen / rejected pair)")
    return count
