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
* the value head's loss is the PPO paper's clipped one (:func:`clipped_value_losses`, :func:`value_loss`).

The policy's own loss is the clipped surrogate of :mod:`jaxft.train.grpo`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft.config import ConfigError
from jaxft.models.heads import last_token_mask
from jaxft.train.grpo import k3_kl

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


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array, *, vf_clip: float,
               vf_coef: float) -> jax.Array:
    """f32: ``vf_coef`` times the mean of :func:`clipped_value_losses` over the completion tokens of the batch (the
    value term TRL's PPOTrainer adds to the policy loss)."""
    on = mask.astype(bool)
    per_token = clipped_value_losses(values, old_values, returns, vf_clip=vf_clip)
    return vf_coef * jnp.sum(jnp.where(on, per_token, 0.0)) / jnp.maximum(jnp.sum(on, dtype=jnp.float32), 1.0)
