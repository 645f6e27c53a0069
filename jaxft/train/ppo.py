"""PPO's reward, advantage and value math for RLHF, per token over [B, T] rows with a completion mask.

Every function takes float arrays [B, T] aligned with a mask [B, T] (1 on a row's completion tokens: one contiguous
run per row, right padded, rows of any completion length, none for a row with an empty completion) and is jittable;
the scalar settings (coefficients, γ, λ, the estimator) are Python values. As TRL's PPOTrainer (before 1.0, after
Ziegler et al. 2019 and Stiennon et al. 2020) builds them:

* the reward of a completion is a per-token KL penalty to the reference policy plus the reward model's score at the
  completion's last token (:func:`kl_penalty_rewards`), the score lowered first for a completion that did not stop
  (:func:`missing_eos_penalty`);
* advantages are GAE(γ, λ) over each row's completion, one episode per row, its last token terminal (:func:`gae`),
  then whitened over the batch (:func:`whiten`);
* the value head's loss is the PPO paper's clipped one (:func:`clipped_value_losses`).

The policy's own loss is the clipped surrogate of :mod:`jaxft.train.grpo`; :class:`PPO` trains both in one step.

The value model is a one-label score head read at every token, as TRL's (an ``AutoModelForSequenceClassification``
with one label): over the same base as the policy, with its own adapters or none (the head alone), its leaves nested
under ``params["value"]`` (:data:`jaxft.peft.tree.NESTED_MODELS`), so one copy of the base serves the policy, the
adapters-off reference and the value model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxft.config import ConfigError, HeadConfig, ModelConfig
from jaxft.data.chat import IGNORE_INDEX
from jaxft.data.formats import DataError
from jaxft.models.heads import last_token_mask, token_logits
from jaxft.peft.methods import without_methods
from jaxft.peft.tree import outer_model
from jaxft.train.grpo import clipped_surrogate, k3_kl
from jaxft.train.objectives import FromSums
from jaxft.train.sequences import adapters_off_logprobs, label_logprobs

KL_ESTIMATORS = ("k1", "k3")
WHITEN_EPS = 1e-8  # TRL's masked_whiten: (x - mean) * rsqrt(var + 1e-8)


def _check_unit_interval(**values: float):
    for name, value in values.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"PPO: {name} must be in [0, 1], got {value}")


def missing_eos_penalty(scores: jax.Array, stopped: jax.Array, penalty: float) -> jax.Array:
    """[B]: the reward-model ``scores`` with ``penalty`` subtracted from each completion that did not stop (cut at
    ``max_new_tokens``), as TRL's ``scores[~contain_eos_token] -= missing_eos_penalty``."""
    return jnp.where(stopped, scores, scores - penalty)


def kl_penalty_rewards(logps: jax.Array, ref_logps: jax.Array, scores: jax.Array, mask: jax.Array, *,
                       kl_coef: float, estimator: str = "k1") -> tuple[jax.Array, jax.Array]:
    """(rewards [B, T], kl [B, T]), 0 off the mask: the per-token reward ``-kl_coef · kl`` plus the row's score
    [B] at its last completion token (a row without completion tokens gets none). ``kl`` estimates
    KL(policy ‖ reference) from the sampled tokens' log-probs (Schulman's estimators): ``k1`` = logp − ref_logp
    (TRL's default), ``k3`` = exp(ref − logp) − (ref − logp) − 1 (non-negative, unbiased)."""
    if estimator not in KL_ESTIMATORS:
        raise ConfigError(f"PPO: kl estimator {estimator!r} is unknown; expected one of {KL_ESTIMATORS}")
    on = mask.astype(bool)
    logps, ref_logps = (jnp.where(on, x, 0.0).astype(jnp.float32) for x in (logps, ref_logps))
    kl = logps - ref_logps if estimator == "k1" else k3_kl(logps, ref_logps)
    last = last_token_mask(mask.astype(jnp.int32))
    rewards = jnp.where(on, -kl_coef * kl, 0.0) + jnp.where(last, scores.astype(jnp.float32)[:, None], 0.0)
    return rewards, kl


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float
        ) -> tuple[jax.Array, jax.Array]:
    """(advantages, returns) [B, T], 0 off the mask: generalized advantage estimation (Schulman et al. 2016) over
    each row's completion tokens, one episode per row whose last token is terminal (no bootstrap value after it):
    δ_t = r_t + γ V_{t+1} − V_t, A_t = δ_t + γ λ A_{t+1}, returns = A + V (stable-baselines3's
    ``RolloutBuffer.compute_returns_and_advantage``). One reverse scan over T."""
    _check_unit_interval(gamma=gamma, lam=lam)
    on = mask.astype(jnp.float32)
    rewards, values = rewards.astype(jnp.float32), values.astype(jnp.float32)

    def step(carry, column):
        next_advantage, next_value, next_on = carry
        reward, value, here = column
        delta = reward + gamma * next_value * next_on - value
        advantage = here * (delta + gamma * lam * next_on * next_advantage)
        return (advantage, value, here), advantage

    zeros = jnp.zeros(rewards.shape[:1], jnp.float32)
    columns = (rewards.T, values.T, on.T)  # [T, B]: scan over time, last token first
    _, advantages = jax.lax.scan(step, (zeros, zeros, zeros), columns, reverse=True)
    advantages = advantages.T
    return advantages, on * (advantages + values)


def whiten(values: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
    """[B, T], 0 off the mask: ``values`` normalized over every masked token of the batch, TRL's ``masked_whiten``:
    (x − mean) · rsqrt(var + 1e-8) with the unbiased variance (Bessel's n − 1; one token gives variance 0), the
    mean added back when not ``shift_mean``."""
    on = mask.astype(bool)
    values = values.astype(jnp.float32)
    count = jnp.sum(on, dtype=jnp.float32)
    mean = jnp.sum(jnp.where(on, values, 0.0)) / jnp.maximum(count, 1.0)
    variance = jnp.sum(jnp.where(on, jnp.square(values - mean), 0.0)) / jnp.maximum(count - 1.0, 1.0)
    whitened = (values - mean) * jax.lax.rsqrt(variance + WHITEN_EPS)
    return jnp.where(on, whitened if shift_mean else whitened + mean, 0.0)


def clipped_value_losses(values: jax.Array, old_values: jax.Array, returns: jax.Array, *, vf_clip: float
                         ) -> jax.Array:
    """[B, T]: the PPO value loss per token, 0.5 · max((V − R)², (clip(V, V_old − vf_clip, V_old + vf_clip) − R)²):
    the new values ``values`` may move at most ``vf_clip`` from the rollout's ``old_values`` before the loss stops
    rewarding the move (TRL's ``cliprange_value``)."""
    if not vf_clip > 0:
        raise ConfigError(f"PPO: vf_clip must be > 0, got {vf_clip}")
    values, returns = values.astype(jnp.float32), returns.astype(jnp.float32)
    clipped = jnp.clip(values, old_values - vf_clip, old_values + vf_clip)
    return 0.5 * jnp.maximum(jnp.square(values - returns), jnp.square(clipped - returns))


VALUE = "value"  # where a PPO run's params nest the value model's own leaves
VALUE_HEAD = HeadConfig("seq_cls", 1)  # TRL's value model: a one-label sequence classifier, read at every token


def _overlay(base: dict, own: dict) -> dict:
    """``base`` with ``own``'s leaves laid over it, dict by dict."""
    out = dict(base)
    for key, value in own.items():
        out[key] = _overlay(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def value_params(params: dict) -> dict:
    """The value model's params: the base of ``params`` (every policy method off) with the value model's own leaves
    (its methods' namespaces and its ``score`` head, ``params["value"]``) laid over it."""
    return _overlay(without_methods(outer_model(params)), params[VALUE])


def value_predictions(cfg: ModelConfig, params: dict, batch: dict, activation_sharding=None) -> jax.Array:
    """[B, T] float32, aligned with ``labels``: V(s_t), the value head at each position whose next token is a
    completion token (the state before that token is sampled, TRL's ``values[:, context_length - 1:-1]``), 0
    elsewhere."""
    values = token_logits(cfg.replace(head=VALUE_HEAD), value_params(params), batch["input_ids"],
                          batch.get("positions"), batch.get("segment_ids"),
                          activation_sharding=activation_sharding)[..., 0]
    return jnp.where(batch["labels"] != IGNORE_INDEX, values, 0.0)


@dataclass(frozen=True)
class PPO(FromSums):
    """PPO for RLHF (TRL's ``PPOTrainer`` before 1.0, its defaults): per completion token the clipped surrogate
    (``cliprange``) on whitened GAE advantages, plus ``vf_coef`` times the clipped value loss
    (``cliprange_value``) of the value model, both means over the batch's completion tokens.

    :meth:`targets` makes a rollout's advantages, returns and old values (under no gradient): the reward is the
    score at each completion's last token minus ``kl_coef`` times the per-token KL to the adapters-off reference
    (``kl_estimator`` k1 | k3), whitened first with ``whiten_rewards``; GAE(``gamma``, ``lam``) over each
    completion. Log-probs are of ``softmax(logits / temperature)``, the distribution the rollout sampled from;
    ``on_policy``: each batch trains one step, its old log-probs the step's own (detached). No dropout anywhere
    (TRL's PPOTrainer disables it in the policy, value and reference models): the step's forward passes are the
    ones the old log-probs and values came from, so the first step's ratio is 1 and its values the old ones."""

    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    temperature: float = 0.7
    chunk_size: int = 1024
    on_policy: bool = False
    batch_keys: ClassVar[tuple[str, ...]] = ("input_ids", "labels", "segment_ids", "positions", "old_logps",
                                             "advantages", "returns", "old_values")
    float_keys: ClassVar[dict[str, tuple[int, ...]]] = {k: () for k in ("old_logps", "advantages", "returns",
                                                                          "old_values")}
    step_metric_keys: ClassVar[tuple[str, ...]] = ("loss/policy_avg", "loss/value_avg", "policy/clipfrac_avg",
                                                   "val/clipfrac_avg", "policy/approxkl_avg", "val/vpred")
    target_metrics: ClassVar[tuple[str, ...]] = ("objective/kl", "objective/non_score_reward", "objective/scores",
                                                 "objective/rlhf_reward")  # what targets() reports, TRL's names

    def __post_init__(self):
        _check_unit_interval(gamma=self.gamma, lam=self.lam)
        if not 0 < self.cliprange < 1 or not self.cliprange_value > 0 or not self.vf_coef >= 0 or not self.kl_coef >= 0:
            raise ConfigError(f"PPO: expected 0 < cliprange < 1, cliprange_value > 0, vf_coef >= 0 and kl_coef >= 0, "
                              "got "
                              f"{self.cliprange}, {self.cliprange_value}, {self.vf_coef}, {self.kl_coef}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(f"PPO: kl_estimator {self.kl_estimator!r} is unknown; expected one of {KL_ESTIMATORS}")
        if not self.temperature > 0:
            raise ConfigError(f"PPO: temperature {self.temperature}: expected > 0")

    def units(self, batches: dict) -> jax.Array:
        return jnp.sum(batches["labels"] != IGNORE_INDEX, dtype=jnp.float32)

    def _sums(self, cfg: ModelConfig, params: dict, batch: dict, rng=None, activation_sharding=None
              ) -> dict[str, jax.Array]:
        """The loss sum of one micro-batch and TRL's metrics' numerators, per completion token (``rng`` unused: no
        dropout)."""
        logps = label_logprobs(cfg, outer_model(params), batch, chunk_size=self.chunk_size,
                               activation_sharding=activation_sharding, temperature=self.temperature)
        values = value_predictions(cfg, params, batch, activation_sharding=activation_sharding)
        counted = batch["labels"] != IGNORE_INDEX
        old_logps = jax.lax.stop_gradient(logps) if self.on_policy else batch["old_logps"]
        advantages, old_values, returns = batch["advantages"], batch["old_values"], batch["returns"]
        ratio = jnp.exp(logps - old_logps)
        clipped_ratio = jnp.clip(ratio, 1 - self.cliprange, 1 + self.cliprange)
        policy = clipped_surrogate(logps, old_logps, advantages, self.cliprange, self.cliprange)
        value = clipped_value_losses(values, old_values, returns, vf_clip=self.cliprange_value)
        clipped_values = jnp.clip(values, old_values - self.cliprange_value, old_values + self.cliprange_value)

        def total(x):
            return jnp.sum(jnp.where(counted, x, 0.0), dtype=jnp.float32)

        return {"loss_sum": total(policy + self.vf_coef * value), "tokens": jnp.sum(counted, dtype=jnp.float32),
                "policy_sum": total(policy), "value_sum": total(value),
                "policy_clipped": total(-advantages * clipped_ratio > -advantages * ratio),
                "value_clipped": total(jnp.square(clipped_values - returns) > jnp.square(values - returns)),
                "approxkl_sum": total(0.5 * jnp.square(logps - old_logps)), "vpred_sum": total(values)}

    def step_metrics(self, sums: dict) -> dict[str, jax.Array]:
        """TRL's PPO metrics of the update, means over the completion tokens (``loss/value_avg`` without
        ``vf_coef``, as TRL logs it)."""
        tokens = jnp.maximum(sums["tokens"], 1.0)
        return {"loss/policy_avg": sums["policy_sum"] / tokens, "loss/value_avg": sums["value_sum"] / tokens,
                "policy/clipfrac_avg": sums["policy_clipped"] / tokens,
                "val/clipfrac_avg": sums["value_clipped"] / tokens,
                "policy/approxkl_avg": sums["approxkl_sum"] / tokens, "val/vpred": sums["vpred_sum"] / tokens}

    def eval_sums(self, cfg: ModelConfig, params: dict, batch: dict) -> dict[str, jax.Array]:
        """The loss sum and the metrics' sums of one held-out batch of rollouts (with their targets)."""
        return self._sums(cfg, params, batch)

    def eval_metrics(self, sums: dict) -> dict[str, float]:
        if int(sums["tokens"]) == 0:
            raise DataError("evaluate", "no completion tokens", "the held-out RL batches hold no completion token")
        return {"loss": float(sums["loss_sum"]) / float(sums["tokens"]),
                **{k: float(v) for k, v in self.step_metrics(sums).items()}, "tokens": int(sums["tokens"])}

    def targets(self, cfg: ModelConfig, params: dict, batches: dict) -> tuple[dict, dict]:
        """({advantages, returns, old_values}, metrics) of a generation batch ``batches`` ([A, rows, T]
        micro-batches with ``old_logps`` and ``scores``, each row's score at its labelled tokens), under no
        gradient; whitening spans the whole batch. The metrics are TRL's ``objective/*``: per-completion sums of
        the KL and of the KL penalty, averaged over completions."""
        params = jax.lax.stop_gradient(params)
        values = jax.lax.map(lambda b: value_predictions(cfg, params, b), batches)
        logps = batches["old_logps"]
        ref_logps = jax.lax.map(lambda b: adapters_off_logprobs(
            cfg, outer_model(params), b, chunk_size=self.chunk_size, temperature=self.temperature)["ref_logps"],
            batches) if self.kl_coef else logps
        t = logps.shape[-1]
        mask = (batches["labels"] != IGNORE_INDEX).reshape(-1, t)
        scores = jnp.max(jnp.where(mask, batches["scores"].reshape(-1, t), -jnp.inf), axis=-1)
        scores = jnp.where(mask.any(axis=-1), scores, 0.0)
        rewards, kl = kl_penalty_rewards(logps.reshape(-1, t), ref_logps.reshape(-1, t), scores, mask,
                                         kl_coef=self.kl_coef, estimator=self.kl_estimator)
        if self.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, values.reshape(-1, t), mask, self.gamma, self.lam)
        shape = batches["labels"].shape
        out = {"advantages": whiten(advantages, mask).reshape(shape), "returns": returns.reshape(shape),
               "old_values": values}
        completions = jnp.maximum(jnp.sum(mask.any(axis=-1), dtype=jnp.float32), 1.0)
        kl_sum = jnp.sum(kl) / completions
        metrics = {"objective/kl": kl_sum, "objective/non_score_reward": -self.kl_coef * kl_sum,
                   "objective/scores": jnp.sum(scores) / completions,
                   "objective/rlhf_reward": jnp.sum(scores) / completions - self.kl_coef * kl_sum}
        return out, metrics
