"""The one linear layer (and embedding lookup) every projection in the model goes through.

A linear leaf group is a dict: ``{"kernel": W [in, out] (dense array or NF4 pytree), "bias"?: [out]}`` plus,
when a fine-tuning method is on, its leaves (see :mod:`jaxft.peft.lora`). Inside the scanned layer body the
group holds one layer's slices, so an NF4 kernel is dequantized one layer at a time. The model never knows
which method is on.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.ops import nf4


def dense_kernel(kernel, dtype) -> jnp.ndarray:
    """The kernel as a dense array in ``dtype`` (dequantizing a quantized kernel)."""
    if isinstance(kernel, nf4.QuantizedTensor):
        return nf4.dequantize(kernel, dtype)
    return kernel.astype(dtype)


def _dropout(x, rate, rng):
    keep = jax.random.uniform(rng, x.shape) >= rate
    return jnp.where(keep, x / (1 - rate).astype(x.dtype), 0).astype(x.dtype)


def _lora_matmul(x, x_drop, w, a, b, scale):
    """(x @ W + s · (drop(x) @ A) @ B, drop(x) @ A): the one forward pass of both LoRA paths."""
    x_a = jnp.einsum("...i,ir->...r", x_drop, a)
    return jnp.einsum("...i,io->...o", x, w) + jnp.einsum("...r,ro->...o", x_a, b) * scale, x_a


@jax.custom_vjp
def _lora_linear(x, x_drop, kernel, a, b, scale):
    """LoRA with a hand-written backward pass. On XLA:CPU autodiff through x·A·B transposes whole activations for
    B's gradient; here every gradient is a 2-D matmul contracting the token axis in place.

    ``x_drop`` is None without dropout, so that x is one residual rather than two stacked copies in the scan.
    """
    return _lora_linear_fwd(x, x_drop, kernel, a, b, scale)[0]


def _lora_linear_fwd(x, x_drop, kernel, a, b, scale):
    y, x_a = _lora_matmul(x, x if x_drop is None else x_drop, dense_kernel(kernel, x.dtype), a, b, scale)
    # The kernel, not its dequantized copy, is saved: a 4-bit base is dequantized again in the backward pass, so
    # the scan over layers keeps 4-bit residuals instead of every layer's dense weights.
    return y, (x, x_drop, x_a, kernel, a, b, scale)


def _matmul_tn(u, v):
    """u.T @ v for 2-D u [N, m], v [N, n], contracting the token axis in place (no transposed copies)."""
    return jax.lax.dot_general(u, v, (((0,), (0,)), ((), ())))


def _lora_linear_bwd(residuals, dy):
    x, x_drop, x_a, kernel, a, b, scale = residuals
    n_in, rank, n_out = a.shape[0], a.shape[1], b.shape[1]
    dy2 = dy.reshape(-1, n_out)                                        # [N, out]
    x_a2 = x_a.reshape(-1, rank)                                       # [N, r]
    dy_b = dy2 @ b.T                                                   # [N, r]
    d_xa = dy_b * scale
    dx = dy2 @ dense_kernel(kernel, dy.dtype).T
    dx_lora = d_xa @ a.T
    da = _matmul_tn((x if x_drop is None else x_drop).reshape(-1, n_in), d_xa)
    db = _matmul_tn(x_a2 * scale, dy2)
    dscale = jnp.sum(dy_b * x_a2).astype(scale.dtype).reshape(scale.shape)
    if x_drop is None:
        dx, dx_drop = dx + dx_lora, None
    else:
        dx_drop = dx_lora.reshape(x_drop.shape)
    return dx.reshape(x.shape), dx_drop, _kernel_cotangent(kernel, x, dy2), da, db, dscale


def _kernel_cotangent(kernel, x, dy2):
    """x.T @ dy for a dense kernel (XLA drops it when the kernel is frozen); no gradient reaches a 4-bit kernel."""
    if isinstance(kernel, nf4.QuantizedTensor):
        return jax.tree.map(_zero_cotangent, kernel)
    return _matmul_tn(x.reshape(-1, x.shape[-1]), dy2).astype(kernel.dtype)


def _zero_cotangent(leaf):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
        return jnp.zeros_like(leaf)
    return np.zeros(leaf.shape, jax.dtypes.float0)


_lora_linear.defvjp(_lora_linear_fwd, _lora_linear_bwd)


@jax.custom_vjp
def _dense_linear(x, kernel):
    """x @ W with the same hand-written backward as the LoRA path: autodiff would contract the [B, T] axes of x and
    dy for W's gradient (full fine-tuning) through transposed copies of both activations."""
    return jnp.einsum("...i,io->...o", x, dense_kernel(kernel, x.dtype))


def _is_primal(leaf) -> bool:
    return isinstance(leaf, jax.custom_derivatives.CustomVJPPrimal)


def _dense_linear_fwd(x, kernel):
    """With symbolic zeros, each primal says whether it is differentiated: the input x is saved only for a trained
    kernel's gradient, so a frozen linear (every one LoRA leaves out) keeps no activation for its backward."""
    trained = any(leaf.perturbed for leaf in jax.tree.leaves(kernel, is_leaf=_is_primal))
    x, kernel = x.value, jax.tree.map(lambda leaf: leaf.value, kernel, is_leaf=_is_primal)
    return _dense_linear(x, kernel), (x if trained else None, kernel)


def _dense_linear_bwd(residuals, dy):
    x, kernel = residuals
    dy2 = dy.reshape(-1, dy.shape[-1])
    dx = dy2 @ dense_kernel(kernel, dy.dtype).T
    d_kernel = None if x is None else _kernel_cotangent(kernel, x, dy2)
    return dx.reshape(*dy.shape[:-1], dx.shape[-1]), d_kernel


_dense_linear.defvjp(_dense_linear_fwd, _dense_linear_bwd, symbolic_zeros=True)


def linear(p: dict, x: jnp.ndarray, rng: jax.Array | None = None) -> jnp.ndarray:
    """y = x @ W (+ b) (+ LoRA / DoRA) for x [..., in] in its own (compute) dtype.

    LoRA: y += s · (drop(x) @ A) @ B. DoRA (PEFT's formulation): with n = ‖W + s·A·B‖ per output column under
    stop_gradient, y = (m / n) ⊙ (x @ W + s · drop(x) @ A @ B) + b. Dropout acts on the adapter input only and
    only when an ``rng`` is given (training).
    """
    dtype = x.dtype
    if "lora_a" not in p:
        y = _dense_linear(x, p["kernel"])
    else:
        a, b = p["lora_a"].astype(dtype), p["lora_b"].astype(dtype)
        if "lora_mask" in p:  # rank padding multiplies to zero, so it also gets zero gradient
            mask = p["lora_mask"].astype(dtype)
            a, b = a * mask[None, :], b * mask[:, None]
        scale = p["lora_scale"].astype(dtype)
        x_drop = x
        if rng is not None and "lora_dropout" in p:
            x_drop = _dropout(x, p["lora_dropout"], rng)
        if "lora_magnitude" in p:
            y = _dora(p, x, x_drop, a, b, scale)
        else:
            y = _lora_linear(x, None if x_drop is x else x_drop, p["kernel"], a, b, scale)
    if "bias" in p:
        y = y + p["bias"].astype(dtype)
    return y


def _dora(p: dict, x, x_drop, a, b, scale) -> jnp.ndarray:
    w = dense_kernel(p["kernel"], x.dtype)
    y = jnp.einsum("...i,io->...o", x, w)
    lora = jnp.einsum("...r,ro->...o", jnp.einsum("...i,ir->...r", x_drop, a), b) * scale
    delta = jnp.einsum("ir,ro->io", a, b) * scale
    norm = jax.lax.stop_gradient(jnp.linalg.norm((w + delta).astype(jnp.float32), axis=0))
    magnitude = p["lora_magnitude"]
    if "lora_mask" in p:  # a layer without adapter keeps its magnitude fixed (= ‖W‖): no gradient
        magnitude = jnp.where(jnp.any(p["lora_mask"] > 0), magnitude, jax.lax.stop_gradient(magnitude))
    ratio = (magnitude / norm).astype(x.dtype)
    base = y if x_drop is x else jnp.einsum("...i,io->...o", x_drop, w)
    return y + (ratio - 1) * base + ratio * lora


def embedding_table(p: dict) -> jnp.ndarray:
    """[V, D] embedding with any trained rows (PEFT's TrainableTokens) written over the frozen ones."""
    if "trainable_rows" not in p:
        return p["embedding"]
    return p["embedding"].at[p["trainable_row_ids"]].set(p["trainable_rows"].astype(p["embedding"].dtype))


def embed(p: dict, ids: jnp.ndarray, dtype) -> jnp.ndarray:
    """Embedding lookup [..., D]; with a LoRA embedding adapter, + s · A[ids] @ B (PEFT's ``lora_embedding``)."""
    x = embedding_table(p)[ids].astype(dtype)
    if "lora_embedding_a" in p:
        a_rows = p["lora_embedding_a"][ids].astype(dtype)
        x = x + jnp.einsum("...r,rd->...d", a_rows, p["lora_embedding_b"].astype(dtype)) * p["lora_scale"].astype(dtype)
    return x
