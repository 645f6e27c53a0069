"""Rollouts as train batches: [prompt | completion] rows in the layout the RL objectives read.

A rollout (:class:`jaxft.models.sample.Rollout`) holds R = B · G completions [R, N] of B left-padded prompts
[B, P]. Each row of the batch is the prompt's P slots (left padding first) then the completion's N slots (padding
after its stop token), as TRL's GRPOTrainer concatenates ``prompt_ids`` and ``completion_ids``; padding anywhere in
the row is segment 0, which real tokens never attend to, and positions count real tokens only, so the model sees
the same sequence as an unpadded one. Labels follow SFT's shifted convention (``labels[t]`` is the token at t + 1
when that is a completion token, else IGNORE_INDEX), and every per-token float array is aligned with them:
``old_logps[t]`` is the rollout's log-prob of the token at t + 1.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft.data.chat import IGNORE_INDEX


def rollout_batch(prompt_ids: jax.Array, prompt_mask: jax.Array, tokens: jax.Array, mask: jax.Array,
                  logprobs: jax.Array, num_generations: int) -> dict[str, jax.Array]:
    """{input_ids, positions, segment_ids, labels, old_logps} [R, P + N] of a rollout's rows (module docstring).

    ``prompt_ids`` / ``prompt_mask`` [B, P]; ``tokens`` / ``mask`` / ``logprobs`` [R, N] with R = B ·
    ``num_generations``, prompt-major (row b · G + g is prompt b's g-th completion)."""
    ids = jnp.concatenate([jnp.repeat(prompt_ids, num_generations, axis=0), tokens], axis=1)
    completion = jnp.concatenate([jnp.zeros_like(jnp.repeat(prompt_mask, num_generations, axis=0)), mask], axis=1)
    real = jnp.concatenate([jnp.repeat(prompt_mask, num_generations, axis=0), mask], axis=1).astype(jnp.int32)
    labels = jnp.where(completion[:, 1:] > 0, ids[:, 1:], IGNORE_INDEX)
    labels = jnp.pad(labels, ((0, 0), (0, 1)), constant_values=IGNORE_INDEX).astype(jnp.int32)
    p = prompt_ids.shape[1]
    old = jnp.where(mask > 0, logprobs, 0.0).astype(jnp.float32)
    old_logps = jnp.pad(old, ((0, 0), (p - 1, 1)))
    return {"input_ids": ids.astype(jnp.int32), "positions": jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0),
            "segment_ids": real, "labels": labels, "old_logps": old_logps}


def token_values(per_row: jax.Array, labels: jax.Array) -> jax.Array:
    """[R, T] float32: each row's value (a sequence's advantage) at its labelled tokens, 0 elsewhere."""
    return jnp.where(labels != IGNORE_INDEX, per_row.astype(jnp.float32)[:, None], 0.0)
