"""Grouped-query attention with a mask built from token indices, segment ids and an optional window.

One mask rule serves training, packed sequences and KV-cache decoding:
a query at slot ``qi`` (segment ``qs``) may see key slot ``ki`` (segment ``ks``) iff
``ki <= qi`` and ``qs == ks`` and ``qi - ki < window``. Segment id 0 marks padding; padding only sees padding,
so no softmax row is empty.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NO_WINDOW = jnp.iinfo(jnp.int32).max


def attention_mask(q_index, k_index, q_segment, k_segment, window) -> jnp.ndarray:
    """Boolean [B, Tq, Tk]. q_index/q_segment: [B, Tq]; k_index/k_segment: [B, Tk]; window: int32 scalar."""
    causal = k_index[:, None, :] <= q_index[:, :, None]
    same_segment = q_segment[:, :, None] == k_segment[:, None, :]
    in_window = (q_index[:, :, None] - k_index[:, None, :]) < window
    return causal & same_segment & in_window


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
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
    return out.reshape(b, tq, h, hd)
