"""The one linear layer (and embedding lookup) every projection in the model goes through.

A linear leaf group is a dict: ``{"kernel": W [in, out] (dense array or NF4 pytree), "bias"?: [out]}`` plus,
when a fine-tuning method is on, its leaves (see :mod:`jaxft.peft.lora`). Inside the scanned layer body the
group holds one layer's slices, so an NF4 kernel is dequantized one layer at a time. The model never knows
which method is on.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft.ops import nf4


def dense_kernel(kernel, dtype) -> jnp.ndarray:
    """The kernel as a dense array in ``dtype`` (dequantizing a quantized kernel)."""
    if isinstance(kernel, nf4.QuantizedTensor):
        return nf4.dequantize(kernel, dtype)
    return kernel.astype(dtype)


def _dropout(x, rate, rng):
    keep = jax.random.uniform(rng, x.shape) >= rate
    return jnp.where(keep, x / (1 - rate).astype(x.dtype), 0).astype(x.dtype)


def linear(p: dict, x: jnp.ndarray, rng: jax.Array | None = None) -> jnp.ndarray:
    """y = x @ W (+ b) (+ LoRA / DoRA) for x [..., in] in its own (compute) dtype.

    LoRA: y += s · (drop(x) @ A) @ B. DoRA (PEFT's formulation): with n = ‖W + s·A·B‖ per output column under
    stop_gradient, y = (m / n) ⊙ (x @ W + s · drop(x) @ A @ B) + b. Dropout acts on the adapter input only and
    only when an ``rng`` is given (training).
    """
    dtype = x.dtype
    w = dense_kernel(p["kernel"], dtype)
    y = jnp.einsum("...i,io->...o", x, w)
    if "lora_a" in p:
        a, b = p["lora_a"].astype(dtype), p["lora_b"].astype(dtype)
        if "lora_mask" in p:  # rank padding multiplies to zero, so it also gets zero gradient
            mask = p["lora_mask"].astype(dtype)
            a, b = a * mask[None, :], b * mask[:, None]
        scale = p["lora_scale"].astype(dtype)
        x_drop = x
        if rng is not None and "lora_dropout" in p:
            x_drop = _dropout(x, p["lora_dropout"], rng)
        lora = jnp.einsum("...r,ro->...o", jnp.einsum("...i,ir->...r", x_drop, a), b) * scale
        if "lora_magnitude" in p:
            delta = jnp.einsum("ir,ro->io", a, b) * scale
            norm = jax.lax.stop_gradient(jnp.linalg.norm((w + delta).astype(jnp.float32), axis=0))
            magnitude = p["lora_magnitude"]
            if "lora_mask" in p:  # a layer without adapter keeps its magnitude fixed (= ‖W‖): no gradient
                magnitude = jnp.where(jnp.any(p["lora_mask"] > 0), magnitude, jax.lax.stop_gradient(magnitude))
            ratio = (magnitude / norm).astype(dtype)
            base = y if x_drop is x else jnp.einsum("...i,io->...o", x_drop, w)
            y = y + (ratio - 1) * base + ratio * lora
        else:
            y = y + lora
    if "bias" in p:
        y = y + p["bias"].astype(dtype)
    return y


def embed(p: dict, ids: jnp.ndarray, dtype) -> jnp.ndarray:
    """Embedding lookup [..., D]; with a LoRA embedding adapter, + s · A[ids] @ B (PEFT's ``lora_embedding``)."""
    x = p["embedding"][ids].astype(dtype)
    if "lora_embedding_a" in p:
        a_rows = p["lora_embedding_a"][ids].astype(dtype)
        x = x + jnp.einsum("...r,rd->...d", a_rows, p["lora_embedding_b"].astype(dtype)) * p["lora_scale"].astype(dtype)
    return x
