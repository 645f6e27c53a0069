"""lse_attention (hand-written backward from the saved log-sum-exp) against the plain autodiff attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.ops.attention import NO_WINDOW, attention_mask, dot_product_attention, lse_attention

B, T, HD = 2, 24, 8
SEGMENTS = [[1] * 9 + [2] * 12 + [0] * 3, [0] * 5 + [3] * 19]          # packed documents, right and left padding
CASES = {  # name: (query heads, KV heads, Tq, window, segment ids)
    "causal": (4, 4, T, NO_WINDOW, None),
    "grouped_query_heads": (8, 2, T, NO_WINDOW, None),
    "multi_query_heads": (4, 1, T, NO_WINDOW, None),
    "packed_segments_with_padding": (4, 2, T, NO_WINDOW, SEGMENTS),
    "sliding_window": (4, 2, T, 5, None),
    "cached_queries_after_prefix": (4, 2, 6, NO_WINDOW, None),        # the last 6 slots query all T keys
}


def inputs(h, kvh, tq, window, segments, dtype=jnp.float32):
    rng = np.random.default_rng(0)
    q, d_out = (jnp.asarray(rng.normal(size=(B, tq, h, HD)), dtype) for _ in range(2))
    k, v = (jnp.asarray(rng.normal(size=(B, T, kvh, HD)), dtype) for _ in range(2))
    k_segment = jnp.asarray(segments if segments else np.ones((B, T)), jnp.int32)
    k_index = jnp.broadcast_to(jnp.arange(T), (B, T))
    mask = attention_mask(k_index[:, T - tq:], k_index, k_segment[:, T - tq:], k_segment, window)
    return (q, k, v), mask, d_out


def values_and_grads(attention, qkv, mask, d_out):
    out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, mask), *qkv)
    return out, vjp(d_out)


@pytest.mark.parametrize("case", CASES)
def test_lse_attention_matches_plain_values_and_gradients(case):
    qkv, mask, d_out = inputs(*CASES[case])
    out, grads = values_and_grads(lse_attention, qkv, mask, d_out)
    ref_out, ref_grads = values_and_grads(dot_product_attention, qkv, mask, d_out)
    np.testing.assert_allclose(out, ref_out, atol=2e-6, rtol=1e-5)
    for name, grad, ref in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(grad, ref, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


def test_lse_attention_bfloat16_close_to_plain_and_keeps_dtypes():
    qkv, mask, d_out = inputs(8, 2, T, NO_WINDOW, SEGMENTS, jnp.bfloat16)
    out, grads = values_and_grads(lse_attention, qkv, mask, d_out)
    ref_out, ref_grads = values_and_grads(dot_product_attention, qkv, mask, d_out)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    np.testing.assert_allclose(out.astype(jnp.float32), ref_out.astype(jnp.float32), atol=2e-2, rtol=2e-2)
    for grad, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(grad.astype(jnp.float32), ref.astype(jnp.float32), atol=6e-2, rtol=6e-2)


def test_lse_attention_under_vmap_matches_per_member_calls():
    (q, k, v), mask, d_out = inputs(4, 2, T, NO_WINDOW, SEGMENTS)
    stacked = [jnp.stack([x, 2 * x]) for x in (q, k, v)]

    def loss(q, k, v):
        return jnp.sum(lse_attention(q, k, v, mask) * d_out)

    grads = jax.vmap(jax.grad(loss, argnums=(0, 1, 2)))(*stacked)
    for member in range(2):
        ref = jax.grad(loss, argnums=(0, 1, 2))(*(x[member] for x in stacked))
        for grad, r in zip(grads, ref):
            np.testing.assert_allclose(grad[member], r, atol=1e-5, rtol=1e-5)
