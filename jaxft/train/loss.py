"""Token-level cross-entropy as (sum, count) pairs, and a chunked version that never holds [tokens, vocab] logits.

Both return the *sum* of per-token losses and the *number* of target tokens, in float32, never a mean: a step that
accumulates micro-batches adds sums and counts and divides once, so every target token of the whole batch weighs
the same however the targets fall across micro-batches (a mean of per-micro-batch means would not).

Labels are already shifted by the data pipeline: ``labels[b, t]`` is the target of the logit at position t, and
``IGNORE_INDEX`` (-100, as in PyTorch and Hugging Face) marks positions without a target.

``z_loss`` adds PaLM's auxiliary ``z_loss * logsumexp(logits)**2`` per target token, which keeps the softmax
normalizer near 1 and the logits from drifting in low precision; 0 (the default) turns it off. It is a static
Python float, like a config value.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def cross_entropy(logits, labels, *, z_loss: float = 0.0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """logits [..., V], labels [...] -> (sum of token losses, number of targets), both float32 scalars.

    The reference: it takes materialized logits. Training on a large vocabulary wants
    :func:`chunked_cross_entropy`, which computes the same numbers from the hidden states.
    """
    return _token_loss_sum(logits.astype(jnp.float32), labels, z_loss)


def chunked_cross_entropy(hidden, lm_head_kernel, labels, *, chunk_size: int,
                          z_loss: float = 0.0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """hidden [B, T, D], lm_head_kernel [D, V], labels [B, T] -> (sum of token losses, number of targets), f32.

    Scans over chunks of ``chunk_size`` tokens; each chunk's logits [chunk, V] are computed in float32, reduced to
    a log-sum-exp and a label logit, and dropped. The scan body is ``jax.checkpoint``-ed, so the backward pass
    recomputes one chunk's logits at a time instead of keeping all of them: memory is O(chunk_size * V), not
    O(B * T * V), at the price of one extra [chunk, D] x [D, V] matmul per chunk. B * T need not divide
    ``chunk_size``: the tail chunk is padded with ignored labels.
    """
    d = hidden.shape[-1]
    tokens = hidden.reshape(-1, d)                                   # [N, D]
    targets = labels.reshape(-1)                                     # [N]
    pad = -tokens.shape[0] % chunk_size
    tokens = jnp.pad(tokens, ((0, pad), (0, 0)))
    targets = jnp.pad(targets, (0, pad), constant_values=IGNORE_INDEX)
    token_chunks = tokens.reshape(-1, chunk_size, d)                 # [N / chunk, chunk, D]
    target_chunks = targets.reshape(-1, chunk_size)                  # [N / chunk, chunk]
    kernel = lm_head_kernel.astype(hidden.dtype)                     # the compute dtype, as in the model's head

    @jax.checkpoint
    def chunk_loss(totals, chunk):
        chunk_tokens, chunk_targets = chunk
        logits = jnp.einsum("cd,dv->cv", chunk_tokens, kernel, preferred_element_type=jnp.float32)
        loss_sum, n_targets = _token_loss_sum(logits, chunk_targets, z_loss)
        return (totals[0] + loss_sum, totals[1] + n_targets), None

    zero = jnp.zeros((), jnp.float32)
    totals, _ = jax.lax.scan(chunk_loss, (zero, zero), (token_chunks, target_chunks))
    return totals


def _token_loss_sum(logits, labels, z_loss: float):
    """f32 logits [..., V], labels [...] -> (sum over targets of CE (+ z-loss), number of targets)."""
    is_target = labels != IGNORE_INDEX
    safe_labels = jnp.where(is_target, labels, 0)
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)
    label_logit = jnp.take_along_axis(logits, safe_labels[..., None], axis=-1)[..., 0]
    token_loss = log_normalizer - label_logit
    if z_loss:
        token_loss = token_loss + z_loss * jnp.square(log_normalizer)
    loss_sum = jnp.sum(jnp.where(is_target, token_loss, 0.0))
    return loss_sum, jnp.sum(is_target, dtype=jnp.float32)
