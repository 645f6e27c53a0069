"""The one linear layer (and embedding lookup) every projection in the model goes through.

A linear leaf group is a dict: ``{"kernel": W [in, out] (dense array or NF4 pytree), "bias"?: [out]}`` plus,
when fine-tuning methods are on, their namespaces (see :mod:`jaxft.ops.registry`). Inside the scanned layer body
the group holds one layer's slices, so an NF4 kernel is dequantized one layer at a time. The model never knows
which method is on. The fused LoRA and DoRA computations live here; the LoRA method (``jaxft.peft.lora``) calls
them.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.ops import nf4
from jaxft.ops.registry import methods_in


def dense_kernel(kernel, dtype) -> jnp.ndarray:
    """The kernel as a dense array in ``dtype`` (dequantizing a quantized kernel)."""
    if isinstance(kernel, nf4.QuantizedTensor):
        return nf4.dequantize(kernel, dtype)
    return kernel.astype(dtype)


def inverted_dropout(x, rate, rng):
    """Inverted dropout of ``x`` at ``rate``; ``x`` itself outside training (no ``rng``) or without a rate."""
    if rng is None or rate is None:
        return x
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


def base_linear(group: dict, x: jnp.ndarray) -> jnp.ndarray:
    """x @ W (+ b) of the group's own kernel and bias, in x's (compute) dtype."""
    return with_bias(group, _dense_linear(x, group["kernel"]))


def with_bias(group: dict, y: jnp.ndarray) -> jnp.ndarray:
    return y + group["bias"].astype(y.dtype) if "bias" in group else y


def linear(group: dict, x: jnp.ndarray, rng: jax.Array | None = None) -> jnp.ndarray:
    """y = x @ W (+ b) for x [..., in], composed with every registered method present in the group (LoRA, DoRA,
    ...: see :mod:`jaxft.ops.registry`). ``rng`` is given only in training (a method's dropout); each method after
    the first draws from its own key folded out of it."""
    inner = None
    for i, method in enumerate(methods_in(group)):
        method_rng = rng if rng is None or i == 0 else jax.random.fold_in(rng, i)
        inner = functools.partial(method.linear, group[method.name], group, rng=method_rng, inner=inner)
    return base_linear(group, x) if inner is None else inner(x)


def lora_linear(x, kernel, a, b, scale, dropout=None, rng=None) -> jnp.ndarray:
    """x @ W + s · (drop(x) @ A) @ B on the fused hand-written backward pass (W dense or NF4, not trained).
    Dropout (rate ``dropout``) acts on the adapter input only, and only when an ``rng`` is given."""
    x_drop = inverted_dropout(x, dropout, rng)
    return _lora_linear(x, None if x_drop is x else x_drop, kernel, a, b, scale)


def lora_delta(x, a, b, scale, dropout=None, rng=None) -> jnp.ndarray:
    """s · (drop(x) @ A) @ B alone: LoRA over another method's output (autodiff's backward, not the fused one)."""
    return jnp.einsum("...r,ro->...o", jnp.einsum("...i,ir->...r", inverted_dropout(x, dropout, rng), a), b) * scale


def dora_linear(x, kernel, a, b, scale, magnitude, dropout=None, rng=None) -> jnp.ndarray:
    """DoRA (PEFT's formulation): with n = ‖W + s·A·B‖ per output column under stop_gradient,
    y = (m / n) ⊙ (x @ W + s · drop(x) @ A @ B)."""
    x_drop = inverted_dropout(x, dropout, rng)
    w = dense_kernel(kernel, x.dtype)
    y = jnp.einsum("...i,io->...o", x, w)
    lora = lora_delta(x_drop, a, b, scale)
    delta = jnp.einsum("ir,ro->io", a, b) * scale
    norm = jax.lax.stop_gradient(jnp.linalg.norm((w + delta).astype(jnp.float32), axis=0))
    ratio = (magnitude / norm).astype(x.dtype)
    base = y if x_drop is x else jnp.einsum("...i,io->...o", x_drop, w)
    return y + (ratio - 1) * base + ratio * lora


def embedding_table(group: dict) -> jnp.ndarray:
    """[V, D] embedding as the model sees it: the table with every present method's change (PEFT's
    TrainableTokens writes its trained rows over the frozen ones)."""
    table = group["embedding"]
    for method in methods_in(group):
        table = method.table(group[method.name], table)
    return table


def embed(group: dict, ids: jnp.ndarray, dtype) -> jnp.ndarray:
    """Embedding lookup [..., D] in ``dtype``, with every present method's change (LoRA's ``lora_embedding``)."""
    x = embedding_table(group)[ids].astype(dtype)
    for method in methods_in(group):
        x = method.embed(group[method.name], ids, x)
    return x
