"""Blockwise attention against the plain masked attention: values, gradients, and memory that is linear in T."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.ops.attention import NO_WINDOW, attention_mask, dot_product_attention
from jaxft.ops.blockwise_attention import blockwise_attention, fused_attention, platform_attention

@dataclasses.dataclass(frozen=True)
class Case:
    """Shapes, block sizes and mask inputs of one parity case; indices default to 0..T-1, segments to one."""
    b: int = 2
    tq: int = 64
    tk: int | None = None          # defaults to tq
    h: int = 2
    kvh: int = 2
    hd: int = 8
    block_q: int = 16
    block_k: int = 16
    window: int = NO_WINDOW
    q_index: object = None
    k_index: object = None
    q_segment: object = None
    k_segment: object = None       # defaults to q_segment

    def inputs(self, dtype=jnp.float32, seed=0):
        """q, k, v and an output cotangent d_out."""
        tk = self.tk or self.tq
        rng = np.random.default_rng(seed)
        shapes = [(self.b, self.tq, self.h, self.hd), (self.b, tk, self.kvh, self.hd),
                  (self.b, tk, self.kvh, self.hd), (self.b, self.tq, self.h, self.hd)]
        return tuple(jnp.asarray(rng.normal(size=shape), dtype) for shape in shapes)

    def mask_inputs(self):
        """q_index, k_index, q_segment, k_segment, window: the trailing arguments of both attentions."""
        tk = self.tk or self.tq
        arange = lambda t: np.broadcast_to(np.arange(t), (self.b, t))
        q_segment = np.ones((self.b, self.tq), np.int32) if self.q_segment is None else self.q_segment
        k_segment = q_segment if self.k_segment is None else self.k_segment
        q_index = arange(self.tq) if self.q_index is None else self.q_index
        k_index = arange(tk) if self.k_index is None else self.k_index
        return tuple(jnp.asarray(x, jnp.int32) for x in (q_index, k_index, q_segment, k_segment, self.window))

    def blockwise(self, *args):
        return blockwise_attention(*args, block_q=self.block_q, block_k=self.block_k)


CASES = {
    "causal": Case(),
    "packed_segments_with_padding": Case(q_segment=[[1] * 20 + [2] * 30 + [0] * 14,   # two documents, right pad
                                                    [0] * 10 + [3] * 54]),             # left padding
    "sliding_window": Case(window=9, block_k=8),
    "grouped_query_heads": Case(h=8, kvh=2),
    "multi_query_heads": Case(h=4, kvh=1),
    "length_not_divisible_by_block": Case(tq=50, block_q=16, block_k=12, window=20,
                                          q_segment=[[1] * 23 + [2] * 27, [1] * 45 + [0] * 5]),
    "cached_queries_after_prefix": Case(tq=6, tk=40, block_q=4, block_k=16,
                                        q_index=np.broadcast_to(np.arange(30, 36), (2, 6)),
                                        k_segment=[[1] * 36 + [0] * 4, [0] * 12 + [1] * 24 + [0] * 4]),
}


def _plain(q, k, v, q_index, k_index, q_segment, k_segment, window):
    return dot_product_attention(q, k, v, attention_mask(q_index, k_index, q_segment, k_segment, window))


def _grads(attention, q, k, v, d_out, mask_inputs):
    """dq, dk, dv of <attention(q, k, v), d_out>, i.e. the VJP with a random output cotangent."""
    loss = lambda q, k, v: jnp.vdot(attention(q, k, v, *mask_inputs), d_out)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("name", CASES)
def test_values_match_plain_attention(name):
    case = CASES[name]
    q, k, v, _ = case.inputs()
    mask_inputs = case.mask_inputs()
    expected = jax.jit(_plain)(q, k, v, *mask_inputs)
    actual = jax.jit(case.blockwise)(q, k, v, *mask_inputs)
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", CASES)
def test_gradients_match_plain_attention(name):
    case = CASES[name]
    q, k, v, d_out = case.inputs()
    mask_inputs = case.mask_inputs()
    expected = _grads(_plain, q, k, v, d_out, mask_inputs)
    actual = _grads(case.blockwise, q, k, v, d_out, mask_inputs)
    for grad_name, a, e in zip("qkv", actual, expected):
        np.testing.assert_allclose(a, e, atol=1e-5, rtol=0, err_msg=f"d{grad_name}")


def test_rows_that_see_no_key_give_zero_output_and_zero_gradients():
    case = CASES["causal"]
    q, k, v, d_out = case.inputs()
    mask_inputs = case.mask_inputs()[:-1] + (jnp.int32(0),)   # window 0 hides every key from every query
    attention = case.blockwise
    assert not np.any(jax.jit(attention)(q, k, v, *mask_inputs))
    for grad in _grads(attention, q, k, v, d_out, mask_inputs):
        assert np.all(np.isfinite(grad)) and not np.any(grad)


def test_bfloat16_inputs_match_plain_attention_within_bfloat16_precision():
    case = CASES["packed_segments_with_padding"]
    q, k, v, _ = case.inputs(jnp.bfloat16)
    mask_inputs = case.mask_inputs()
    actual = jax.jit(case.blockwise)(q, k, v, *mask_inputs)
    expected = jax.jit(_plain)(q, k, v, *mask_inputs)
    assert actual.dtype == jnp.bfloat16
    np.testing.assert_allclose(actual.astype(np.float32), expected.astype(np.float32),
                               atol=3e-2, rtol=0)


def test_platform_attention_off_gpu_is_blockwise_attention():
    assert jax.default_backend() == "cpu"
    case = CASES["packed_segments_with_padding"]
    q, k, v, _ = case.inputs()
    mask_inputs = case.mask_inputs()
    np.testing.assert_array_equal(jax.jit(platform_attention)(q, k, v, *mask_inputs),
                                  jax.jit(blockwise_attention)(q, k, v, *mask_inputs))


@pytest.mark.parametrize("name", list(CASES))
def test_fused_attention_wiring_matches_plain_attention(name):
    """The GPU path's call (mask, layouts, grouped heads) through jax's reference implementation on CPU."""
    case = CASES[name]
    q, k, v, _ = case.inputs()
    mask_inputs = case.mask_inputs()
    np.testing.assert_allclose(jax.jit(fused_attention)(q, k, v, *mask_inputs),
                               jax.jit(_plain)(q, k, v, *mask_inputs), atol=1e-5, rtol=0)


def _temp_bytes(fn, t):
    """Compiled scratch memory of fn at sequence length t (B=1, 2 query heads over 1 KV head, hd=16)."""
    q = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, t, 1, 16), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, t), jnp.int32)
    compiled = jax.jit(fn).lower(q, kv, kv, ids, ids, ids, ids, jnp.int32(NO_WINDOW)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def _summed(attention):
    return jax.value_and_grad(lambda q, k, v, *mask_inputs: attention(q, k, v, *mask_inputs).sum(), argnums=(0, 1, 2))


def _growth_4096_to_8192(fn):
    return _temp_bytes(fn, 8192) / _temp_bytes(fn, 4096)


def test_forward_temp_memory_grows_linearly_in_length():
    assert _growth_4096_to_8192(blockwise_attention) <= 2.3


def test_value_and_grad_temp_memory_grows_linearly_in_length():
    assert _growth_4096_to_8192(_summed(blockwise_attention)) <= 2.3


def test_plain_attention_temp_memory_grows_quadratically_in_length():
    """The control: the same measurement does see the [Tq, Tk] scores of the plain version."""
    assert _growth_4096_to_8192(_plain) >= 3.9
    assert _growth_4096_to_8192(_summed(_plain)) >= 3.9
