"""Grouped-query attention with a mask built from token indices, segment ids and an optional window.

One mask rule serves training, packed sequences and KV-cache decoding:
a query at slot ``qi`` (segment ``qs``) may see key slot ``ki`` (segment ``ks``) iff
``ki <= qi`` and ``qs == ks`` and ``qi - ki < window``. Segment id 0 marks padding; padding only sees padding,
so no softmax row is empty.

Prefix keys (prefix tuning: extra keys/values in front of a layer's own) sit in slots of the reserved segment
``PREFIX_SEGMENT``; the P slots of a prefix are numbered -P..-1, the positions right before a sequence's first
token (position 0). A non-padding query at position ``qp`` in its own sequence (the number of tokens before it
there: each packed segment, and each generated row, counts from 0) sees prefix slot ``i`` iff ``qp - i < window``,
whatever its segment: ``ks == PREFIX_SEGMENT and qs != 0 and qp - ki < window``, or-ed with the rule above (which
hides prefix slots from every query, their segment being no token's). This is the mask transformers gives PEFT's
virtual tokens (prompt tuning: input positions 0..P-1, real tokens from P; prefix tuning: a past cache of P slots):
with a sliding window of W, the query at real position t sees virtual token j in 0..P-1 iff ``t + P - j < W``
(``kv_idx > q_idx - W`` in ``transformers.masking_utils.sliding_window_overlay``, with q_idx = P + t), so once a
sequence outgrows the window its windowed layers stop seeing the prefix; full-attention layers always see it. That
term is traced only when the caller gives the queries' positions (``q_position``; ``None`` is static: no key slot is
a prefix slot), so attention without a prefix runs the three-term rule alone. Padding queries see only padding.

``dot_product_attention`` is the plain reference (autodiff saves its float32 probabilities for the backward pass);
``lse_attention`` computes the same values with a hand-written backward pass that keeps only q, k, v, the output
and the per-row log-sum-exp, and recomputes the probabilities (one extra QK^T matmul). In the scan over layers the
saved probabilities were the largest residual (B * H * T^2 floats per layer): writing, zeroing and reading them
back cost more than the recomputation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NO_WINDOW = jnp.iinfo(jnp.int32).max
MASKED = jnp.finfo(jnp.float32).min
# Segment ids of tokens are >= 0 (0: padding), so negative ids are free to mark key slots that are not tokens.
PREFIX_SEGMENT = -1


def attention_mask(q_index, k_index, q_segment, k_segment, window, q_position=None) -> jnp.ndarray:
    """Boolean [B, Tq, Tk]. q_index/q_segment: [B, Tq]; k_index/k_segment: [B, Tk]; window: int32 scalar.
    ``q_position`` [B, Tq]: each query's position in its own sequence, given when some key slots are prefix slots
    (:func:`with_prefix_slots`); ``None`` traces the rule without the prefix term."""
    causal = k_index[:, None, :] <= q_index[:, :, None]
    same_segment = q_segment[:, :, None] == k_segment[:, None, :]
    in_window = (q_index[:, :, None] - k_index[:, None, :]) < window
    visible = causal & same_segment & in_window
    if q_position is not None:
        prefix_in_window = (q_position[:, :, None] - k_index[:, None, :]) < window
        visible = visible | ((k_segment[:, None, :] == PREFIX_SEGMENT) & (q_segment[:, :, None] != 0) &
                             prefix_in_window)
    return visible


def with_prefix_slots(k_index, k_segment, length: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``k_index`` / ``k_segment`` [B, Tk] with ``length`` prefix slots in front, numbered -length..-1: [B, length +
    Tk] each."""
    b = k_index.shape[0]
    prefix_index = jnp.broadcast_to(jnp.arange(-length, 0, dtype=k_index.dtype), (b, length))
    return (jnp.concatenate([prefix_index, k_index], axis=1),
            jnp.concatenate([jnp.full((b, length), PREFIX_SEGMENT, k_segment.dtype), k_segment], axis=1))


def dot_product_attention(q, k, v, mask) -> jnp.ndarray:
    """q: [B, Tq, H, hd]; k, v: [B, Tk, KVH, hd]; mask: [B, Tq, Tk] -> [B, Tq, H, hd].

    Scores and softmax are float32 whatever the compute dtype; query heads are grouped over KV heads
    without materializing repeated K/V.
    """
    b, tq, h, hd = q.shape
    kvh = k.shape[2]
    q_groups = q.reshape(b, tq, kvh, h // kvh, hd)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q_groups, k, preferred_element_type=jnp.float32)
    scores = scores * (hd ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
    return out.reshape(b, tq, h, hd)


def lse_attention(q, k, v, mask) -> jnp.ndarray:
    """Same contract and values as :func:`dot_product_attention`; the backward pass recomputes the probabilities.

    Works in a head-major layout ([B, KVH, G, T, hd]) so that every matmul, forward and backward, is a batched
    matmul over (B, KVH) with no transposed copy of a [Tq, Tk] array.
    """
    b, tq, h, hd = q.shape
    kvh = k.shape[2]
    q_heads = jnp.moveaxis(q.reshape(b, tq, kvh, h // kvh, hd), 1, 3)   # [B, KVH, G, Tq, hd]
    out = _attention_heads(q_heads, jnp.moveaxis(k, 1, 2), jnp.moveaxis(v, 1, 2), mask)
    return jnp.moveaxis(out, 3, 1).reshape(b, tq, h, hd)


def _scores(q_heads, k_heads, mask):
    """q [B, KVH, G, Tq, hd], k [B, KVH, Tk, hd], mask [B, Tq, Tk] -> masked, scaled f32 scores [B, KVH, G, Tq, Tk]."""
    scores = jnp.einsum("bkgqd,bksd->bkgqs", q_heads, k_heads, preferred_element_type=jnp.float32)
    return jnp.where(mask[:, None, None], scores * (q_heads.shape[-1] ** -0.5), MASKED)


@jax.custom_vjp
def _attention_heads(q_heads, k_heads, v_heads, mask):
    return _attention_heads_fwd(q_heads, k_heads, v_heads, mask)[0]


def _attention_heads_fwd(q_heads, k_heads, v_heads, mask):
    scores = _scores(q_heads, k_heads, mask)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    unnormalized = jnp.exp(scores - row_max)
    row_sum = jnp.sum(unnormalized, axis=-1, keepdims=True)
    probs = (unnormalized / row_sum).astype(v_heads.dtype)       # jax.nn.softmax's arithmetic, so values match
    out = jnp.einsum("bkgqs,bksd->bkgqd", probs, v_heads)
    logsumexp = row_max + jnp.log(row_sum)                       # [B, KVH, G, Tq, 1]
    return out, (q_heads, k_heads, v_heads, mask, out, logsumexp)


def _attention_heads_bwd(residuals, d_out):
    q_heads, k_heads, v_heads, mask, out, logsumexp = residuals
    probs = jnp.exp(_scores(q_heads, k_heads, mask) - logsumexp)  # masked slots: exp(-huge) = 0
    d_v = jnp.einsum("bkgqs,bkgqd->bksd", probs.astype(d_out.dtype), d_out, preferred_element_type=jnp.float32)
    d_probs = jnp.einsum("bkgqd,bksd->bkgqs", d_out, v_heads, preferred_element_type=jnp.float32)
    # softmax Jacobian: rowsum(P * dP) = rowsum(dO * O)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_scores = probs * (d_probs - delta) * (q_heads.shape[-1] ** -0.5)
    d_q = jnp.einsum("bkgqs,bksd->bkgqd", d_scores.astype(k_heads.dtype), k_heads, preferred_element_type=jnp.float32)
    d_k = jnp.einsum("bkgqs,bkgqd->bksd", d_scores.astype(q_heads.dtype), q_heads, preferred_element_type=jnp.float32)
    return d_q.astype(q_heads.dtype), d_k.astype(k_heads.dtype), d_v.astype(v_heads.dtype), None


_attention_heads.defvjp(_attention_heads_fwd, _attention_heads_bwd)
