"""The one linear layer every projection in the model goes through.

A linear leaf group is a dict: ``{"kernel": W [in, out] (dense array or a quantized pytree), "bias"?: [out]}``.
Fine-tuning methods add keys to the group; the model never knows which method is on.
"""
from __future__ import annotations

import jax.numpy as jnp


def dense_kernel(kernel, dtype) -> jnp.ndarray:
    """The kernel as a dense array in ``dtype`` (dequantizing a quantized kernel)."""
    return kernel.astype(dtype)


def linear(p: dict, x: jnp.ndarray) -> jnp.ndarray:
    """y = x @ W (+ b) for x [..., in] in its own (compute) dtype."""
    w = dense_kernel(p["kernel"], x.dtype)
    y = jnp.einsum("...i,io->...o", x, w)
    if "bias" in p:
        y = y + p["bias"].astype(x.dtype)
    return y
