"""What a train step minimizes: an objective is a loss, the batch arrays it reads, and how it is evaluated.

The step (:func:`jaxft.train.loop.train_step`) owns everything around the loss: micro-batch accumulation, the
non-finite guard, loss scaling, donation and sharding. It asks the objective only for the summed loss of one
micro-batch and for how many units (target tokens, pairs, sequences...) the whole accumulated batch holds, and
divides once, so every unit of the batch weighs the same however the units fall across micro-batches.

An objective is a frozen (hashable) dataclass, so it can sit in the step's static config; any class with these
members is one, including one defined outside jaxft (tests/test_objectives.py trains such a one).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import jax
import jax.numpy as jnp

from jaxft.config import ModelConfig
from jaxft.data.chat import IGNORE_INDEX
from jaxft.data.formats import DataError
from jaxft.models.llama import hidden_states, lm_head_kernel, logits_from_hidden, plain_head
from jaxft.peft.prefix import prompt_inputs
from jaxft.train.loss import chunked_cross_entropy_terms, cross_entropy, cross_entropy_terms, with_z_loss
from jaxft.train.metrics import perplexity


class Objective(Protocol):
    """The members the train step and the evaluation use."""

    batch_keys: tuple[str, ...]  # the [B, T] arrays of a batch it reads (what the data pipeline stacks for it)
    # optional: float_keys, {key: trailing dims} of the batch arrays that hold floats ([B, T, N] targets)
    # optional: reference(cfg, params, batch) -> {key: array} and reference_keys, the keys it returns: a reference
    # policy's quantities, added to each micro-batch outside the differentiated function (train.loop.with_reference)
    # optional: the objective's own train metrics, from the forward pass of the loss: loss_and_sums(cfg, params,
    # batch, rng, activation_sharding) -> (loss_sum, {name: f32 scalar sum}) of one micro-batch (the step adds the
    # sums over micro-batches, without gradient), step_metrics(sums) -> {name: f32 scalar} of the added sums
    # (traceable; divides once, guarded against a count of 0), and step_metric_keys, the names step_metrics returns

    def units(self, batches: dict) -> jax.Array:
        """f32 scalar: how many loss units ``batches`` holds (any leading axes); the step divides by it once."""

    def loss_sum(self, cfg: ModelConfig, params: dict, batch: dict, rng=None, activation_sharding=None
                 ) -> jax.Array:
        """f32 scalar: the loss summed over the units of one micro-batch [B, T] (``rng``: adapter dropout)."""

    def eval_sums(self, cfg: ModelConfig, params: dict, batch: dict) -> dict[str, jax.Array]:
        """Additive statistics of one held-out batch; :func:`jaxft.train.metrics.evaluate` adds them up."""

    def eval_metrics(self, sums: dict) -> dict[str, float]:
        """The held-out metrics from the sums over every eval batch."""


class FromSums:
    """``loss_and_sums`` and ``loss_sum`` of an objective whose ``_sums(cfg, params, batch, rng,
    activation_sharding)`` returns its micro-batch's ``loss_sum`` beside its metrics' sums (the RL objectives)."""

    def loss_and_sums(self, cfg: ModelConfig, params: dict, batch: dict, rng=None, activation_sharding=None
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
        sums = self._sums(cfg, params, batch, rng, activation_sharding)
        return sums.pop("loss_sum"), sums

    def loss_sum(self, cfg: ModelConfig, params: dict, batch: dict, rng=None, activation_sharding=None
                 ) -> jax.Array:
        return self.loss_and_sums(cfg, params, batch, rng, activation_sharding)[0]


def batch_structs(objective, lead: tuple[int, ...]) -> dict[str, jax.ShapeDtypeStruct]:
    """The abstract batch an objective reads, with leading dims ``lead`` ([rows, T], or [A, rows, T]): int32 arrays,
    except the ones its optional ``float_keys`` names (float32, with their trailing dims)."""
    floats = getattr(objective, "float_keys", {})
    return {k: jax.ShapeDtypeStruct(lead + floats[k], jnp.float32) if k in floats else jax.ShapeDtypeStruct(
        lead, jnp.int32) for k in objective.batch_keys}


# An evaluation takes logits a slice of positions at a time, [B, c, V] with B * c about this many tokens, also
# when training takes full logits (chunk_size 0): eval batches may be larger than train micro-batches.
EVAL_CHUNK_TOKENS = 1024


@dataclass(frozen=True)
class CausalLM:
    """Next-token cross-entropy over the target tokens (labels != -100, already shifted by the data pipeline).

    ``chunk_size``: tokens per chunk of the chunked cross-entropy, which never holds [tokens, V] logits; 0 takes
    full logits. A head with an adapter always takes full logits (its output is not one kernel's).
    ``z_loss``: PaLM's auxiliary ``z_loss * logsumexp(logits)**2`` per target token (training only).
    A prompt-style method in the params (prompt, P- or prefix tuning) takes part through the prefix and hooks
    :func:`jaxft.peft.prefix.prompt_inputs` derives from them, inside the differentiated loss.
    """

    chunk_size: int = 1024
    z_loss: float = 0.0
    batch_keys: ClassVar[tuple[str, ...]] = ("input_ids", "labels", "segment_ids", "positions")

    def units(self, batches: dict) -> jax.Array:
        return jnp.sum(batches["labels"] != IGNORE_INDEX, dtype=jnp.int32).astype(jnp.float32)

    @property
    def _reports_terms(self) -> bool:
        """Whether the step reports the cross-entropy and z-loss apart: with a z-loss, unless a subclass redefines
        :meth:`loss_sum` (then its own loss is what trains, and its parts are not these)."""
        return bool(self.z_loss) and type(self).loss_sum is CausalLM.loss_sum

    @property
    def step_metric_keys(self) -> tuple[str, ...]:
        """With a z-loss the step also reports its parts: the train loss is no longer the cross-entropy."""
        return ("ce_loss", "z_loss") if self._reports_terms else ()

    def loss_and_sums(self, cfg: ModelConfig, params: dict, batch: dict, rng=None, activation_sharding=None
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The micro-batch's summed loss and, with a z-loss, the sums of its cross-entropy and z-loss parts (from
        the same forward pass). Without one it is :meth:`loss_sum`'s, so a subclass that redefines the loss there is
        trained on its own."""
        if not self._reports_terms:
            return self.loss_sum(cfg, params, batch, rng, activation_sharding), {}
        terms = self._terms(cfg, params, batch, rng, activation_sharding)
        ce_sum, squared_sum, n_targets = terms
        return with_z_loss(terms, self.z_loss)[0], {"ce_sum": ce_sum, "z_sum": self.z_loss * squared_sum,
                                                    "n_targets": n_targets}

    def step_metrics(self, sums: dict) -> dict[str, jax.Array]:
        """Mean cross-entropy and mean z-loss per target token of the step (they add up to its loss)."""
        n_targets = jnp.maximum(sums["n_targets"], 1.0)
        return {"ce_loss": sums["ce_sum"] / n_targets, "z_loss": sums["z_sum"] / n_targets}

    def loss_sum(self, cfg: ModelConfig, params: dict, batch: dict, rng=None, activation_sharding=None
                 ) -> jax.Array:
        return with_z_loss(self._terms(cfg, params, batch, rng, activation_sharding), self.z_loss)[0]

    def _terms(self, cfg: ModelConfig, params: dict, batch: dict, rng, activation_sharding):
        """(summed cross-entropy, summed squared log-normalizer, target count) of one micro-batch."""
        body_rng, head_rng = (None, None) if rng is None else jax.random.split(rng)
        # the prompt encoder's own key, apart from the body's and head's (fold_in(rng, i) is split(rng)[i] for
        # i < 2, so 2), and the model's dropout draws stay as they were without an encoder
        params, hooks = prompt_inputs(cfg, params, None if rng is None else jax.random.fold_in(rng, 2))
        h = hidden_states(cfg, params, batch["input_ids"], batch.get("positions"), batch.get("segment_ids"),
                          rng=body_rng, activation_sharding=activation_sharding, hooks=hooks).hidden
        if self.chunk_size and plain_head(cfg, params):
            return chunked_cross_entropy_terms(h, lm_head_kernel(cfg, params), batch["labels"],
                                               chunk_size=self.chunk_size)
        return cross_entropy_terms(logits_from_hidden(cfg, params, h, head_rng), batch["labels"])

    def eval_sums(self, cfg: ModelConfig, params: dict, batch: dict) -> dict[str, jax.Array]:
        """{loss_sum, n_targets, n_correct} of one batch [B, T]; a target is correct when the argmax logit is its
        label (teacher-forced token accuracy), so every eval reports an accuracy whatever the task.

        Slicing the position axis (not rows) keeps each slice's rows sharded as the batch is.
        """
        params, hooks = prompt_inputs(cfg, params)
        h = hidden_states(cfg, params, batch["input_ids"], batch.get("positions"), batch.get("segment_ids"),
                          hooks=hooks).hidden
        b, t, d = h.shape
        c = max(1, min(t, (self.chunk_size or EVAL_CHUNK_TOKENS) // b))
        pad = -t % c
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        labels = jnp.pad(batch["labels"], ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
        h_slices = jnp.moveaxis(h.reshape(b, -1, c, d), 1, 0)              # [T / c, B, c, D]
        label_slices = jnp.moveaxis(labels.reshape(b, -1, c), 1, 0)        # [T / c, B, c]

        def add_slice(totals, xs):
            h_slice, label_slice = xs
            logits = logits_from_hidden(cfg, params, h_slice)              # [B, c, V] float32
            loss_sum, n_targets = cross_entropy(logits, label_slice)
            hits = (jnp.argmax(logits, axis=-1) == label_slice) & (label_slice != IGNORE_INDEX)
            return {"loss_sum": totals["loss_sum"] + loss_sum, "n_targets": totals["n_targets"] + n_targets,
                    "n_correct": totals["n_correct"] + jnp.sum(hits, dtype=jnp.float32)}, None

        zeros = dict.fromkeys(("loss_sum", "n_targets", "n_correct"), jnp.zeros((), jnp.float32))
        return jax.lax.scan(add_slice, zeros, (h_slices, label_slices))[0]

    def eval_metrics(self, sums: dict) -> dict[str, float]:
        """Mean loss per target token, perplexity, the token count, and token accuracy when the sums count correct
        tokens; a mean over all tokens, so a batch with few targets weighs no more than its tokens."""
        tokens = int(sums["n_targets"])
        if tokens == 0:
            raise DataError("evaluate", "no loss tokens", "the held-out batches contain no loss tokens (empty split, "
                            "or every token masked)")
        loss = float(sums["loss_sum"]) / tokens
        out = {"loss": loss, "perplexity": perplexity(loss), "tokens": tokens}
        if "n_correct" in sums:
            out["accuracy"] = float(sums["n_correct"]) / tokens
        return out
