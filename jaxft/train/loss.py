"""Token-level cross-entropy as (sum, count) pairs, and a chunked version that never holds [tokens, vocab] logits.

Both return the *sum* of per-token losses and the *number* of target tokens, in float32, never a mean: a step that
accumulates micro-batches adds sums and counts and divides once, so every target token of the whole batch weighs
the same however the targets fall across micro-batches (a mean of per-micro-batch means would not).

Labels are already shifted by the data pipeline: ``labels[b, t]`` is the target of the logit at position t, and
``IGNORE_INDEX`` (-100, as in PyTorch and Hugging Face) marks positions without a target.

``z_loss`` adds PaLM's auxiliary ``z_loss * logsumexp(logits)**2`` per target token, which keeps the softmax
normalizer near 1 and the logits from drifting in low precision; 0 (the default) turns it off. It is a static
Python float, like a config value. :func:`cross_entropy_terms` and :func:`chunked_cross_entropy_terms` give the
cross-entropy and the summed ``logsumexp**2`` apart, so a train log can report the cross-entropy (and the perplexity
of it) beside the loss that includes the z-loss.

:func:`token_logprobs` gives the per-token log-probabilities of the labels from the same chunked pass (what
preference, policy-gradient and distillation objectives score sequences with).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jaxft.data.chat import IGNORE_INDEX


def cross_entropy(logits, labels, *, z_loss: float = 0.0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """logits [..., V], labels [...] -> (sum of token losses, number of targets), both float32 scalars.

    The reference: it takes materialized logits. Training on a large vocabulary wants
    :func:`chunked_cross_entropy`, which computes the same numbers from the hidden states.
    """
    return with_z_loss(cross_entropy_terms(logits, labels), z_loss)


def cross_entropy_terms(logits, labels) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """logits [..., V], labels [...] -> (sum of token cross-entropies, sum of token ``logsumexp(logits)**2``, number
    of targets), float32 scalars over the targets: the loss with z-loss is ``ce + z_loss * squared``."""
    logits = logits.astype(jnp.float32)
    is_target = labels != IGNORE_INDEX
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)
    label_logit = jnp.take_along_axis(logits, jnp.where(is_target, labels, 0)[..., None], axis=-1)[..., 0]
    return _term_sums(log_normalizer, label_logit, is_target)


def with_z_loss(terms: tuple, z_loss: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(loss sum, number of targets) of ``(ce, squared, count)`` terms: the cross-entropy plus ``z_loss`` times the
    squared log-normalizers (no term at all when ``z_loss`` is 0)."""
    ce_sum, squared_sum, count = terms
    return (ce_sum + z_loss * squared_sum if z_loss else ce_sum), count


VOCAB_BLOCK = 8192


def chunked_cross_entropy(hidden, lm_head_kernel, labels, *, chunk_size: int, vocab_block: int = VOCAB_BLOCK,
                          z_loss: float = 0.0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """hidden [B, T, D], lm_head_kernel [D, V], labels [B, T] -> (sum of token losses, number of targets), f32.

    Never holds more than one [chunk_size, vocab_block] block of float32 logits (see :func:`_token_statistics`), so
    memory does not grow with the number of tokens or with the vocabulary.
    """
    terms = chunked_cross_entropy_terms(hidden, lm_head_kernel, labels, chunk_size=chunk_size,
                                        vocab_block=vocab_block)
    return with_z_loss(terms, float(z_loss))


def chunked_cross_entropy_terms(hidden, lm_head_kernel, labels, *, chunk_size: int, vocab_block: int = VOCAB_BLOCK
                                ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """:func:`cross_entropy_terms` of ``hidden @ lm_head_kernel`` from the chunked pass of
    :func:`chunked_cross_entropy`."""
    log_normalizer, label_logit = _token_statistics(hidden, lm_head_kernel, labels, chunk_size=chunk_size,
                                                    vocab_block=vocab_block)
    return _term_sums(log_normalizer, label_logit, labels != IGNORE_INDEX)


def token_logprobs(hidden, lm_head_kernel, labels, *, chunk_size: int, vocab_block: int = VOCAB_BLOCK
                   ) -> jnp.ndarray:
    """hidden [B, T, D], lm_head_kernel [D, V], labels [B, T] -> log p(label) [B, T] in float32, 0 where the label
    is ``IGNORE_INDEX``: what DPO, PPO/GRPO and distillation score sequences with. Differentiable, from the same
    chunked pass as :func:`chunked_cross_entropy` (one log-sum-exp per token)."""
    log_normalizer, label_logit = _token_statistics(hidden, lm_head_kernel, labels, chunk_size=chunk_size,
                                                    vocab_block=vocab_block)
    return jnp.where(labels != IGNORE_INDEX, label_logit - log_normalizer, 0.0)


def _token_statistics(hidden, lm_head_kernel, labels, *, chunk_size: int, vocab_block: int = VOCAB_BLOCK
                      ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(log-normalizer logsumexp(logits), label logit), each [B, T] float32, of logits = hidden @ lm_head_kernel,
    without materializing the logits; the label logit is 0 where the label is ``IGNORE_INDEX``.

    Tokens are scanned in chunks of ``chunk_size`` and, within a chunk, the vocabulary in blocks of ``vocab_block``
    columns with an online log-sum-exp (running max and rescaled sum). The backward pass is written by hand
    (:func:`_blocked_stats_bwd`): it recomputes each block's logits once from the saved per-token log-normalizer
    and turns them, with the two per-token cotangents, straight into the hidden and kernel gradients.
    B * T need not divide ``chunk_size`` (the tail chunk is padded with ignored labels), nor V ``vocab_block``
    (the last block is shifted left to end at V and its columns already seen are masked out).
    """
    d = hidden.shape[-1]
    tokens = hidden.reshape(-1, d)                                   # [N, D]
    targets = labels.reshape(-1)                                     # [N]
    n = tokens.shape[0]
    pad = -n % chunk_size
    tokens = jnp.pad(tokens, ((0, pad), (0, 0))).reshape(-1, chunk_size, d)                    # [C, chunk, D]
    targets = jnp.pad(targets, (0, pad), constant_values=IGNORE_INDEX).reshape(-1, chunk_size)  # [C, chunk]
    kernel = lm_head_kernel.astype(hidden.dtype)                     # the compute dtype, as in the model's head
    stats = _blocked_stats(tokens, kernel, targets, min(vocab_block, kernel.shape[1]))
    return tuple(x.reshape(-1)[:n].reshape(labels.shape) for x in stats)


def _vocab_blocks(vocab: int, block: int):
    """Static (start, first valid column offset) of each vocabulary block; the last one ends exactly at ``vocab``."""
    starts = [min(b, vocab - block) for b in range(0, vocab, block)]
    return jnp.asarray(starts, jnp.int32), jnp.asarray([b - s for b, s in zip(range(0, vocab, block), starts)],
                                                       jnp.int32)


def _block_logits(chunk_tokens, kernel, start, first_valid, block):
    """f32 logits [chunk, block] of columns start.. of the kernel, and a mask of the columns this block owns."""
    kernel_block = jax.lax.dynamic_slice_in_dim(kernel, start, block, axis=1)                 # [D, block]
    logits = jnp.einsum("cd,dv->cv", chunk_tokens, kernel_block, preferred_element_type=jnp.float32)
    owned = jnp.arange(block) >= first_valid
    return jnp.where(owned, logits, -jnp.inf), owned, kernel_block


def _chunk_stats(chunk_tokens, chunk_targets, kernel, block):
    """Per-token log-normalizer and label logit of one chunk, over the vocabulary blocks (online softmax)."""
    starts, first_valid = _vocab_blocks(kernel.shape[1], block)

    def vocab_step(carry, xs):
        running_max, running_sum, label_logit = carry
        start, first = xs
        logits, _, _ = _block_logits(chunk_tokens, kernel, start, first, block)
        new_max = jnp.maximum(running_max, jnp.max(logits, axis=-1))
        running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.sum(jnp.exp(logits - new_max[:, None]), -1)
        local = chunk_targets - start
        hit = (local >= first) & (local < block)
        picked = jnp.take_along_axis(logits, jnp.clip(local, 0, block - 1)[:, None], axis=-1)[:, 0]
        return (new_max, running_sum, jnp.where(hit, picked, label_logit)), None

    n = chunk_tokens.shape[0]
    init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
    (running_max, running_sum, label_logit), _ = jax.lax.scan(vocab_step, init, (starts, first_valid))
    return running_max + jnp.log(running_sum), label_logit


def _term_sums(log_normalizer, label_logit, is_target):
    """(summed cross-entropy, summed squared log-normalizer, target count) over the target tokens."""
    ce_sum = jnp.sum(jnp.where(is_target, log_normalizer - label_logit, 0.0))
    squared_sum = jnp.sum(jnp.where(is_target, jnp.square(log_normalizer), 0.0))
    return ce_sum, squared_sum, jnp.sum(is_target, dtype=jnp.float32)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked_stats(tokens, kernel, targets, block):
    return _blocked_stats_fwd(tokens, kernel, targets, block)[0]


def _blocked_stats_fwd(tokens, kernel, targets, block):
    def chunk_step(_, chunk):
        return None, _chunk_stats(*chunk, kernel, block)

    _, (log_normalizers, label_logits) = jax.lax.scan(chunk_step, None, (tokens, targets))
    return (log_normalizers, label_logits), (tokens, kernel, targets, log_normalizers)


def _blocked_stats_bwd(block, residuals, cotangents):
    """d / d logits = g_lse * softmax + g_label * onehot(label), per token; each block's logits are recomputed
    once and contracted into d hidden (per chunk) and d kernel (accumulated over chunks)."""
    tokens, kernel, targets, log_normalizers = residuals
    starts, first_valid = _vocab_blocks(kernel.shape[1], block)

    def chunk_step(d_kernel, chunk):
        chunk_tokens, chunk_targets, log_normalizer, softmax_weight, label_weight = chunk
        chunk_tokens_f32 = chunk_tokens.astype(jnp.float32)  # once per chunk, not per vocabulary block

        def vocab_step(carry, xs):
            d_tokens, d_kernel = carry
            start, first = xs
            logits, owned, kernel_block = _block_logits(chunk_tokens, kernel, start, first, block)
            probs = jnp.exp(logits - log_normalizer[:, None])                                # 0 where not owned
            is_label = (chunk_targets[:, None] - start == jnp.arange(block)) & owned
            d_logits = softmax_weight[:, None] * probs + jnp.where(is_label, label_weight[:, None], 0.0)
            d_tokens = d_tokens + jnp.einsum("cv,dv->cd", d_logits, kernel_block.astype(jnp.float32))
            d_block = jnp.einsum("cd,cv->dv", chunk_tokens_f32, d_logits)
            old = jax.lax.dynamic_slice_in_dim(d_kernel, start, block, axis=1)
            d_kernel = jax.lax.dynamic_update_slice_in_dim(d_kernel, old + d_block, start, axis=1)
            return (d_tokens, d_kernel), None

        d_tokens = jnp.zeros(chunk_tokens.shape, jnp.float32)
        (d_tokens, d_kernel), _ = jax.lax.scan(vocab_step, (d_tokens, d_kernel), (starts, first_valid))
        return d_kernel, d_tokens.astype(tokens.dtype)

    d_kernel = jnp.zeros(kernel.shape, jnp.float32)
    d_kernel, d_tokens = jax.lax.scan(chunk_step, d_kernel, (tokens, targets, log_normalizers, *cotangents))
    return d_tokens, d_kernel.astype(kernel.dtype), None


_blocked_stats.defvjp(_blocked_stats_fwd, _blocked_stats_bwd)

