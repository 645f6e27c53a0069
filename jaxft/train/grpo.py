"""GRPO (Shao et al. 2024, DeepSeekMath) and its per-token policy losses, as TRL 1.16's ``GRPOTrainer`` computes
them: group-normalized advantages, the clipped importance-ratio surrogate and the k3 KL estimate to a reference.

An RL batch holds one [prompt | completion] document per row (packed rows work too: every per-sequence sum goes
through segment ids), in SFT's layout: ``input_ids``, ``positions``, ``segment_ids`` (0 = padding) and ``labels``,
the next-token targets on the completion's tokens (``IGNORE_INDEX`` elsewhere, also on every token of a completion
:func:`truncated_mask` dropped), and float [B, T] arrays aligned with the labels: ``old_logps`` (the log-probs of
the policy that sampled the rollout; unread when each batch trains one step, ``on_policy``), ``advantages`` (each
sequence's advantage at every one of its tokens) and, when the KL term needs a reference the step does not compute,
``ref_logps``.

The step divides the summed loss of the whole accumulated batch once by the objective's units, so each aggregation
is a sum over tokens and a count: ``grpo`` each sequence's mean over its tokens summed, per sequence; ``bnpo`` and
``dapo`` the tokens' sum per completion token of the batch; ``dr_grpo`` per (sequences · max_completion_length).
TRL normalizes ``bnpo`` per micro-batch; on one batch the two agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxft.config import ConfigError, ModelConfig
from jaxft.data.chat import IGNORE_INDEX
from jaxft.data.formats import DataError
from jaxft.models.heads import last_token_mask
from jaxft.train.loop import with_reference
from jaxft.train.objectives import FromSums
from jaxft.train.sequences import ReferenceInputs, adapters_off_logprobs, label_logprobs, segment_totals

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
STD_EPSILON = 1e-4  # TRL's: added to the standard deviation the advantages are divided by


def clipped_surrogate(logps, old_logps, advantages, epsilon_low: float, epsilon_high: float) -> jax.Array:
    """Per-token PPO loss ``-min(ratio · A, clip(ratio, 1 - ε_low, 1 + ε_high) · A)``, ratio = exp(logps -
    old_logps); every argument [B, T] (or broadcastable)."""
    ratio = jnp.exp(logps - old_logps)
    return -jnp.minimum(ratio * advantages, jnp.clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * advantages)


def k3_kl(logps, ref_logps) -> jax.Array:
    """Per-token KL(policy ‖ reference) estimate k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman's unbiased,
    non-negative estimator), [B, T]."""
    delta = ref_logps - logps
    return jnp.exp(delta) - delta - 1


def group_advantages(rewards, num_generations: int, scale_rewards: str = "group") -> jax.Array:
    """[R] advantages of rewards [R] (R = prompts · G, prompt-major): each reward minus its group's mean, divided by
    the group's (``group``) or the whole batch's (``batch``) standard deviation (Bessel-corrected, + 1e-4 as TRL),
    or not divided (``none``). A standard deviation over one reward is 0, as TRL takes it."""
    if scale_rewards not in SCALE_REWARDS:
        raise ConfigError(f"GRPO scale_rewards {scale_rewards!r}: expected one of {list(SCALE_REWARDS)}")
    rewards = jnp.asarray(rewards, jnp.float32)
    if num_generations < 1 or rewards.shape[0] % num_generations:
        raise ConfigError(f"GRPO num_generations {num_generations}: expected >= 1 and dividing the "
                          f"{rewards.shape[0]} rewards")
    groups = rewards.reshape(-1, num_generations)
    centered = (groups - jnp.mean(groups, axis=1, keepdims=True)).reshape(-1)
    if scale_rewards == "none":
        return centered
    if scale_rewards == "group":
        std = jnp.repeat(_sample_std(groups, axis=1), num_generations)
    else:
        std = _sample_std(rewards, axis=None)
    return centered / (std + STD_EPSILON)


def _sample_std(x, axis) -> jax.Array:
    """The Bessel-corrected standard deviation along ``axis``, 0 over a single value."""
    n = x.size if axis is None else x.shape[axis]
    return jnp.std(x, axis=axis, ddof=1) if n > 1 else jnp.zeros(() if axis is None else x.shape[:axis])


def truncated_mask(mask, stopped) -> jax.Array:
    """TRL's ``mask_truncated_completions``: the completion mask [R, N] with the rows that no stop token ended
    (``stopped`` [R] False: cut at max_new_tokens) zeroed, so a truncated completion carries no loss."""
    return jnp.where(jnp.asarray(stopped)[:, None], mask, 0).astype(jnp.asarray(mask).dtype)


@dataclass(frozen=True)
class GRPO(FromSums, ReferenceInputs):
    """TRL's ``GRPOTrainer`` loss (token-level importance sampling, its ``grpo``, ``bnpo``, ``dr_grpo`` and ``dapo``
    aggregations): per completion token the clipped surrogate (:func:`clipped_surrogate`, ``epsilon`` low and
    ``epsilon_high`` high, default ``epsilon``) plus ``beta`` · k3 KL to the reference (:func:`k3_kl`), with the
    log-probs of ``softmax(logits / temperature)``. ``use_bias_correction_kl`` (TRL 1.16's default) weighs the KL
    estimate by the importance ratio, which makes its gradient the unbiased reverse-KL gradient off-policy
    (DeepSeek-V3.2); the logged ``kl`` is the weighted one, as TRL's.

    The reference (only for β > 0; at β = 0, TRL's default, there is no reference pass): the same weights with every
    adapter off (:meth:`reference`), or ``ref_logps`` already in the batch (``precomputed_reference``).
    ``max_completion_length``: the rollout's, for ``dr_grpo``'s constant normalizer. ``chunk_size``: tokens per
    chunk of the log-prob pass (0: full logits).
    """

    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "dapo"
    max_completion_length: int | None = None
    temperature: float = 1.0
    use_bias_correction_kl: bool = True
    chunk_size: int = 1024
    precomputed_reference: bool = False  # the data carries ref_logps: no reference pass
    # each generation batch trains one step (TRL's num_iterations 1): the old policy is this step's own, its
    # log-probs the step's detached ones (ratio exactly 1, dropout and all); else the batch's old_logps
    on_policy: bool = False
    policy_keys: ClassVar[tuple[str, ...]] = ("input_ids", "labels", "segment_ids", "positions", "old_logps",
                                              "advantages")

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"GRPO loss_type {self.loss_type!r}: expected one of {list(LOSS_TYPES)}")
        if self.loss_type == "dr_grpo" and not (self.max_completion_length or 0) > 0:
            raise ConfigError(f"GRPO loss_type dr_grpo: max_completion_length must be > 0 (its normalizer), got "
                              f"{self.max_completion_length!r}")
        if not self.beta >= 0:
            raise ConfigError(f"GRPO beta {self.beta}: expected >= 0")
        if self.precomputed_reference and not self.beta:
            raise ConfigError("GRPO precomputed_reference needs beta > 0: at beta 0 no reference is read")
        if not 0 <= self.epsilon < 1 or not self.epsilon_high_value >= 0:
            raise ConfigError(f"GRPO epsilon {self.epsilon} and epsilon_high {self.epsilon_high}: expected "
                              "0 <= epsilon < 1 and epsilon_high >= 0")
        if not self.temperature > 0:
            raise ConfigError(f"GRPO temperature {self.temperature}: expected > 0")

    @property
    def epsilon_high_value(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def float_keys(self) -> dict[str, tuple[int, ...]]:
        return {"old_logps": (), "advantages": (), **super().float_keys}

    @property
    def step_metric_keys(self) -> tuple[str, ...]:
        """TRL's names of what the loss's forward pass logs (``kl`` only with a KL term, as TRL)."""
        return ("kl",) * bool(self.beta) + ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                                            "completions/mean_loss_length")

    def reference(self, cfg: ModelConfig, params: dict, batch: dict) -> dict[str, jax.Array]:
        """The adapters-off policy's log-probs (at the loss's temperature), or nothing at β = 0."""
        if not self.beta:
            return {}
        return adapters_off_logprobs(cfg, params, batch, chunk_size=self.chunk_size, temperature=self.temperature)

    def _normalizer(self, sequences: jax.Array, tokens: jax.Array) -> jax.Array:
        """What the summed loss is divided by, from the sequence and completion-token counts of the whole batch."""
        if self.loss_type == "grpo":
            return sequences
        if self.loss_type == "dr_grpo":
            return sequences * self.max_completion_length
        return tokens

    def units(self, batches: dict) -> jax.Array:
        t = batches["segment_ids"].shape[-1]
        return self._normalizer(_sequence_count(batches["segment_ids"].reshape(-1, t)),
                                jnp.sum(batches["labels"] != IGNORE_INDEX, dtype=jnp.float32))

    def _sums(self, cfg: ModelConfig, params: dict, batch: dict, rng=None, activation_sharding=None
              ) -> dict[str, jax.Array]:
        """The loss sum of one micro-batch and its additive statistics (TRL's metrics' numerators and counts)."""
        logps = label_logprobs(cfg, params, batch, chunk_size=self.chunk_size, rng=rng,
                               activation_sharding=activation_sharding, temperature=self.temperature)
        counted = batch["labels"] != IGNORE_INDEX
        advantages, segment_ids = batch["advantages"], batch["segment_ids"]
        old_logps = jax.lax.stop_gradient(logps) if self.on_policy else batch["old_logps"]
        per_token = clipped_surrogate(logps, old_logps, advantages, self.epsilon, self.epsilon_high_value)
        ratio = jnp.exp(logps - old_logps)
        low = (ratio < 1 - self.epsilon) & (advantages < 0)
        high = (ratio > 1 + self.epsilon_high_value) & (advantages > 0)

        def total(x):
            return jnp.sum(jnp.where(counted, x, 0.0), dtype=jnp.float32)

        sums = {"tokens": jnp.sum(counted, dtype=jnp.float32), "sequences": _sequence_count(segment_ids),
                "low_clipped": total(low), "high_clipped": total(high), "region_clipped": total(low | high)}
        if self.beta:
            kl = k3_kl(logps, batch["ref_logps"]) * (ratio if self.use_bias_correction_kl else 1.0)
            per_token = per_token + self.beta * kl
            sums["kl_sum"] = total(kl)
        if self.loss_type == "grpo":  # each sequence's mean over its own tokens
            lengths = segment_totals(counted.astype(jnp.float32), segment_ids)
            sums["loss_sum"] = jnp.sum(segment_totals(jnp.where(counted, per_token, 0.0), segment_ids)[:, 1:]
                                       / jnp.maximum(lengths[:, 1:], 1.0))
        else:
            sums["loss_sum"] = total(per_token)
        return sums

    def step_metrics(self, sums: dict) -> dict[str, jax.Array]:
        """TRL's metrics of the loss's forward pass: kl and the clip ratios are means over completion tokens,
        completions/mean_loss_length the completion tokens the loss sees per sequence (a masked truncated
        completion counts 0; the rollout's completions/mean_length is TRL's, of every generated token)."""
        tokens = jnp.maximum(sums["tokens"], 1.0)
        out = {"clip_ratio/low_mean": sums["low_clipped"] / tokens,
               "clip_ratio/high_mean": sums["high_clipped"] / tokens,
               "clip_ratio/region_mean": sums["region_clipped"] / tokens,
               "completions/mean_loss_length": sums["tokens"] / jnp.maximum(sums["sequences"], 1.0)}
        return out | ({"kl": sums["kl_sum"] / tokens} if self.beta else {})

    def eval_sums(self, cfg: ModelConfig, params: dict, batch: dict) -> dict[str, jax.Array]:
        """The loss sum and the metrics' sums of one held-out RL batch (its reference computed as in training)."""
        return self._sums(cfg, params, with_reference(self, cfg, params, batch))

    def eval_metrics(self, sums: dict) -> dict[str, float]:
        """loss (the aggregation's over all held-out batches), the step metrics, and the sequence and token
        counts."""
        if int(sums["sequences"]) == 0:
            raise DataError("evaluate", "no sequences", "the held-out RL batches hold no [prompt | completion] row")
        loss = float(sums["loss_sum"]) / max(float(self._normalizer(sums["sequences"], sums["tokens"])), 1.0)
        return {"loss": loss, **{k: float(v) for k, v in self.step_metrics(sums).items()},
                "sequences": int(sums["sequences"]), "tokens": int(sums["tokens"])}


def _sequence_count(segment_ids: jax.Array) -> jax.Array:
    """f32: the documents of ``segment_ids`` [B, T] (a completion masked out still counts, as in TRL's mean)."""
    return jnp.sum(last_token_mask(segment_ids), dtype=jnp.float32)
