"""swiglu's hand-written backward against autodiff of jax.nn.silu(gate) * up."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxft.ops.mlp import swiglu


def reference(gate, up):
    return jax.nn.silu(gate) * up


def random_inputs(dtype):
    rng = np.random.default_rng(0)
    return tuple(jnp.asarray(4 * rng.normal(size=(3, 5, 16)), dtype) for _ in range(3))


def test_swiglu_matches_autodiff_values_and_gradients():
    gate, up, d_out = random_inputs(jnp.float32)
    out, vjp = jax.vjp(swiglu, gate, up)
    ref_out, ref_vjp = jax.vjp(reference, gate, up)
    np.testing.assert_array_equal(out, ref_out)
    for grad, ref in zip(vjp(d_out), ref_vjp(d_out)):
        np.testing.assert_allclose(grad, ref, atol=1e-6, rtol=1e-6)


def test_swiglu_bfloat16_gradients_are_the_float32_ones_rounded():
    """The backward computes in float32 and rounds once (autodiff in bfloat16 rounds every intermediate)."""
    gate, up, d_out = random_inputs(jnp.bfloat16)
    out, vjp = jax.vjp(swiglu, gate, up)
    assert out.dtype == jnp.bfloat16
    f32 = [x.astype(jnp.float32) for x in (gate, up, d_out)]
    ref_grads = jax.vjp(reference, *f32[:2])[1](f32[2])
    for grad, ref in zip(vjp(d_out), ref_grads):
        assert grad.dtype == jnp.bfloat16
        np.testing.assert_array_equal(grad, ref.astype(jnp.bfloat16))
