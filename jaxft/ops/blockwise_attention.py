"""Blockwise (online-softmax, flash-style) attention: the mask rule of :mod:`jaxft.ops.attention` in O(T) memory.

``blockwise_attention`` computes exactly what ``dot_product_attention(q, k, v, attention_mask(...))`` computes,
but takes the mask *inputs* (token indices, segment ids, window) and builds each [block_q, block_k] tile of the
mask on the fly, so no [Tq, Tk] array of scores, probabilities or mask ever exists, forward or backward.

Why a ``custom_vjp``: autodiff through the key-block scan would save every tile's probabilities for the backward
pass (O(Tq * Tk) again, the very thing this module removes); checkpointing the scan body would still keep one
[Tq, hd] accumulator per key block (O(T^2 / block_k)). The hand-written backward keeps only q, k, v, the output and
the per-row log-sum-exp (all O(T)) and recomputes each tile's probabilities from them (FlashAttention-2, Alg. 2),
trading one extra QK^T matmul per tile for linear memory.

Tiles that the mask hides entirely for every batch row (above the causal diagonal, outside the sliding window,
across packed documents) are skipped with ``lax.cond``, so causal attention does about half the matmul work. The
skip test reduces over the batch, so with the batch sharded it costs one scalar all-reduce per tile.

A query row that may see no key at all (impossible under the segment-0-padding convention, but reachable with
``window <= 0``) returns zeros and gets zero gradients; the plain version would average all values there.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft.ops.attention import MASKED, attention_mask

DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512
# Padded key slots get an index no real query reaches, so the causal rule alone hides them whatever the segments.
_PAD_INDEX = jnp.iinfo(jnp.int32).max


def blockwise_attention(q, k, v, q_index, k_index, q_segment, k_segment, window, *,
                        block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K,
                        q_position=None) -> jnp.ndarray:
    """q: [B, Tq, H, hd]; k, v: [B, Tk, KVH, hd]; index/segment: [B, Tq] and [B, Tk]; window: int32 scalar;
    ``q_position`` [B, Tq]: the queries' positions, given when some key slots are prefix slots (see
    :func:`jaxft.ops.attention.attention_mask`).

    Returns [B, Tq, H, hd] in q's dtype, equal to the plain attention under the same mask rule. Lengths need not
    divide the block sizes (the tail block is padded and masked); a block larger than its sequence shrinks to it.
    """
    b, tq, h, hd = q.shape
    tk, kvh = k.shape[1], k.shape[2]
    if h % kvh:
        raise ValueError(f"blockwise_attention: {h} query heads do not group evenly over {kvh} KV heads; "
                         "the query head count must be a multiple of the KV head count.")
    bq, bk = min(block_q, tq), min(block_k, tk)
    q_groups = q.reshape(b, tq, kvh, h // kvh, hd)
    q_blocks = _to_blocks(q_groups, bq, 0)              # [nq, B, bq, KVH, G, hd]
    k_blocks = _to_blocks(k, bk, 0)                     # [nk, B, bk, KVH, hd]
    v_blocks = _to_blocks(v, bk, 0)
    qi_blocks = _to_blocks(q_index.astype(jnp.int32), bq, 0)     # [nq, B, bq]
    qs_blocks = _to_blocks(q_segment.astype(jnp.int32), bq, 0)
    ki_blocks = _to_blocks(k_index.astype(jnp.int32), bk, _PAD_INDEX)  # [nk, B, bk]
    ks_blocks = _to_blocks(k_segment.astype(jnp.int32), bk, 0)
    qp_blocks = None if q_position is None else _to_blocks(q_position.astype(jnp.int32), bq, 0)
    out_blocks = _flash(q_blocks, k_blocks, v_blocks, qi_blocks, ki_blocks, qs_blocks, ks_blocks,
                        jnp.asarray(window, jnp.int32), qp_blocks)
    out = jnp.moveaxis(out_blocks, 0, 1).reshape(b, -1, h, hd)
    return out[:, :tq]


def platform_attention(q, k, v, q_index, k_index, q_segment, k_segment, window, *, q_position=None
                       ) -> jnp.ndarray:
    """Same contract as :func:`blockwise_attention`; picks the fastest correct kernel for the running backend.

    GPU with bf16/fp16 and a head dim cuDNN accepts: cuDNN's fused attention. Our mask (traced per-layer window,
    packed segments, arbitrary token indices) reaches cuDNN only as a materialized [B, 1, Tq, Tk] boolean mask:
    the kernel is fused and holds no per-head scores, but that mask is still quadratic in T, so prefer
    ``blockwise_attention`` for very long sequences. This branch was written without a GPU to run it on.
    Everywhere else (CPU; TPU, where splash attention's masks are static numpy objects that cannot carry a traced
    per-layer window or arbitrary indices): ``blockwise_attention``.
    """
    head_dim = q.shape[-1]
    if (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and head_dim % 8 == 0 and head_dim <= 128):
        return fused_attention(q, k, v, q_index, k_index, q_segment, k_segment, window, implementation="cudnn",
                               q_position=q_position)
    return blockwise_attention(q, k, v, q_index, k_index, q_segment, k_segment, window, q_position=q_position)


def fused_attention(q, k, v, q_index, k_index, q_segment, k_segment, window, implementation=None, *,
                    q_position=None):
    """Our mask handed to ``jax.nn.dot_product_attention`` (cuDNN on GPU; ``None`` lets jax pick, XLA on CPU, which
    is how the tests check this wiring — layouts, grouped KV heads, mask broadcast — without a GPU)."""
    mask = attention_mask(q_index, k_index, q_segment, k_segment, window, q_position)
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=implementation)


def _to_blocks(x, block: int, pad_value):
    """[B, T, ...] -> [ceil(T / block), B, block, ...], padding the tail of T with ``pad_value``."""
    t = x.shape[1]
    pad = -t % block
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=pad_value)
    x = x.reshape(x.shape[0], -1, block, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _tile_mask(qi, ki, qs, ks, window, qp):
    """[B, bq, 1, 1, bk]: the mask of one tile, broadcastable over the (KVH, G) head axes of the scores."""
    return attention_mask(qi, ki, qs, ks, window, qp)[:, :, None, None, :]


def _scores(q_blk, k_blk):
    """q_blk [B, bq, KVH, G, hd], k_blk [B, bk, KVH, hd] -> scaled f32 scores [B, bq, KVH, G, bk]."""
    scores = jnp.einsum("bqkgd,bskd->bqkgs", q_blk, k_blk, preferred_element_type=jnp.float32)
    return scores * (q_blk.shape[-1] ** -0.5)


@jax.custom_vjp
def _flash(q_blocks, k_blocks, v_blocks, qi_blocks, ki_blocks, qs_blocks, ks_blocks, window, qp_blocks):
    """Blocked attention output [nq, B, bq, KVH, G, hd] (see :func:`blockwise_attention` for the blocked layouts;
    ``qp_blocks``, the queries' positions blocked as ``qi_blocks``, is None without prefix slots)."""
    return _flash_forward(q_blocks, k_blocks, v_blocks, qi_blocks, ki_blocks, qs_blocks, ks_blocks, window,
                          qp_blocks)[0]


def _flash_forward(q_blocks, k_blocks, v_blocks, qi_blocks, ki_blocks, qs_blocks, ks_blocks, window, qp_blocks):
    """Online softmax: per query block, one pass over key blocks keeping a running max, sum and weighted values."""

    def query_block(_, q_side):
        q_blk, qi, qs, qp = q_side
        row_shape = q_blk.shape[:-1]                     # [B, bq, KVH, G]

        def key_block(carry, k_side):
            k_blk, v_blk, ki, ks = k_side
            mask = _tile_mask(qi, ki, qs, ks, window, qp)

            def update(carry):
                row_max, row_sum, acc = carry
                scores = jnp.where(mask, _scores(q_blk, k_blk), MASKED)
                new_max = jnp.maximum(row_max, scores.max(axis=-1))
                probs = jnp.where(mask, jnp.exp(scores - new_max[..., None]), 0.0)
                rescale = jnp.exp(row_max - new_max)
                row_sum = row_sum * rescale + probs.sum(axis=-1)
                acc = acc * rescale[..., None] + jnp.einsum(
                    "bqkgs,bskd->bqkgd", probs.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32)
                return new_max, row_sum, acc

            return jax.lax.cond(mask.any(), update, lambda c: c, carry), None

        init = (jnp.full(row_shape, MASKED), jnp.zeros(row_shape, jnp.float32),
                jnp.zeros(q_blk.shape, jnp.float32))
        (row_max, row_sum, acc), _ = jax.lax.scan(key_block, init, (k_blocks, v_blocks, ki_blocks, ks_blocks))
        seen = row_sum > 0
        safe_sum = jnp.where(seen, row_sum, 1.0)
        out = (acc / safe_sum[..., None]).astype(q_blk.dtype)
        logsumexp = jnp.where(seen, row_max + jnp.log(safe_sum), 0.0)   # [B, bq, KVH, G]
        return None, (out, logsumexp)

    _, (out_blocks, lse_blocks) = jax.lax.scan(query_block, None, (q_blocks, qi_blocks, qs_blocks, qp_blocks))
    residuals = (q_blocks, k_blocks, v_blocks, qi_blocks, ki_blocks, qs_blocks, ks_blocks, window, qp_blocks,
                 out_blocks, lse_blocks)
    return out_blocks, residuals


def _flash_backward(residuals, d_out_blocks):
    """FlashAttention-2 backward: per key block, recompute each tile's probabilities from the saved log-sum-exp.

    dK and dV of one key block accumulate over query blocks in the inner carry; dQ contributions come out per query
    block and are summed across key blocks in the outer carry. Everything kept is O(T).
    """
    (q_blocks, k_blocks, v_blocks, qi_blocks, ki_blocks, qs_blocks, ks_blocks, window, qp_blocks, out_blocks,
     lse_blocks) = residuals
    # delta = rowsum(dO * O) = sum_s P * dP, the softmax-Jacobian term: [nq, B, bq, KVH, G]
    delta_blocks = jnp.einsum("nbqkgd,nbqkgd->nbqkg", d_out_blocks.astype(jnp.float32),
                              out_blocks.astype(jnp.float32))
    scale = q_blocks.shape[-1] ** -0.5

    def key_block(dq_acc, k_side):
        k_blk, v_blk, ki, ks = k_side

        def query_block(carry, q_side):
            q_blk, d_out, lse, delta, qi, qs, qp = q_side
            mask = _tile_mask(qi, ki, qs, ks, window, qp)

            def grads(carry):
                dk, dv = carry
                probs = jnp.where(mask, jnp.exp(_scores(q_blk, k_blk) - lse[..., None]), 0.0)
                dv = dv + jnp.einsum("bqkgs,bqkgd->bskd", probs.astype(d_out.dtype), d_out,
                                     preferred_element_type=jnp.float32)
                d_probs = jnp.einsum("bqkgd,bskd->bqkgs", d_out, v_blk, preferred_element_type=jnp.float32)
                d_scores = probs * (d_probs - delta[..., None]) * scale
                dq = jnp.einsum("bqkgs,bskd->bqkgd", d_scores.astype(k_blk.dtype), k_blk,
                                preferred_element_type=jnp.float32)
                dk = dk + jnp.einsum("bqkgs,bqkgd->bskd", d_scores.astype(q_blk.dtype), q_blk,
                                     preferred_element_type=jnp.float32)
                return (dk, dv), dq

            def skip(carry):
                return carry, jnp.zeros(q_blk.shape, jnp.float32)

            return jax.lax.cond(mask.any(), grads, skip, carry)

        zeros_kv = jnp.zeros(k_blk.shape, jnp.float32)
        (dk, dv), dq_blocks = jax.lax.scan(
            query_block, (zeros_kv, zeros_kv),
            (q_blocks, d_out_blocks, lse_blocks, delta_blocks, qi_blocks, qs_blocks, qp_blocks))
        return dq_acc + dq_blocks, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(q_blocks.shape, jnp.float32),
                                (k_blocks, v_blocks, ki_blocks, ks_blocks))
    return (dq.astype(q_blocks.dtype), dk.astype(k_blocks.dtype), dv.astype(v_blocks.dtype),
            None, None, None, None, None, None)


_flash.defvjp(_flash_forward, _flash_backward)
