"""bitsandbytes' 8-bit dynamic quantization maps, bit for bit: the code tables of its blockwise 8-bit quantization
(double quantization of NF4 block statistics, 8-bit optimizer state).

A value's leading zeros act as a decimal exponent (1e-6 .. 1) and the remaining bits are a linear fraction inside
that decade, so relative precision holds across six decades where a linear int8 code would round everything below
absmax / 255 to zero.
"""
from __future__ import annotations

import numpy as np

_f32 = np.float32


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32) on CPU: an f32 step, the first half ``start + i * step`` and
    the second ``end - (steps - 1 - i) * step``, each a fused multiply-add (one rounding; exact here in f64)."""
    step = np.float64((_f32(end) - _f32(start)) / _f32(steps - 1))
    idx = np.arange(steps)
    lo = np.float64(_f32(start)) + step * idx
    hi = np.float64(_f32(end)) - step * (steps - 1 - idx)
    return np.where(idx < steps // 2, lo, hi).astype(np.float32)


def dynamic_map(signed: bool) -> np.ndarray:
    """bitsandbytes.functional.create_dynamic_map(signed, max_exponent_bits=7, total_bits=8) in f32: 256 sorted
    values in [-1, 1] (signed) or [0, 1] (unsigned). Decade ``k`` (values ``10**(k-6) * [0.1, 1)``) holds ``2**k``
    evenly spaced values per sign (``2**(k+1)`` unsigned); 0 and 1 are exact."""
    data = []
    for k in range(7):
        bounds = _linspace_f32(0.1, 1.0, 2 ** (k if signed else k + 1) + 1)
        means = (bounds[:-1] + bounds[1:]) / _f32(2)
        scale = _f32(10.0 ** (k - 6))
        data += list(scale * means) + (list(-scale * means) if signed else [])
    return np.array(sorted(data + [0.0, 1.0]), np.float32)


SIGNED_MAP = dynamic_map(signed=True)
UNSIGNED_MAP = dynamic_map(signed=False)
