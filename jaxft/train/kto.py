"""KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization") on unpaired examples,
as TRL's ``KTOTrainer`` computes it (its default ``loss_type="kto"``).

The batch layout: one document (segment) per example, prompt + completion, with ``labels`` on the completion's
tokens only (SFT's shifted convention) and ``kto_label`` at every token of it: 1 a desirable example, 2 an
undesirable one, 3 a KL-baseline document (a prompt with another example's completion, as TRL's KL dataset pairs
them), 0 padding. A KL-baseline document carries no loss of its own: it only estimates the KL term every example
of its micro-batch is compared against.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxft.config import ConfigError, ModelConfig
from jaxft.data.formats import DataError
from jaxft.train.loop import with_reference
from jaxft.models.heads import last_token_mask
from jaxft.train.sequences import ReferenceInputs, adapters_off_logprobs, label_logprobs, segment_totals

DESIRABLE, UNDESIRABLE, KL_BASELINE = 1, 2, 3  # kto_label values; 0 is padding


@dataclass(frozen=True)
class KTO(ReferenceInputs):
    """The KTO loss of TRL's ``KTOTrainer``, per example:
    desirable ``w_d * (1 - σ(β (r - z)))``, undesirable ``w_u * (1 - σ(β (z - r)))``, with r the example's
    policy-minus-reference log-ratio of its completion (log-probs summed over the completion's tokens) and z the KL
    baseline: the mean log-ratio of the micro-batch's KL-baseline documents, clamped at 0 and without gradient.
    The loss is the mean over the desirable and undesirable examples (units: their count; weights do not count).

    The KL baseline is a micro-batch reduction, as in TRL, where each forward pass (one device's batch, one
    gradient-accumulation micro-step) averages its own KL rows and then over the data-parallel devices. Here a
    micro-batch [B, T] spans every data-parallel device, so z is the mean over all of its KL-baseline documents
    (TRL's gathered mean of equal per-device counts) and each accumulated micro-batch has its own z, as each of
    TRL's micro-steps does. The data must therefore put an example's KL-baseline documents in its own micro-batch
    (TRL rotates completions within each ``per_device_train_batch_size`` batch). The accumulated loss is the sum
    over micro-batches divided by the whole batch's example count: TRL's mean of per-micro-step means whenever the
    micro-batches hold equally many examples (TRL's always do). A micro-batch without KL-baseline documents has
    z = 0 (TRL's ``calculate_KL=False``).

    The reference: the same weights with every adapter off (:func:`reference`), or ``ref_logps`` [B, T] already in
    the batch (``precomputed_reference``, :mod:`jaxft.train.reference`; only their sums per document count).
    ``chunk_size``: tokens per chunk of the log-prob pass (0: full logits).
    """

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    chunk_size: int = 1024
    precomputed_reference: bool = False  # the data carries ref_logps (jaxft.train.reference): no reference pass
    policy_keys: ClassVar[tuple[str, ...]] = ("input_ids", "labels", "segment_ids", "positions", "kto_label")
    step_metric_keys: ClassVar[tuple[str, ...]] = ("rewards/chosen", "rewards/rejected", "rewards/margins",
                                                   "logps/chosen", "logps/rejected", "kl")

    def __post_init__(self):
        if not self.beta > 0:
            raise ConfigError(f"KTO: beta must be > 0, got {self.beta}")
        for name in ("desirable_weight", "undesirable_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"KTO: {name} must be >= 0, got {getattr(self, name)}")

    def reference(self, cfg: ModelConfig, params: dict, batch: dict) -> dict[str, jax.Array]:
        return adapters_off_logprobs(cfg, params, batch, chunk_size=self.chunk_size)

    def units(self, batches: dict) -> jax.Array:
        """The desirable and undesirable examples: documents whose (last) token has kto_label 1 or 2."""
        t = batches["segment_ids"].shape[-1]
        last = last_token_mask(batches["segment_ids"].reshape(-1, t))
        labels = batches["kto_label"].reshape(-1, t)
        return jnp.sum(last & ((labels == DESIRABLE) | (labels == UNDESIRABLE)), dtype=jnp.int32).astype(jnp.float32)

    def loss_and_sums(self, cfg: ModelConfig, params: dict, batch: dict, rng=None, activation_sharding=None
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
        sums = self._sums(self._terms(cfg, params, batch, rng, activation_sharding))
        return sums.pop("loss_sum"), sums

    def loss_sum(self, cfg: ModelConfig, params: dict, batch: dict, rng=None, activation_sharding=None
                 ) -> jax.Array:
        return self.loss_and_sums(cfg, params, batch, rng, activation_sharding)[0]

    def step_metrics(self, sums: dict) -> dict[str, jax.Array]:
        """TRL's logged KTO metrics of a train step: rewards and log-probs, means over the step's examples of each
        kind (NaN for a kind the step lacks, where TRL logs nothing: a 0 would draw as a value in the curves), and
        kl, the mean of its micro-batches' KL baselines (TRL's mean over its micro-steps)."""
        def mean(key: str, count: str) -> jax.Array:
            return jnp.where(sums[count] > 0, sums[key] / jnp.maximum(sums[count], 1.0), jnp.nan)

        out = {"rewards/chosen": mean("rewards_chosen", "n_chosen"), "logps/chosen": mean("logps_chosen", "n_chosen"),
               "rewards/rejected": mean("rewards_rejected", "n_rejected"),
               "logps/rejected": mean("logps_rejected", "n_rejected"),
               "kl": sums["kl_sum"] / jnp.maximum(sums["n_batches"], 1.0)}
        return out | {"rewards/margins": out["rewards/chosen"] - out["rewards/rejected"]}

    def _terms(self, cfg: ModelConfig, params: dict, batch: dict, rng=None, activation_sharding=None) -> dict:
        """Per document [B, T] (indexed by segment id): the policy's completion log-prob, the log-ratio, the
        desirable / undesirable masks and the weighted loss (0 for other documents); and the scalar KL baseline."""
        logps = label_logprobs(cfg, params, batch, chunk_size=self.chunk_size, rng=rng,
                               activation_sharding=activation_sharding)
        segments = batch["segment_ids"]
        policy = segment_totals(logps, segments)
        logratio = policy - segment_totals(batch["ref_logps"], segments)
        # a document's kind: which kto_label its tokens carry (one per document; 0 sums only into padding's index)
        kinds = segment_totals(jax.nn.one_hot(batch["kto_label"], KL_BASELINE + 1, dtype=jnp.int32), segments) > 0
        desirable, undesirable, baseline = kinds[..., DESIRABLE], kinds[..., UNDESIRABLE], kinds[..., KL_BASELINE]
        n_baseline = jnp.sum(baseline, dtype=jnp.float32)
        mean_baseline = jnp.sum(jnp.where(baseline, logratio, 0.0)) / jnp.maximum(n_baseline, 1.0)
        kl = jnp.maximum(jax.lax.stop_gradient(mean_baseline), 0.0)
        losses = jnp.where(desirable, self.desirable_weight * (1 - jax.nn.sigmoid(self.beta * (logratio - kl))),
                           jnp.where(undesirable,
                                     self.undesirable_weight * (1 - jax.nn.sigmoid(self.beta * (kl - logratio))),
                                     0.0))
        return {"policy": policy, "logratio": logratio, "desirable": desirable, "undesirable": undesirable,
                "losses": losses, "kl": kl}

    def eval_sums(self, cfg: ModelConfig, params: dict, batch: dict) -> dict[str, jax.Array]:
        """Sums over one held-out batch (its own KL baseline, as a train micro-batch): losses, example counts,
        rewards (β · log-ratio) and completion log-probs of the desirable and undesirable examples, and the
        batch's KL baseline with a batch count (TRL logs the KL per batch and averages the batches)."""
        return self._sums(self._terms(cfg, params, with_reference(self, cfg, params, batch)))

    def _sums(self, terms: dict) -> dict[str, jax.Array]:
        """The additive sums of one micro-batch's :meth:`_terms`, in training and evaluation."""
        def total(values, mask):
            return jnp.sum(jnp.where(mask, values, 0.0))

        rewards = self.beta * terms["logratio"]
        chosen, rejected = terms["desirable"], terms["undesirable"]
        return {"loss_sum": jnp.sum(terms["losses"]),
                "n_chosen": jnp.sum(chosen, dtype=jnp.float32), "n_rejected": jnp.sum(rejected, dtype=jnp.float32),
                "rewards_chosen": total(rewards, chosen), "rewards_rejected": total(rewards, rejected),
                "logps_chosen": total(terms["policy"], chosen), "logps_rejected": total(terms["policy"], rejected),
                "kl_sum": terms["kl"], "n_batches": jnp.ones((), jnp.float32)}

    def eval_metrics(self, sums: dict) -> dict[str, float]:
        """TRL's names: loss (mean over examples), rewards/chosen, rewards/rejected, rewards/margins, logps/chosen,
        logps/rejected (means over the examples of each kind, present when there are some), kl (mean over
        batches), and the example count."""
        n_chosen, n_rejected = int(sums["n_chosen"]), int(sums["n_rejected"])
        if n_chosen + n_rejected == 0:
            raise DataError("evaluate", "no KTO examples", "the held-out batches hold no desirable or undesirable "
                            "example (kto_label 1 or 2)")
        out = {"loss": float(sums["loss_sum"]) / (n_chosen + n_rejected), "kl": float(sums["kl_sum"]) / float(
            sums["n_batches"]), "examples": n_chosen + n_rejected}
        for kind, count in (("chosen", n_chosen), ("rejected", n_rejected)):
            if count:
                out[f"rewards/{kind}"] = float(sums[f"rewards_{kind}"]) / count
                out[f"logps/{kind}"] = float(sums[f"logps_{kind}"]) / count
        if n_chosen and n_rejected:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out
