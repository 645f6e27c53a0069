"""Direct preference optimization: TRL's DPO loss types on the chosen / rejected pairs of packed rows.

A pair is two consecutive documents of one row (segments 2k + 1 chosen, 2k + 2 rejected, each prompt + completion,
``labels`` only on the completion), so a pair's log-probs are its documents' summed label log-probs
(:mod:`jaxft.train.sequences`). Each loss below is a short function of the per-pair statistics, written as TRL's
``DPOTrainer._compute_loss`` (TRL 1.16, the default reverse-KL divergence) computes it, one loss per pair; TRL's
loss is the mean over pairs, so the objective's units are pairs.

The reference policy is the same base with the adapters switched off (:func:`jaxft.peft.methods.without_methods`),
evaluated by the train step outside the differentiated function (:func:`jaxft.train.loop.with_reference`), or a
separate model's per-token log-probs precomputed into the batch as ``ref_logps``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from jaxft.config import ConfigError, ModelConfig
from jaxft.data.chat import IGNORE_INDEX
from jaxft.train.loop import with_reference
from jaxft.train.sequences import (ReferenceInputs, adapters_off_logprobs, evaluated_pairs, label_logprobs,
                                   pair_count, pair_slots, pairs, segment_totals)


class PairLogps(NamedTuple):
    """Per-pair arrays (any one shape): policy and reference log-probs of the chosen and rejected completions,
    summed over their tokens, and the completions' token counts."""

    chosen: jax.Array
    rejected: jax.Array
    ref_chosen: jax.Array
    ref_rejected: jax.Array
    chosen_length: jax.Array
    rejected_length: jax.Array

    def chosen_logratio(self) -> jax.Array:
        return self.chosen - self.ref_chosen

    def rejected_logratio(self) -> jax.Array:
        return self.rejected - self.ref_rejected

    def delta(self) -> jax.Array:
        """The DPO score: chosen log-ratio minus rejected log-ratio."""
        return self.chosen_logratio() - self.rejected_logratio()

    def length_normalized_delta(self) -> jax.Array:
        """The log-ratios averaged per completion token (TRL's ``ipo`` and ``sigmoid_norm``; lengths floored at 1)."""
        return (self.chosen_logratio() / jnp.maximum(self.chosen_length, 1.0)
                - self.rejected_logratio() / jnp.maximum(self.rejected_length, 1.0))


def sigmoid_loss(p: PairLogps, beta: float, smoothing: float) -> jax.Array:
    """DPO; with ``smoothing`` ε > 0 conservative DPO (cDPO), preferences flipped with probability ε. TRL 1.16's
    ``sigmoid`` ignores its ``label_smoothing``: the two agree at ε = 0."""
    z = beta * p.delta()
    return -(1 - smoothing) * jax.nn.log_sigmoid(z) - smoothing * jax.nn.log_sigmoid(-z)


def hinge_loss(p: PairLogps, beta: float, smoothing: float) -> jax.Array:
    """SLiC's hinge on the scaled score."""
    return jax.nn.relu(1 - beta * p.delta())


def ipo_loss(p: PairLogps, beta: float, smoothing: float) -> jax.Array:
    """IPO (Eq. 17), on per-token log-ratios: TRL's normalization, confirmed with the IPO authors."""
    return (p.length_normalized_delta() - 1 / (2 * beta)) ** 2


def exo_pair_loss(p: PairLogps, beta: float, smoothing: float) -> jax.Array:
    """EXO-pref (Eq. 16): KL from the policy's pair distribution softmax(β · log-ratios) to [1 - ε, ε]."""
    z = beta * p.delta()
    chosen_term = jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - jnp.log1p(-smoothing))
    rejected_term = jax.nn.sigmoid(-z) * (jax.nn.log_sigmoid(-z) - jnp.log(smoothing))
    return chosen_term + rejected_term


def nca_pair_loss(p: PairLogps, beta: float, smoothing: float) -> jax.Array:
    """NCA on the chosen and rejected rewards separately."""
    chosen, rejected = beta * p.chosen_logratio(), beta * p.rejected_logratio()
    return -jax.nn.log_sigmoid(chosen) - 0.5 * jax.nn.log_sigmoid(-chosen) - 0.5 * jax.nn.log_sigmoid(-rejected)


def robust_loss(p: PairLogps, beta: float, smoothing: float) -> jax.Array:
    """Robust DPO: unbiased under preferences flipped with probability ε = ``smoothing`` (in [0, 0.5))."""
    z = beta * p.delta()
    clean = -(1 - smoothing) * jax.nn.log_sigmoid(z)
    flipped = -smoothing * jax.nn.log_sigmoid(-z)
    return (clean - flipped) / (1 - 2 * smoothing)


def bco_pair_loss(p: PairLogps, beta: float, smoothing: float) -> jax.Array:
    """BCO on pairs, as TRL 1.16 computes it: chosen rewards pushed up, rejected down, with no running-mean shift
    δ (TRL keeps no state between steps for it)."""
    return -jax.nn.log_sigmoid(beta * p.chosen_logratio()) - jax.nn.log_sigmoid(-beta * p.rejected_logratio())


def sppo_hard_loss(p: PairLogps, beta: float, smoothing: float) -> jax.Array:
    """SPPO with hard win probabilities (1 for the chosen, 0 for the rejected)."""
    return (p.chosen_logratio() - 0.5 / beta) ** 2 + (p.rejected_logratio() + 0.5 / beta) ** 2


def apo_zero_loss(p: PairLogps, beta: float, smoothing: float) -> jax.Array:
    """APO-zero (Eq. 7): chosen likelihood up, rejected down (chosen outputs better than the model's own)."""
    return 1 - jax.nn.sigmoid(beta * p.chosen_logratio()) + jax.nn.sigmoid(beta * p.rejected_logratio())


def apo_down_loss(p: PairLogps, beta: float, smoothing: float) -> jax.Array:
    """APO-down (Eq. 8): both likelihoods down, the rejected more (chosen outputs worse than the model's own)."""
    return jax.nn.sigmoid(beta * p.chosen_logratio()) + 1 - jax.nn.sigmoid(beta * p.delta())


def sigmoid_norm_loss(p: PairLogps, beta: float, smoothing: float) -> jax.Array:
    """DPO on per-token log-ratios."""
    return -jax.nn.log_sigmoid(beta * p.length_normalized_delta())


def sft_loss(p: PairLogps, beta: float, smoothing: float) -> jax.Array:
    """TRL's ``sft``: the NLL of the chosen completions, a mean over every chosen token of the micro-batch, the same
    for each of its pairs (``[sigmoid, sft]`` is RPO: DPO that keeps the chosen replies likely). TRL's for one
    micro-batch; with accumulation the step weighs each micro-batch's mean by its pairs, where TRL averages its
    micro-steps' means (equal when micro-batches hold as many pairs). Pair slots without a pair hold zeros, so sums
    over all of ``p`` are sums over the pairs."""
    nll = -jnp.sum(p.chosen) / jnp.maximum(jnp.sum(p.chosen_length), 1.0)
    return jnp.broadcast_to(nll, p.chosen.shape)


LOSSES = {"sigmoid": sigmoid_loss, "hinge": hinge_loss, "ipo": ipo_loss, "exo_pair": exo_pair_loss,
          "nca_pair": nca_pair_loss, "robust": robust_loss, "bco_pair": bco_pair_loss, "sppo_hard": sppo_hard_loss,
          "apo_zero": apo_zero_loss, "apo_down": apo_down_loss, "sigmoid_norm": sigmoid_norm_loss, "sft": sft_loss}


def weighted_loss(p: PairLogps, loss_types, loss_weights, beta: float, smoothing: float) -> jax.Array:
    """Per-pair sum of weighted losses: TRL's ``loss_type`` list, whose loss is Σ weight · mean over pairs."""
    return sum(w * LOSSES[name](p, beta, smoothing) for name, w in zip(loss_types, loss_weights, strict=True))


def rewards(p: PairLogps, beta: float) -> tuple[jax.Array, jax.Array]:
    """(chosen, rejected) implicit rewards β · log-ratio, as TRL reports them for every loss type."""
    return beta * p.chosen_logratio(), beta * p.rejected_logratio()


def pair_logps(logps: jax.Array, ref_logps: jax.Array, batch: dict) -> tuple[PairLogps, jax.Array]:
    """The [B, T // 2] pairs of packed rows from per-token policy and reference log-probs [B, T], and the mask of
    real pairs (a row's pairs are its first max(segment id) / 2)."""
    labelled = (batch["labels"] != IGNORE_INDEX).astype(jnp.float32)
    totals = segment_totals(jnp.stack([logps, ref_logps, labelled], axis=-1), batch["segment_ids"])
    chosen, rejected = pairs(totals)
    return PairLogps(chosen[..., 0], rejected[..., 0], chosen[..., 1], rejected[..., 1], chosen[..., 2],
                     rejected[..., 2]), pair_slots(batch["segment_ids"])


@dataclass(frozen=True)
class DPO(ReferenceInputs):
    """TRL's ``DPOTrainer`` loss: ``loss_types`` (TRL's ``loss_type`` list, :data:`LOSSES`) weighted by
    ``loss_weights`` (default 1 each), with β = ``beta`` and ``label_smoothing`` (cDPO for ``sigmoid``, the flip
    rate for ``robust``, EXO's ε for ``exo_pair``). ``chunk_size``: tokens per chunk of the log-prob pass (0: full
    logits). ``precomputed_reference``: the batches carry the reference's ``ref_logps``. Units are pairs: the step's
    loss is the mean over the batch's pairs, as TRL's."""

    loss_types: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    chunk_size: int = 1024
    precomputed_reference: bool = False  # the data carries ref_logps (jaxft.train.reference): no reference pass
    policy_keys: ClassVar[tuple[str, ...]] = ("input_ids", "labels", "segment_ids", "positions")
    step_metric_keys: ClassVar[tuple[str, ...]] = ("rewards/chosen", "rewards/rejected", "rewards/accuracies",
                                                   "rewards/margins", "logps/chosen", "logps/rejected")

    def __post_init__(self):
        types = (self.loss_types,) if isinstance(self.loss_types, str) else tuple(self.loss_types)
        unknown = [t for t in types if t not in LOSSES]
        if not types or unknown:
            raise ConfigError(f"DPO loss_types {list(types)}: expected one or more of {sorted(LOSSES)}")
        weights = (1.0,) * len(types) if self.loss_weights is None else tuple(map(float, self.loss_weights))
        if len(weights) != len(types):
            raise ConfigError(f"DPO loss_weights {list(weights)}: expected one weight per loss type {list(types)}")
        if not self.beta > 0:
            raise ConfigError(f"DPO beta {self.beta}: expected > 0")
        if "robust" in types and not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"DPO label_smoothing {self.label_smoothing}: the robust loss needs it in [0, 0.5)")
        if "exo_pair" in types and not 0 < self.label_smoothing < 1:
            raise ConfigError(f"DPO label_smoothing {self.label_smoothing}: the exo_pair loss needs it in (0, 1) "
                              f"(the EXO paper recommends 1e-3)")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"DPO label_smoothing {self.label_smoothing}: expected in [0, 1)")
        object.__setattr__(self, "loss_types", types)
        object.__setattr__(self, "loss_weights", weights)

    def reference(self, cfg: ModelConfig, params: dict, batch: dict) -> dict[str, jax.Array]:
        return adapters_off_logprobs(cfg, params, batch, chunk_size=self.chunk_size)

    def document_rewards(self, cfg: ModelConfig, params: dict, batch: dict) -> jax.Array:
        """[B, T]: TRL's implicit reward β · log-ratio (policy minus reference log-prob) of each document's
        completion, at index s for segment s (``jaxft eval --scores``)."""
        batch = with_reference(self, cfg, params, batch)
        logps = label_logprobs(cfg, params, batch, chunk_size=self.chunk_size)
        return self.beta * segment_totals(logps - batch["ref_logps"], batch["segment_ids"])

    def units(self, batches: dict) -> jax.Array:
        """The number of pairs (TRL's loss is their mean)."""
        return pair_count(batches["segment_ids"])

    def _pairs(self, cfg, params, batch, rng=None, activation_sharding=None) -> tuple[PairLogps, jax.Array]:
        logps = label_logprobs(cfg, params, batch, chunk_size=self.chunk_size, rng=rng,
                               activation_sharding=activation_sharding)
        return pair_logps(logps, batch["ref_logps"], batch)

    def _pair_sums(self, p: PairLogps, real: jax.Array) -> dict[str, jax.Array]:
        """Sums over the real pairs of the loss, TRL's rewards and log-probs, and the pair count: one home for each
        metric's formula, in training and evaluation."""
        chosen, rejected = rewards(p, self.beta)
        per_pair = {"loss": weighted_loss(p, self.loss_types, self.loss_weights, self.beta, self.label_smoothing),
                    "rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
                    "rewards/accuracies": (chosen > rejected).astype(jnp.float32),
                    "logps/chosen": p.chosen, "logps/rejected": p.rejected}
        sums = {k: jnp.sum(jnp.where(real, v, 0.0)) for k, v in per_pair.items()}
        return {**sums, "pairs": jnp.sum(real, dtype=jnp.float32)}

    def loss_and_sums(self, cfg: ModelConfig, params: dict, batch: dict, rng=None, activation_sharding=None
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
        sums = self._pair_sums(*self._pairs(cfg, params, batch, rng, activation_sharding))
        return sums.pop("loss"), sums

    def loss_sum(self, cfg: ModelConfig, params: dict, batch: dict, rng=None, activation_sharding=None
                 ) -> jax.Array:
        return self.loss_and_sums(cfg, params, batch, rng, activation_sharding)[0]

    def step_metrics(self, sums: dict) -> dict[str, jax.Array]:
        """TRL's logged DPO metrics of a train step, each a mean over the step's pairs."""
        return {k: sums[k] / jnp.maximum(sums["pairs"], 1.0) for k in self.step_metric_keys}

    def eval_sums(self, cfg: ModelConfig, params: dict, batch: dict) -> dict[str, jax.Array]:
        """Sums over the batch's pairs of the loss, TRL's rewards and log-probs, and the pair count."""
        return self._pair_sums(*self._pairs(cfg, params, with_reference(self, cfg, params, batch)))

    def eval_metrics(self, sums: dict) -> dict[str, float]:
        """TRL's DPO metrics, each a mean over the held-out pairs, and the pair count."""
        n_pairs = evaluated_pairs(sums)
        return {**{k: float(v) / n_pairs for k, v in sums.items() if k != "pairs"}, "pairs": n_pairs}
