"""bitsandbytes-exact 4-bit weight quantization (NF4 and FP4, optional double quantization) in JAX.

The format is bitsandbytes' ``quantize_4bit`` (its CPU path is the oracle), reproduced bit for bit so that a
checkpoint quantized here loads in transformers/bnb and vice versa:

* The matrix is the torch ``Linear`` weight ``[out, in]`` (the transpose of a JAX ``[in, out]`` kernel), flattened
  row-major and cut into blocks of ``blocksize`` (64 by default) consecutive values.
* Each block stores ``absmax`` (f32).  Values are scaled by the f32 reciprocal ``1 / max(absmax, 1e-38)``, clipped to
  [-1, 1] and mapped to the code whose interval contains them: bucketizing on the f32 midpoints of the sorted 16-value
  code book, a value exactly on a midpoint taking the lower code.  bnb quirks kept on purpose: the last, partial block
  divides by its absmax instead of multiplying by the reciprocal, and stores its absmax clamped to 1e-38, while a full
  all-zero block stores 0.
* Two codes per byte, element ``2i`` in the high nibble; an odd count is padded with the code of 0.
* Double quantization (QLoRA) stores ``absmax - offset`` (``offset`` = torch's f32 mean of absmax) as bnb's 8-bit
  blockwise quantization with its signed dynamic map over blocks of 256: a uint8 code per block plus one f32 absmax
  per 256 blocks, i.e. 4 + 8/64 + 32/(64*256) ~= 4.127 bits/param.  The offset reproduces torch's CPU cascade sum
  and true division bit for bit (see ``quantize(torch_threads=...)``), since one ulp of offset changes the state.

Layouts (the static ``layout`` field of :class:`QuantizedTensor`):

* ``"row"`` (``in % blocksize == 0``): each block lies inside one torch row, so codes are stored in the kernel's own
  axis order: packed ``[..., in // 2, out]`` and absmax / quantized absmax ``[..., in // blocksize, out]``.  A
  ``NamedSharding`` over (in, out) applies to them unchanged and dequantization never reshapes across a sharded axis.
  The per-matrix double-quant state (``nested_absmax [..., nblocks / 256]``, ``offset [...]``) is tiny and meant to be
  replicated; it is indexed by each block's torch-order position, so results stay identical to bnb.
* ``"flat"`` (otherwise): blocks straddle rows, so everything is stored in bnb's flat order: packed ``[..., ceil(n/2)]``
  and absmax ``[..., nblocks]``.  Not shardable.

Leading dims (e.g. stacked layers ``[L, in, out]``) are independent matrices.  They are read off the children's shapes
rather than stored, so ``jax.lax.scan`` can slice a stacked tensor into per-layer tensors and :func:`dequantize` (or
``.astype``, which the linear layer calls) works on each slice.

This module never imports torch or bitsandbytes; code books are copied (NF4/FP4 tables) or recomputed (8-bit dynamic
map, :mod:`jaxft.ops.dynamic_map`) from bnb's source. Reading and writing transformers' bnb state dicts is
:mod:`jaxft.hf.bnb`'s.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from jaxft.ops.dynamic_map import SIGNED_MAP

__all__ = ["BLOCKSIZES", "QUANT_TYPES", "QuantizedTensor", "check_options", "dequantize", "layout_for", "nbytes",
           "quantize", "stack", "torch_order"]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bnb's quantize_4bit accepts
QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256  # bnb's fixed blocksize for double quantization
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
_MIN_ABSMAX = np.float32(1e-38)  # bnb's clamp on the absmax it divides by

_f32 = np.float32

# bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1), already normalized to [-1, 1].
_NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0], np.float32)
# get_4bit_type("fp4"): E2M1 values in bit-pattern order, divided (in f32) by their max as bnb does.
_FP4 = np.array([0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
                np.float32) / _f32(12.0)
CODES = {"nf4": _NF4, "fp4": _FP4}


def _bucketize_tables(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(f32 midpoints of the sorted code book, sorted position -> code index), as bnb's default quantize_4bit.

    FP4 has +0 and -0; a stable sort puts +0 first, as torch.argsort does there."""
    order = np.argsort(code, kind="stable")
    return ((code[order[:-1]] + code[order[1:]]) / _f32(2)).astype(np.float32), order.astype(np.uint8)


_BUCKETS = {name: _bucketize_tables(code) for name, code in CODES.items()}


def _dynamic_lut() -> np.ndarray:
    """bnb's CPU 8-bit quantizer looks codes up in a 65536-entry table over [-1, 1] (not a true nearest search):
    entry i holds the first code whose f32 midpoint is >= -1 + 2i/65535."""
    mids = (_f32(0.5) * (SIGNED_MAP[:-1] + SIGNED_MAP[1:])).astype(np.float32)
    grid = (_f32(-1.0) + (_f32(2.0) * np.arange(65536, dtype=np.float32)) / _f32(65535)).astype(np.float32)
    return np.searchsorted(mids, grid, side="left").astype(np.uint8)


_DYNAMIC_LUT = _dynamic_lut()


@struct.dataclass
class QuantizedTensor:
    """A bnb 4-bit weight in JAX layout; a pytree whose children are arrays and whose aux data is static.

    Children (``...`` = leading dims, e.g. ``[L]`` for stacked layers; see the module docstring for the layouts):
      packed: uint8 codes, two per byte.
      absmax: f32 block absmax, or with double quantization its uint8 8-bit codes.
      nested_absmax: f32 ``[..., ceil(nblocks / 256)]`` (double quantization only, else None).
      offset: f32 ``[...]`` mean of the block absmax (double quantization only, else None).
    Static: ``matrix_shape`` (one matrix, JAX layout ``(in, out)``), ``dtype_name`` (the original dtype),
    ``blocksize``, ``quant_type``, ``layout``; ``double_quant`` follows from the children (part of the treedef).
    """

    packed: jax.Array
    absmax: jax.Array
    nested_absmax: Optional[jax.Array]
    offset: Optional[jax.Array]
    matrix_shape: tuple[int, int] = struct.field(pytree_node=False)
    dtype_name: str = struct.field(pytree_node=False)
    blocksize: int = struct.field(pytree_node=False)
    quant_type: str = struct.field(pytree_node=False)
    layout: str = struct.field(pytree_node=False)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def lead_shape(self) -> tuple[int, ...]:
        """Leading (stacking) dims, read off the packed codes so that scan-slicing keeps them consistent."""
        return tuple(self.packed.shape[:-2] if self.layout == "row" else self.packed.shape[:-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return self.lead_shape + tuple(self.matrix_shape)

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype_name)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def astype(self, dtype) -> jax.Array:
        """Dequantize to ``dtype``: lets code that calls ``kernel.astype(dtype)`` take a quantized kernel."""
        return dequantize(self, dtype)


def child_axes(q: QuantizedTensor, kernel_axes: tuple) -> dict[str, tuple]:
    """The logical axes of each child of ``q``, given those of the ``[..., in, out]`` kernel it stores: in the
    "row" layout the codes and block absmax keep the kernel's axis order (their in-dim counts byte pairs or blocks),
    so they shard like the kernel; the per-matrix double-quant state and the "flat" layout's blocks have no
    matrix axis (``None``: replicated)."""
    lead = tuple(kernel_axes[:-2])
    blocks = tuple(kernel_axes) if q.layout == "row" else (*lead, None)
    axes = {"packed": blocks, "absmax": blocks, "nested_absmax": (*lead, None), "offset": lead}
    return {name: child for name, child in axes.items() if getattr(q, name) is not None}


def check_options(blocksize: int, quant_type: str) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES} (as in bitsandbytes), got {blocksize!r}")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def layout_for(n_in: int, blocksize: int) -> str:
    return "row" if n_in % blocksize == 0 else "flat"


# ---------------------------------------------------------------- torch's float32 CPU sum (for the offset)

_TORCH_GRAIN = 32768  # at::internal::GRAIN_SIZE: below it torch sums on one thread
_TORCH_LANES = 8  # floats per Vectorized<float> in torch's sum kernel (x86 wheels)
_TORCH_ILP = 4


def _seq_sum(x: jax.Array, init: Optional[jax.Array] = None) -> jax.Array:
    """Strictly left-to-right f32 sum over axis 0 (starting from ``init`` or 0): one fixed rounding order."""
    init = jnp.zeros(x.shape[1:], jnp.float32) if init is None else init
    return lax.scan(lambda acc, row: (acc + row, None), init, x)[0]


def _grouped(x: jax.Array, step: int) -> tuple[jax.Array, jax.Array]:
    """Sequential sums of consecutive groups of ``step`` rows of ``x`` [rows, ...], and of the leftover rows."""
    groups = x.shape[0] // step
    full = x[:groups * step].reshape(groups, step, *x.shape[1:])
    return _seq_sum(jnp.moveaxis(full, 1, 0)), _seq_sum(x[groups * step:])


def _multi_row_sum(rows: jax.Array) -> jax.Array:
    """ATen's ``multi_row_sum``: a 4-level cascade of sequential sums over axis 0 of ``rows`` [size, k]."""
    size = rows.shape[0]
    ceil_log2 = 1 if size <= 2 else (size - 1).bit_length()
    step = 1 << max(4, ceil_log2 // 4)
    level0, acc0 = _grouped(rows, step)
    level1, acc1 = _grouped(level0, step)
    level2, acc2 = _grouped(level1, step)
    return ((acc0 + acc1) + acc2) + _seq_sum(level2)


def _row_sum(vecs: jax.Array) -> jax.Array:
    """ATen's ``row_sum`` over axis 0 of ``vecs`` [size, lanes]: 4 interleaved partial sums (ILP)."""
    size, lanes = vecs.shape
    rows = size // _TORCH_ILP
    partial = _multi_row_sum(vecs[:rows * _TORCH_ILP].reshape(rows, _TORCH_ILP * lanes))
    partial = partial.reshape(_TORCH_ILP, lanes)
    total = _seq_sum(vecs[rows * _TORCH_ILP:], init=partial[0])
    for k in range(1, _TORCH_ILP):
        total = total + partial[k]
    return total


def _inner_sum(x: jax.Array) -> jax.Array:
    """ATen's single-threaded sum of a contiguous f32 vector ``x`` [n] (vectorized when n >= 8 lanes)."""
    lanes = _TORCH_LANES if x.shape[0] >= _TORCH_LANES else 1
    nvec = x.shape[0] // lanes
    vec_acc = _row_sum(x[:nvec * lanes].reshape(nvec, lanes))
    total = _seq_sum(x[nvec * lanes:])
    for k in range(lanes):
        total = total + vec_acc[k]
    return total


def _true_divide(x: jax.Array, n: int) -> jax.Array:
    """x / n rounded once, as torch's ``div_``: a divisor that depends on ``x`` keeps XLA from rewriting the division
    by a constant into a (differently rounded) multiplication by its reciprocal."""
    return x / jnp.where(jnp.isnan(x), 1.0, _f32(n))


def _torch_mean(x: jax.Array, threads: int) -> jax.Array:
    """``torch.Tensor.mean()`` of f32 ``x`` [n] on CPU, bit for bit: ATen's cascade sum, then / n.

    From 32768 elements on, torch splits the sum into one chunk per intra-op thread and sums the per-thread results,
    so the rounding then depends on ``torch.get_num_threads()`` of the process that quantized."""
    n = x.shape[0]
    if n < _TORCH_GRAIN or threads == 1:
        return _true_divide(_inner_sum(x), n)
    chunks = min(threads, -(-n // _TORCH_GRAIN))
    chunk = -(-n // chunks)
    parts = jnp.stack([_inner_sum(x[t * chunk:(t + 1) * chunk]) for t in range(chunks)])
    buffer = jnp.zeros(threads, jnp.float32).at[:chunks].set(parts)
    return _true_divide(_inner_sum(buffer), n)


# ---------------------------------------------------------------- quantization

def _scale(x: jax.Array, absmax: jax.Array, divide: bool = False) -> jax.Array:
    """x / absmax clipped to [-1, 1], 0 for an all-zero block (bnb clamps absmax to 1e-38; XLA flushes denormals)."""
    safe = jnp.where(absmax == 0, 1.0, absmax)
    scaled = x / safe if divide else x * (1.0 / safe)
    return jnp.where(absmax == 0, 0.0, jnp.clip(scaled, -1.0, 1.0))


def _codes(scaled: jax.Array, quant_type: str) -> jax.Array:
    """4-bit code of each scaled value: bucketize on the sorted code book's midpoints (ties go to the lower code)."""
    mids, order = _BUCKETS[quant_type]
    pos = jnp.searchsorted(jnp.asarray(mids), scaled, side="left", method="compare_all")
    return jnp.asarray(order)[pos]


def _pack(codes: jax.Array, axis: int) -> jax.Array:
    """Two codes per byte along ``axis``: even positions in the high nibble."""
    even = lax.slice_in_dim(codes, 0, None, 2, axis)
    odd = lax.slice_in_dim(codes, 1, None, 2, axis)
    return (even << 4) | odd


def _quantize_rows(w: jax.Array, blocksize: int, quant_type: str) -> tuple[jax.Array, jax.Array]:
    """Row layout: blocks run along ``in`` of the [..., in, out] kernel (= along a torch row)."""
    *lead, n_in, n_out = w.shape
    blocks = w.reshape(*lead, n_in // blocksize, blocksize, n_out)
    absmax = jnp.max(jnp.abs(blocks), axis=-2)
    codes = _codes(_scale(blocks, absmax[..., None, :]), quant_type).reshape(w.shape)
    return _pack(codes, axis=-2), absmax


def _quantize_flat(w: jax.Array, blocksize: int, quant_type: str) -> tuple[jax.Array, jax.Array]:
    """Flat layout: bnb's own order, the torch weight flattened; the last block may be partial."""
    x = jnp.swapaxes(w, -1, -2).reshape(*w.shape[:-2], -1)
    n = x.shape[-1]
    full = n - n % blocksize
    blocks = x[..., :full].reshape(*x.shape[:-1], full // blocksize, blocksize)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    scaled = [_scale(blocks, absmax[..., None]).reshape(*x.shape[:-1], full)]
    if full < n:
        tail = x[..., full:]
        tail_max = jnp.max(jnp.abs(tail), axis=-1, keepdims=True)
        scaled.append(_scale(tail, tail_max, divide=True))
        absmax = jnp.concatenate([absmax, jnp.where(tail_max == 0, _MIN_ABSMAX, tail_max)], axis=-1)
    if n % 2:
        scaled.append(jnp.zeros((*x.shape[:-1], 1), jnp.float32))
    return _pack(_codes(jnp.concatenate(scaled, axis=-1), quant_type), axis=-1), absmax


def _quantize_8bit(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """bnb's CPU ``quantize_blockwise`` with the dynamic map, blocks of 256 along the last axis of f32 ``x``.

    The index into the 65536-entry table is ``trunc(((v + 1) * 0.5) * 65535 + 0.5)``; an all-zero block gets code 0.
    """
    n = x.shape[-1]
    nblocks = -(-n // NESTED_BLOCKSIZE)
    padded = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nblocks * NESTED_BLOCKSIZE - n)])
    blocks = padded.reshape(*x.shape[:-1], nblocks, NESTED_BLOCKSIZE)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    v = _scale(blocks, absmax[..., None])
    index = (((v + 1.0) * 0.5) * 65535.0 + 0.5).astype(jnp.uint16)
    codes = jnp.where(absmax[..., None] == 0, jnp.uint8(0), jnp.asarray(_DYNAMIC_LUT)[index])
    return codes.reshape(*x.shape[:-1], -1)[..., :n], absmax


def torch_order(absmax: jax.Array, layout: str) -> jax.Array:
    """Block statistics in bnb's flat order: the row layout's [..., in/bs, out] is transposed torch order."""
    if layout == "flat":
        return absmax
    return jnp.swapaxes(absmax, -1, -2).reshape(*absmax.shape[:-2], -1)


def _double_quantize(absmax: jax.Array, layout: str, torch_threads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(uint8 codes of absmax - offset in ``absmax``'s layout, nested absmax, offset), as bnb's compress_statistics."""
    flat = torch_order(absmax, layout)
    lead = flat.shape[:-1]
    rows = flat.reshape(-1, flat.shape[-1])
    offset = jax.vmap(lambda row: _torch_mean(row, torch_threads))(rows).reshape(lead)
    codes, nested = _quantize_8bit(flat - offset[..., None])
    if layout == "row":
        codes = jnp.swapaxes(codes.reshape(*lead, absmax.shape[-1], absmax.shape[-2]), -1, -2)
    return codes, nested, offset


def _quantize(w: jax.Array, blocksize: int, double_quant: bool, quant_type: str, torch_threads: int):
    w = jnp.asarray(w).astype(jnp.float32)
    layout = layout_for(w.shape[-2], blocksize)
    quantize_layout = _quantize_rows if layout == "row" else _quantize_flat
    packed, absmax = quantize_layout(w, blocksize, quant_type)
    nested = offset = None
    if double_quant:
        absmax, nested, offset = _double_quantize(absmax, layout, torch_threads)
    return packed, absmax, nested, offset


_quantize_jit = jax.jit(_quantize, static_argnames=("blocksize", "double_quant", "quant_type", "torch_threads"))


def quantize(w, blocksize: int = 64, double_quant: bool = True, quant_type: str = "nf4", *,
             torch_threads: int = 1) -> QuantizedTensor:
    """Quantize ``w`` [..., in, out] (JAX layout) exactly as bnb quantizes each torch weight ``w[l].T``.

    ``double_quant`` is bnb's ``compress_statistics``.  ``torch_threads`` only matters with double quantization and
    at least 32768 blocks per matrix: bnb's offset is torch's CPU mean, whose summation order then depends on
    ``torch.get_num_threads()``; pass that value to reproduce a given bnb run bit for bit.  Jit-able.
    """
    check_options(blocksize, quant_type)
    dtype = jnp.dtype(w.dtype)
    if dtype.name not in FLOAT_DTYPES:
        raise ValueError(f"quantize needs a float32/bfloat16/float16 weight (as bitsandbytes), got {dtype.name}")
    if len(w.shape) < 2:
        raise ValueError(f"quantize needs a [..., in, out] matrix, got shape {tuple(w.shape)}")
    children = _quantize_jit(w, blocksize, double_quant, quant_type, torch_threads)
    return QuantizedTensor(*children, matrix_shape=tuple(w.shape[-2:]), dtype_name=dtype.name, blocksize=blocksize,
                           quant_type=quant_type, layout=layout_for(w.shape[-2], blocksize))


# ---------------------------------------------------------------- dequantization

def _block_scales(q: QuantizedTensor) -> jax.Array:
    """f32 block absmax in the tensor's layout; with double quantization code * nested absmax + offset, as bnb."""
    if not q.double_quant:
        return q.absmax
    n_in, n_out = q.matrix_shape
    if q.layout == "row":
        per_row = n_in // q.blocksize
        col = lax.broadcasted_iota(jnp.int32, (per_row, n_out), 0)
        row = lax.broadcasted_iota(jnp.int32, (per_row, n_out), 1)
        torch_index = row * per_row + col
        offset = q.offset[..., None, None]
    else:
        torch_index = jnp.arange(q.absmax.shape[-1])
        offset = q.offset[..., None]
    nested = q.nested_absmax[..., torch_index // NESTED_BLOCKSIZE]
    product = jnp.asarray(SIGNED_MAP)[q.absmax] * nested
    # The select keeps LLVM from contracting multiply + add into an FMA: two roundings as bnb, eager or compiled
    # (it only differs from ``product`` for a NaN nested absmax, which no finite weight produces).
    return jnp.where(product == product, product, 0.0) + offset


def _unpack(packed: jax.Array, axis: int) -> jax.Array:
    """Inverse of :func:`_pack`: nibbles back to codes, interleaved along ``axis``."""
    pairs = jnp.stack([packed >> 4, packed & 0xF], axis=axis + 1 if axis >= 0 else axis)
    shape = list(packed.shape)
    shape[axis] *= 2
    return pairs.reshape(shape)


def dequantize(q: QuantizedTensor, dtype=None) -> jax.Array:
    """The weight [..., in, out] in ``dtype`` (default: the original dtype): code * absmax in f32, then cast."""
    dtype = q.dtype if dtype is None else jnp.dtype(dtype)
    code = jnp.asarray(CODES[q.quant_type])
    scales = _block_scales(q)
    n_in, n_out = q.matrix_shape
    lead = q.lead_shape
    if q.layout == "row":
        values = code[_unpack(q.packed, axis=-2)].reshape(*lead, n_in // q.blocksize, q.blocksize, n_out)
        return (values * scales[..., None, :]).reshape(*lead, n_in, n_out).astype(dtype)
    n = n_in * n_out
    nblocks = scales.shape[-1]
    values = code[_unpack(q.packed, axis=-1)]
    values = jnp.pad(values, [(0, 0)] * len(lead) + [(0, nblocks * q.blocksize - values.shape[-1])])
    flat = (values.reshape(*lead, nblocks, q.blocksize) * scales[..., None]).reshape(*lead, -1)[..., :n]
    return jnp.swapaxes(flat.reshape(*lead, n_out, n_in), -1, -2).astype(dtype)


def nbytes(q: QuantizedTensor) -> int:
    """Bytes held by the pytree's arrays (codes + statistics)."""
    return sum(int(leaf.size) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree_util.tree_leaves(q))


def stack(qs: list[QuantizedTensor]) -> QuantizedTensor:
    """Stack per-layer tensors (same shape and options) along a new leading axis, e.g. while loading layer by layer."""
    treedefs = {jax.tree_util.tree_structure(q) for q in qs}
    if len(treedefs) != 1:
        raise ValueError("stack needs QuantizedTensors with identical shape, dtype, blocksize, quant_type and "
                         "double quantization")
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *qs)
