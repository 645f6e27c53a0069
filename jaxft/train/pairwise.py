"""Pairwise preference objectives without a reference policy: the reward model (Bradley–Terry), ORPO and SimPO, each
a frozen dataclass following :class:`jaxft.train.objectives.Objective`, as TRL computes them.

They read the preference batch layout: ``input_ids``, ``segment_ids``, ``positions`` [B, T] as for SFT, a pair's
chosen and rejected documents as two consecutive segments of one row (2k + 1 and 2k + 2, every document prompt +
completion), ``labels`` the shifted targets of the completion tokens only, and for the reward model an optional
float ``margin`` at every token of the chosen document. The loss unit is a pair: every pair of the accumulated batch
weighs the same, as TRL's mean over the pairs of its batch.

Every eval statistic is a sum over pairs, so :func:`jaxft.train.metrics.evaluate` adds batches exactly; the metrics
carry TRL's names (``accuracy`` and ``margin`` of ``RewardTrainer``; ``rewards/chosen`` etc. of ORPO and CPO).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxft.config import ConfigError, ModelConfig
from jaxft.data.chat import IGNORE_INDEX
from jaxft.models.heads import last_token_mask
from jaxft.train.head_objectives import task_logits
from jaxft.train.sequences import (evaluated_pairs, label_logprobs, pair_count, pair_slots, pairs,
                                   segment_totals)

_INPUT_KEYS = ("input_ids", "segment_ids", "positions")


def _pair_means(values: jax.Array, counted: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(chosen, rejected) [B, T // 2]: the mean of ``values`` [B, T] over the ``counted`` tokens of each pair's two
    documents (0 for a pair slot past the row's last pair)."""
    sums = pairs(segment_totals(jnp.where(counted, values, 0.0), segment_ids))
    counts = pairs(segment_totals(counted.astype(jnp.float32), segment_ids))
    return sums[0] / jnp.maximum(counts[0], 1.0), sums[1] / jnp.maximum(counts[1], 1.0)


def _mean_metrics(sums: dict, names: dict[str, str]) -> dict[str, float]:
    """{metric: sums[key] / pairs} for ``names`` {metric: key of sums}, and the pair count."""
    count = evaluated_pairs(sums)
    return {"pairs": count, **{metric: float(sums[key]) / count for metric, key in names.items()}}


@dataclass(frozen=True)
class RewardModel:
    """TRL's ``RewardTrainer.compute_loss``: a one-label sequence classifier's reward r of each document (the head
    at its last token), the Bradley–Terry loss ``-log σ(r_c − r_r − margin)`` per pair, plus
    ``center_rewards_coefficient * (r_c + r_r)²`` (TRL's ``mean((r_c + r_r)²)`` over the same pairs) when set.
    ``margin``: the batch's value at the chosen document (0 without the array)."""

    center_rewards_coefficient: float | None = None
    batch_keys: ClassVar[tuple[str, ...]] = _INPUT_KEYS + ("margin",)
    float_keys: ClassVar[dict[str, tuple[int, ...]]] = {"margin": ()}
    step_metric_keys: ClassVar[tuple[str, ...]] = ("accuracy", "margin", "mean_reward")

    def units(self, batches: dict) -> jax.Array:
        return pair_count(batches["segment_ids"])

    @staticmethod
    def document_rewards(cfg: ModelConfig, params: dict, batch: dict, rng=None, activation_sharding=None
                         ) -> jax.Array:
        """[B, T]: each document's reward r (the head at its last token), at index s for segment s."""
        segment_ids = batch["segment_ids"]
        logits = task_logits(cfg, params, batch, "seq_cls", 1, rng, activation_sharding)
        return segment_totals(jnp.where(last_token_mask(segment_ids), logits[..., 0], 0.0), segment_ids)

    @staticmethod
    def rewards(cfg: ModelConfig, params: dict, batch: dict, rng=None, activation_sharding=None) -> dict:
        """{chosen, rejected, margin, present} [B, T // 2]: the pairs' rewards, margins and which slots hold one."""
        segment_ids = batch["segment_ids"]
        last = last_token_mask(segment_ids)
        chosen, rejected = pairs(RewardModel.document_rewards(cfg, params, batch, rng, activation_sharding))
        margin = batch.get("margin")
        margin = jnp.zeros_like(chosen) if margin is None else pairs(segment_totals(
            jnp.where(last, margin.astype(jnp.float32), 0.0), segment_ids))[0]
        return {"chosen": chosen, "rejected": rejected, "margin": margin, "present": pair_slots(segment_ids)}

    def _loss_sum(self, r: dict) -> jax.Array:
        per_pair = -jax.nn.log_sigmoid(r["chosen"] - r["rejected"] - r["margin"])
        if self.center_rewards_coefficient is not None:
            per_pair = per_pair + self.center_rewards_coefficient * jnp.square(r["chosen"] + r["rejected"])
        return jnp.sum(jnp.where(r["present"], per_pair, 0.0))

    @staticmethod
    def _pair_sums(r: dict) -> dict[str, jax.Array]:
        """{pairs, correct (r_c > r_r), margin_sum (r_c − r_r), reward_sum (r_c + r_r)} over the pairs present."""
        total = lambda x: jnp.sum(jnp.where(r["present"], x, 0.0), dtype=jnp.float32)  # noqa: E731
        return {"pairs": jnp.sum(r["present"], dtype=jnp.float32),
                "correct": total((r["chosen"] > r["rejected"]).astype(jnp.float32)),
                "margin_sum": total(r["chosen"] - r["rejected"]), "reward_sum": total(r["chosen"] + r["rejected"])}

    def loss_and_sums(self, cfg: ModelConfig, params: dict, batch: dict, rng=None, activation_sharding=None
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
        r = self.rewards(cfg, params, batch, rng, activation_sharding)
        return self._loss_sum(r), self._pair_sums(r)

    def loss_sum(self, cfg: ModelConfig, params: dict, batch: dict, rng=None, activation_sharding=None
                 ) -> jax.Array:
        return self._loss_sum(self.rewards(cfg, params, batch, rng, activation_sharding))

    def step_metrics(self, sums: dict) -> dict[str, jax.Array]:
        """TRL's RewardTrainer metrics of a train step: accuracy, margin (means over pairs), mean_reward (over
        documents)."""
        pairs = jnp.maximum(sums["pairs"], 1.0)
        return {"accuracy": sums["correct"] / pairs, "margin": sums["margin_sum"] / pairs,
                "mean_reward": sums["reward_sum"] / (2 * pairs)}

    def eval_sums(self, cfg: ModelConfig, params: dict, batch: dict) -> dict[str, jax.Array]:
        """{loss_sum, pairs, correct (r_c > r_r), margin_sum (r_c − r_r), reward_sum (r_c + r_r)}."""
        loss_sum, sums = self.loss_and_sums(cfg, params, batch)
        return {"loss_sum": loss_sum, **sums}

    def eval_metrics(self, sums: dict) -> dict[str, float]:
        """loss per pair, TRL's accuracy (r_c > r_r) and margin (mean r_c − r_r), mean_reward (over documents)."""
        out = _mean_metrics(sums, {"loss": "loss_sum", "accuracy": "correct", "margin": "margin_sum"})
        return out | {"mean_reward": float(sums["reward_sum"]) / (2 * out["pairs"])}


def _next_token_labels(input_ids: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """[B, T]: the next token of the same document at every position (-100 at a document's last token and padding):
    the targets of an NLL over the whole document, prompt included."""
    following = jnp.pad(segment_ids[:, 1:], ((0, 0), (0, 1)))
    next_ids = jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1)))
    return jnp.where((segment_ids != 0) & (following == segment_ids), next_ids, IGNORE_INDEX)


def _log1mexp(x: jax.Array) -> jax.Array:
    """log(1 − exp(x)) for x < 0, TRL's branch at −ln 2; each branch sees only inputs where it is finite, so the
    unused one gives no NaN gradient."""
    small = x < -0.6931471805599453
    return jnp.where(small, jnp.log1p(-jnp.exp(jnp.where(small, x, -1.0))),
                     jnp.log(-jnp.expm1(jnp.where(small, -0.5, x))))


def _preference_sums(per_pair: jax.Array, stats: dict, beta: float) -> dict[str, jax.Array]:
    """The additive eval sums shared by ORPO and SimPO: TRL's rewards β · average log-prob of each completion."""
    present = stats["present"]
    total = lambda x: jnp.sum(jnp.where(present, x, 0.0), dtype=jnp.float32)  # noqa: E731
    chosen, rejected = beta * stats["chosen"], beta * stats["rejected"]
    return {"loss_sum": total(per_pair), "pairs": jnp.sum(present, dtype=jnp.float32),
            "rewards_chosen": total(chosen), "rewards_rejected": total(rejected),
            "correct": total((chosen > rejected).astype(jnp.float32)), "logps_chosen": total(stats["chosen"]),
            "logps_rejected": total(stats["rejected"]), "nll": total(stats["nll"])}


_PREFERENCE_METRICS = {"loss": "loss_sum", "rewards/chosen": "rewards_chosen", "rewards/rejected": "rewards_rejected",
                       "rewards/accuracies": "correct", "logps/chosen": "logps_chosen",
                       "logps/rejected": "logps_rejected", "nll_loss": "nll"}


def _preference_metrics(sums: dict, extra: dict[str, str] | None = None) -> dict[str, float]:
    out = _mean_metrics(sums, _PREFERENCE_METRICS | (extra or {}))
    return out | {"rewards/margins": out["rewards/chosen"] - out["rewards/rejected"]}


def _preference_step_metrics(sums: dict, extra: dict[str, str] | None = None) -> dict[str, jax.Array]:
    """The train step's counterpart of :func:`_preference_metrics` (traceable; the loss is the step's own): each a
    mean over the step's pairs, 0 for a step without pairs."""
    count = jnp.maximum(sums["pairs"], 1.0)
    out = {metric: sums[key] / count for metric, key in (_PREFERENCE_METRICS | (extra or {})).items()
           if metric != "loss"}
    return out | {"rewards/margins": out["rewards/chosen"] - out["rewards/rejected"]}


_PREFERENCE_STEP_KEYS = tuple(k for k in _PREFERENCE_METRICS if k != "loss") + ("rewards/margins",)
_ORPO_METRICS = {"log_odds_ratio": "log_sigmoid_odds", "log_odds_chosen": "log_odds"}


def _check_positive(owner: str, **values):
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"{owner}: {name} must be > 0, got {value!r}")


def _completion_stats(cfg: ModelConfig, params: dict, batch: dict, nll_targets: jax.Array, chunk_size: int,
                      rng=None, activation_sharding=None) -> dict[str, jax.Array]:
    """{chosen, rejected, nll, present} [B, T // 2]: each completion's average log-prob (over its labelled tokens),
    the chosen document's mean NLL over ``nll_targets`` (shifted targets that include the completion's labels),
    and which pair slots hold a pair. One pass of :func:`jaxft.train.sequences.label_logprobs` on ``nll_targets``:
    at a completion token they are the batch's own label."""
    segment_ids = batch["segment_ids"]
    logps = label_logprobs(cfg, params, {**batch, "labels": nll_targets}, chunk_size=chunk_size, rng=rng,
                           activation_sharding=activation_sharding)
    chosen, rejected = _pair_means(logps, batch["labels"] != IGNORE_INDEX, segment_ids)
    nll = -_pair_means(logps, nll_targets != IGNORE_INDEX, segment_ids)[0]
    return {"chosen": chosen, "rejected": rejected, "nll": nll, "present": pair_slots(segment_ids)}


@dataclass(frozen=True)
class ORPO:
    """The loss of TRL's ``trl.experimental.orpo`` trainer, per pair: the chosen document's NLL (a mean over its
    tokens; TRL takes it over the prompt and the completion, every token after the first) minus
    ``beta * log σ(log odds)``, the log odds ratio of the completions' average log-probs p̄:
    ``(p̄_c − p̄_r) − (log(1 − e^p̄_c) − log(1 − e^p̄_r))``. TRL means the NLL over the tokens of its whole batch;
    here each pair's NLL is its own token mean, so every pair weighs the same however micro-batches split them
    (the same number as TRL's for a batch of one pair, or of chosen documents of one length).

    ``chunk_size``: as :class:`jaxft.train.objectives.CausalLM` (log-probs without [tokens, V] logits).
    """

    beta: float = 0.1
    chunk_size: int = 1024
    batch_keys: ClassVar[tuple[str, ...]] = _INPUT_KEYS + ("labels",)
    step_metric_keys: ClassVar[tuple[str, ...]] = _PREFERENCE_STEP_KEYS + tuple(_ORPO_METRICS)

    def __post_init__(self):
        _check_positive("ORPO", beta=self.beta)

    def units(self, batches: dict) -> jax.Array:
        return pair_count(batches["segment_ids"])

    def _terms(self, cfg, params, batch, rng=None, activation_sharding=None) -> tuple[jax.Array, jax.Array, dict]:
        """(per-pair loss, per-pair log odds, stats) [B, T // 2]; pair slots without a pair read −1 log-probs,
        where the log odds are finite."""
        targets = _next_token_labels(batch["input_ids"], batch["segment_ids"])
        stats = _completion_stats(cfg, params, batch, targets, self.chunk_size, rng, activation_sharding)
        chosen, rejected = (jnp.where(stats["present"], stats[k], -1.0) for k in ("chosen", "rejected"))
        log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
        return stats["nll"] - self.beta * jax.nn.log_sigmoid(log_odds), log_odds, stats

    def _sums(self, per_pair: jax.Array, log_odds: jax.Array, stats: dict) -> dict[str, jax.Array]:
        """The shared preference sums and ORPO's log_odds (log odds) and log_sigmoid_odds (its log σ)."""
        total = lambda x: jnp.sum(jnp.where(stats["present"], x, 0.0))  # noqa: E731
        return _preference_sums(per_pair, stats, self.beta) | {
            "log_odds": total(log_odds), "log_sigmoid_odds": total(jax.nn.log_sigmoid(log_odds))}

    def loss_and_sums(self, cfg: ModelConfig, params: dict, batch: dict, rng=None, activation_sharding=None
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
        sums = self._sums(*self._terms(cfg, params, batch, rng, activation_sharding))
        return sums.pop("loss_sum"), sums

    def loss_sum(self, cfg: ModelConfig, params: dict, batch: dict, rng=None, activation_sharding=None
                 ) -> jax.Array:
        return self.loss_and_sums(cfg, params, batch, rng, activation_sharding)[0]

    def step_metrics(self, sums: dict) -> dict[str, jax.Array]:
        return _preference_step_metrics(sums, _ORPO_METRICS)

    def eval_sums(self, cfg: ModelConfig, params: dict, batch: dict) -> dict[str, jax.Array]:
        return self._sums(*self._terms(cfg, params, batch))

    def eval_metrics(self, sums: dict) -> dict[str, float]:
        """TRL's ORPO metrics: loss, rewards/{chosen, rejected, accuracies, margins} (β · average log-prob),
        logps/{chosen, rejected} (average log-probs), nll_loss, log_odds_ratio (mean log σ(log odds)) and
        log_odds_chosen (mean log odds), each a mean over pairs."""
        return _preference_metrics(sums, _ORPO_METRICS)


@dataclass(frozen=True)
class SimPO:
    """SimPO (reference-free, length-normalized) as TRL's CPO trainer computes ``loss_type="simpo"``, per pair:
    ``-log σ(β (p̄_c − p̄_r) − γ)`` on the completions' average log-probs p̄, with the margin
    ``γ = beta * gamma_beta_ratio`` (TRL's ``simpo_gamma``), plus ``nll_weight`` times the chosen completion's NLL
    (TRL's ``cpo_alpha``: CPO-SimPO). ``nll_weight`` 0 is SimPO as its paper and TRL's documentation configure it
    (``cpo_alpha=0``; CPOConfig's own default of 1 adds CPO's NLL). As with :class:`ORPO`, the NLL is each pair's
    mean over its chosen completion tokens (TRL's, for a batch of one pair).

    ``chunk_size``: as :class:`jaxft.train.objectives.CausalLM`.
    """

    beta: float = 2.0
    gamma_beta_ratio: float = 0.5
    nll_weight: float = 0.0
    chunk_size: int = 1024
    batch_keys: ClassVar[tuple[str, ...]] = _INPUT_KEYS + ("labels",)
    step_metric_keys: ClassVar[tuple[str, ...]] = _PREFERENCE_STEP_KEYS

    def __post_init__(self):
        _check_positive("SimPO", beta=self.beta)
        if not (self.gamma_beta_ratio >= 0 and self.nll_weight >= 0):
            raise ConfigError(f"SimPO: gamma_beta_ratio and nll_weight must be >= 0, got {self.gamma_beta_ratio!r} "
                              f"and {self.nll_weight!r}")

    def units(self, batches: dict) -> jax.Array:
        return pair_count(batches["segment_ids"])

    def _terms(self, cfg, params, batch, rng=None, activation_sharding=None) -> tuple[jax.Array, dict]:
        stats = _completion_stats(cfg, params, batch, batch["labels"], self.chunk_size, rng, activation_sharding)
        gamma = self.beta * self.gamma_beta_ratio
        per_pair = -jax.nn.log_sigmoid(self.beta * (stats["chosen"] - stats["rejected"]) - gamma)
        return per_pair + self.nll_weight * stats["nll"], stats

    def loss_and_sums(self, cfg: ModelConfig, params: dict, batch: dict, rng=None, activation_sharding=None
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
        sums = _preference_sums(*self._terms(cfg, params, batch, rng, activation_sharding), self.beta)
        return sums.pop("loss_sum"), sums

    def loss_sum(self, cfg: ModelConfig, params: dict, batch: dict, rng=None, activation_sharding=None
                 ) -> jax.Array:
        return self.loss_and_sums(cfg, params, batch, rng, activation_sharding)[0]

    def step_metrics(self, sums: dict) -> dict[str, jax.Array]:
        return _preference_step_metrics(sums)

    def eval_sums(self, cfg: ModelConfig, params: dict, batch: dict) -> dict[str, jax.Array]:
        return _preference_sums(*self._terms(cfg, params, batch), self.beta)

    def eval_metrics(self, sums: dict) -> dict[str, float]:
        """TRL's CPO metrics: loss, rewards/{chosen, rejected, accuracies, margins} (β · average log-prob),
        logps/{chosen, rejected}, nll_loss (the chosen completions' NLL, reported whatever nll_weight), each a
        mean over pairs."""
        return _preference_metrics(sums)
