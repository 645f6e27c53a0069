"""PPO's advantage and value math (jaxft.train.ppo) against independent oracles: stable-baselines3's
``RolloutBuffer.compute_returns_and_advantage`` for GAE and returns (each row's completion one episode of one
flattened buffer, its last token terminal), and float64 numpy written here from TRL's old PPOTrainer (masked_whiten,
the KL penalty rewards, the missing-EOS penalty) and the PPO paper's clipped value loss. Rows are right padded
[prompt | completion] with completions of different lengths, one of them empty; everything runs under jit."""
import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from stable_baselines3.common.buffers import RolloutBuffer

from jaxft.config import ConfigError
from jaxft.train import ppo

T = 12
SPANS = [(2, 7), (0, 12), (5, 1), (3, 0), (1, 10), (4, 4)]  # (prompt length, completion length) of each row


def _mask() -> np.ndarray:
    mask = np.zeros((len(SPANS), T), np.int32)
    for row, (start, length) in enumerate(SPANS):
        mask[row, start:start + length] = 1
    return mask


def _random(seed: int, scale: float = 1.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal((len(SPANS), T))).astype(np.float32)


def _sb3_gae(rewards: np.ndarray, values: np.ndarray, mask: np.ndarray, gamma: float, lam: float):
    """stable-baselines3's advantages and returns: every row's completion tokens, in order, as one episode of a
    single-env buffer (episode_start at its first token; the buffer's last step done)."""
    steps = [(row, t) for row in range(len(mask)) for t in np.flatnonzero(mask[row])]
    space = gymnasium.spaces.Box(-1.0, 1.0, (1,), np.float32)
    buffer = RolloutBuffer(len(steps), space, space, device="cpu", gae_lambda=lam, gamma=gamma, n_envs=1)
    for i, (row, t) in enumerate(steps):
        first = i == 0 or steps[i - 1][0] != row
        buffer.add(np.zeros((1, 1), np.float32), np.zeros((1, 1), np.float32), np.array([rewards[row, t]]),
                   np.array([first], np.float32), torch.tensor([values[row, t]]), torch.zeros(1))
    buffer.compute_returns_and_advantage(last_values=torch.zeros(1), dones=np.array([True]))
    advantages, returns = np.zeros(mask.shape), np.zeros(mask.shape)
    for i, (row, t) in enumerate(steps):
        advantages[row, t], returns[row, t] = buffer.advantages[i, 0], buffer.returns[i, 0]
    return advantages, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (0.9, 1.0), (0.8, 0.0)])
def test_gae_and_returns_match_stable_baselines3(gamma, lam):
    mask, rewards, values = _mask(), _random(0) * _mask(), _random(1)
    advantages, returns = jax.jit(ppo.gae, static_argnames=("gamma", "lam"))(
        jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma=gamma, lam=lam)
    expected_advantages, expected_returns = _sb3_gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(np.asarray(advantages), expected_advantages, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(returns), expected_returns, rtol=1e-6, atol=1e-6)
    assert not np.any(np.asarray(advantages)[mask == 0]) and not np.any(np.asarray(returns)[mask == 0])


def test_gae_ignores_values_and_rewards_off_the_mask():
    mask, rewards, values = _mask(), _random(0), _random(1)
    noise = np.where(mask == 1, 0.0, 100.0).astype(np.float32)
    clean = ppo.gae(jnp.asarray(rewards * mask), jnp.asarray(values), jnp.asarray(mask), gamma=0.99, lam=0.95)
    noisy = ppo.gae(jnp.asarray(rewards * mask + noise), jnp.asarray(values + noise), jnp.asarray(mask), gamma=0.99,
                    lam=0.95)
    for a, b in zip(clean, noisy):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _masked_whiten_float64(values: np.ndarray, mask: np.ndarray, shift_mean: bool) -> np.ndarray:
    """TRL's masked_whiten (trl/core.py before 1.0) in float64: unbiased (n − 1) variance, rsqrt(var + 1e-8)."""
    values, on = values.astype(np.float64), mask.astype(bool)
    mean = values[on].sum() / on.sum()
    variance = np.square(values[on] - mean).sum() / on.sum() * on.sum() / (on.sum() - 1)
    whitened = (values - mean) / np.sqrt(variance + 1e-8)
    return np.where(on, whitened if shift_mean else whitened + mean, 0.0)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_is_trls_masked_whiten_with_the_unbiased_variance(shift_mean):
    mask, values = _mask(), _random(2, scale=3.0) + 1.5
    whitened = jax.jit(ppo.whiten, static_argnums=2)(jnp.asarray(values), jnp.asarray(mask), shift_mean)
    np.testing.assert_allclose(np.asarray(whitened), _masked_whiten_float64(values, mask, shift_mean), rtol=1e-6,
                               atol=1e-6)
    if shift_mean:
        on = np.asarray(whitened)[mask == 1]
        np.testing.assert_allclose([on.mean(), on.std(ddof=1)], [0.0, 1.0], atol=1e-5)


def _kl_rewards_float64(logps, ref_logps, scores, mask, kl_coef, estimator):
    log_ratio = (ref_logps.astype(np.float64) - logps) * mask
    kl = -log_ratio if estimator == "k1" else np.exp(log_ratio) - 1 - log_ratio
    rewards = -kl_coef * kl * mask
    for row in range(len(mask)):
        if mask[row].any():
            rewards[row, np.flatnonzero(mask[row])[-1]] += scores[row]
    return rewards, kl


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_penalty_rewards_put_the_score_at_the_last_completion_token(estimator):
    mask = _mask()
    logps, ref_logps = -np.abs(_random(3)), -np.abs(_random(4))
    scores = np.random.default_rng(5).standard_normal(len(SPANS)).astype(np.float32)
    stopped = np.array([True, False, True, True, False, True])
    penalized = jax.jit(ppo.missing_eos_penalty)(jnp.asarray(scores), jnp.asarray(stopped), 1.5)
    np.testing.assert_allclose(np.asarray(penalized), np.where(stopped, scores, scores - 1.5), rtol=1e-6)
    rewards, kl = jax.jit(ppo.kl_penalty_rewards, static_argnames=("kl_coef", "estimator"))(
        jnp.asarray(logps), jnp.asarray(ref_logps), penalized, jnp.asarray(mask), kl_coef=0.05, estimator=estimator)
    expected_rewards, expected_kl = _kl_rewards_float64(logps, ref_logps, np.asarray(penalized, np.float64), mask,
                                                         0.05, estimator)
    np.testing.assert_allclose(np.asarray(rewards), expected_rewards, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(kl), expected_kl, rtol=1e-6, atol=1e-6)
    if estimator == "k3":
        assert np.all(np.asarray(kl) >= 0)


def _value_loss_float64(values, old_values, returns, mask, vf_clip, vf_coef) -> float:
    """The PPO paper's clipped value objective (TRL's PPOTrainer): 0.5 · max of the two squared errors, the mean over
    completion tokens, times vf_coef."""
    values, old_values, returns = (np.asarray(x, np.float64) for x in (values, old_values, returns))
    clipped = np.clip(values, old_values - vf_clip, old_values + vf_clip)
    per_token = 0.5 * np.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return vf_coef * per_token[mask == 1].mean()


def _masked_value_loss(values, old_values, returns, mask, vf_clip, vf_coef):
    """The value term of the PPO loss from :func:`ppo.clipped_value_losses`: the mean over completion tokens."""
    per_token = ppo.clipped_value_losses(values, old_values, returns, vf_clip=vf_clip)
    return vf_coef * jnp.sum(jnp.where(mask == 1, per_token, 0.0)) / jnp.sum(mask)


def test_clipped_value_loss_and_its_gradient_match_the_ppo_objective():
    mask, old_values, returns = _mask(), _random(6), _random(7)
    values = old_values + _random(8, scale=0.5)  # some move further than vf_clip, some less, both ways
    moved = np.abs(values - old_values)[mask == 1]
    assert (moved > 0.2).any() and (moved < 0.2).any()
    loss = jax.jit(_masked_value_loss, static_argnames=("vf_clip", "vf_coef"))
    args = jnp.asarray(values), jnp.asarray(old_values), jnp.asarray(returns), jnp.asarray(mask)
    expected = _value_loss_float64(values, old_values, returns, mask, 0.2, 0.1)
    np.testing.assert_allclose(float(loss(*args, vf_clip=0.2, vf_coef=0.1)), expected, rtol=1e-6)
    # the gradient: (V − R) where the unclipped error is the larger (or the value is inside the clip range), else 0
    grad = jax.grad(lambda v: _masked_value_loss(v, *args[1:], vf_clip=0.2, vf_coef=0.1))(args[0])
    v, o, r = (np.asarray(x, np.float64) for x in (values, old_values, returns))
    clipped = np.clip(v, o - 0.2, o + 0.2)
    unclipped_wins = ((v - r) ** 2 >= (clipped - r) ** 2) | (np.abs(v - o) < 0.2)
    expected_grad = np.where((mask == 1) & unclipped_wins, 0.1 * (v - r) / mask.sum(), 0.0)
    np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-5, atol=1e-7)


def test_bad_ppo_settings_are_refused():
    x, mask = jnp.zeros((1, 3)), jnp.ones((1, 3), jnp.int32)
    with pytest.raises(ConfigError, match="kl estimator 'k2'"):
        ppo.kl_penalty_rewards(x, x, jnp.zeros(1), mask, kl_coef=0.1, estimator="k2")
    with pytest.raises(ConfigError, match=r"lam must be in \[0, 1\], got 1.5"):
        ppo.gae(x, x, mask, gamma=1.0, lam=1.5)
    with pytest.raises(ConfigError, match="vf_clip must be > 0, got 0"):
        ppo.clipped_value_losses(x, x, x, vf_clip=0)
