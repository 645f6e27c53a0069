"""The dense linear's hand-written backward against autodiff of the plain matmul."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxft.ops import nf4
from jaxft.ops.linear import linear


def test_dense_linear_gradients_match_autodiff():
    rng = np.random.default_rng(0)
    x, kernel, bias = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in [(2, 5, 8), (8, 6), (6,)])
    d_out = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)

    def reference(x, kernel, bias):
        return jnp.einsum("...i,io->...o", x, kernel) + bias

    out, vjp = jax.vjp(lambda x, kernel, bias: linear({"kernel": kernel, "bias": bias}, x), x, kernel, bias)
    ref_out, ref_vjp = jax.vjp(reference, x, kernel, bias)
    np.testing.assert_allclose(out, ref_out, atol=1e-6)
    for name, grad, ref in zip(("x", "kernel", "bias"), vjp(d_out), ref_vjp(d_out)):
        np.testing.assert_allclose(grad, ref, atol=1e-5, rtol=1e-5, err_msg=name)


def test_dense_linear_bfloat16_input_with_float32_kernel_keeps_dtypes():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 8)), jnp.bfloat16)
    kernel = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    out, vjp = jax.vjp(lambda x, kernel: linear({"kernel": kernel}, x), x, kernel)
    d_x, d_kernel = vjp(jnp.ones_like(out))
    assert (out.dtype, d_x.dtype, d_kernel.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)


def test_dense_linear_on_nf4_kernel_passes_input_gradient_only():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(4, 64)), jnp.float32)
    dense = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
    packed = nf4.quantize(dense, blocksize=64)
    d_x = jax.grad(lambda x: jnp.sum(linear({"kernel": packed}, x) ** 2))(x)
    ref = jax.grad(lambda x: jnp.sum((x @ nf4.dequantize(packed, jnp.float32)) ** 2))(x)
    np.testing.assert_allclose(d_x, ref, atol=1e-4, rtol=1e-5)
