"""Rotary position embeddings with HF's scaling variants (default, linear, dynamic NTK, llama3, yarn).

Frequencies are computed in float32 exactly as ``transformers.modeling_rope_utils`` does, so logits match.
Rotation is the "half-split" form HF Llama uses: pairs are (x[i], x[i + d/2]), not interleaved.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxft.config import ModelConfig


def _default_inv_freq(base, dim: int) -> np.ndarray:
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return (np.float32(1.0) / np.power(np.float32(base), exponents)).astype(np.float32)


def original_context_length(cfg: ModelConfig) -> int:
    """The pre-scaling context length llama3 and yarn rope use: the configured one, else (as transformers does)
    ``max_position_embeddings``."""
    return cfg.rope.original_max_position_embeddings or cfg.max_position_embeddings


def _llama3_inv_freq(cfg: ModelConfig, inv_freq: np.ndarray) -> np.ndarray:
    r = cfg.rope
    old_len = original_context_length(cfg)
    low_wavelen = old_len / r.low_freq_factor
    high_wavelen = old_len / r.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / r.factor, inv_freq)
    smooth = (old_len / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
    smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def _yarn_inv_freq(cfg: ModelConfig, dim: int) -> tuple[np.ndarray, float]:
    r = cfg.rope
    base, factor = cfg.rope_theta, r.factor
    orig = original_context_length(cfg)

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if r.attention_factor is not None:
        attention_factor = r.attention_factor
    elif r.mscale and r.mscale_all_dim:
        attention_factor = float(mscale(factor, r.mscale) / mscale(factor, r.mscale_all_dim))
    else:
        attention_factor = mscale(factor)

    def correction_dim(rotations):
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(r.beta_fast or 32), correction_dim(r.beta_slow or 1)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    pos_freqs = np.power(np.float32(base), np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq.astype(np.float32), attention_factor


def static_inv_freq(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """(inv_freq [head_dim/2], cos/sin scale) for every rope type whose frequencies don't depend on length."""
    dim, kind = cfg.head_dim, cfg.rope.rope_type
    inv_freq = _default_inv_freq(cfg.rope_theta, dim)
    if kind == "linear":
        return (inv_freq / np.float32(cfg.rope.factor)).astype(np.float32), 1.0
    if kind == "llama3":
        return _llama3_inv_freq(cfg, inv_freq), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(cfg, dim)
    return inv_freq, 1.0


def inv_freq(cfg: ModelConfig, positions: jnp.ndarray) -> tuple[jnp.ndarray, float]:
    """Frequencies for this call. Dynamic NTK grows the base with the longest position seen, like HF."""
    if cfg.rope.rope_type != "dynamic":
        freqs, scale = static_inv_freq(cfg)
        return jnp.asarray(freqs), scale
    dim, factor, max_len = cfg.head_dim, cfg.rope.factor, cfg.max_position_embeddings
    seq_len = jnp.maximum(jnp.max(positions) + 1, max_len).astype(jnp.float32)
    base = cfg.rope_theta * ((factor * seq_len / max_len) - (factor - 1)) ** (dim / (dim - 2))
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    return 1.0 / (base ** exponents), 1.0


def rope_tables(cfg: ModelConfig, positions: jnp.ndarray, dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin: [B, T, head_dim] for integer ``positions`` [B, T], cast to the compute dtype as HF does."""
    freqs, scale = inv_freq(cfg, positions)
    angles = positions.astype(jnp.float32)[..., None] * freqs  # [B, T, d/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return (jnp.cos(angles) * scale).astype(dtype), (jnp.sin(angles) * scale).astype(dtype)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x: [B, T, heads, head_dim]; cos/sin: [B, T, head_dim]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
