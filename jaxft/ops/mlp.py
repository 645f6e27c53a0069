"""The gated MLP activation silu(gate) * up, with a backward pass that keeps only its two inputs.

Autodiff through ``jax.nn.silu(gate) * up`` saves the sigmoid, the silu and their products: in the scan over
layers that is four extra [tokens, intermediate] arrays per layer, the largest residuals after attention's. The
hand-written backward recomputes the sigmoid from ``gate`` instead (elementwise, cheaper than storing it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def swiglu(gate: jnp.ndarray, up: jnp.ndarray) -> jnp.ndarray:
    """silu(gate) * up, elementwise; the same values as ``jax.nn.silu(gate) * up``."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, d_out):
    gate, up = (r.astype(jnp.float32) for r in residuals)
    d_out32 = d_out.astype(jnp.float32)
    sig = jax.nn.sigmoid(gate)
    d_gate = d_out32 * up * sig * (1 + gate * (1 - sig))       # d silu(g) / dg = s (1 + g (1 - s))
    d_up = d_out32 * gate * sig
    return d_gate.astype(residuals[0].dtype), d_up.astype(residuals[1].dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
