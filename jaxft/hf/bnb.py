"""bitsandbytes' 4-bit weights as transformers saves them: one ``Linear4bit`` weight as a dict of tensors.

Keys (any prefix; ``weight`` by default): the packed codes in torch layout, ``.absmax``, ``.quant_map``, with
double quantization ``.nested_absmax`` and ``.nested_quant_map``, and ``.quant_state.bitsandbytes__{nf4,fp4}``, the
JSON of bnb's ``QuantState.as_dict(packed=True)`` for the non-tensor fields, stored as uint8 bytes. The quantization
itself (codes, layouts, double quantization) is :mod:`jaxft.ops.nf4`'s.
"""
from __future__ import annotations

import json
from typing import Optional

import jax.numpy as jnp
import numpy as np

from jaxft.ops import nf4
from jaxft.ops.dynamic_map import SIGNED_MAP

__all__ = ["BNB_SUFFIXES", "from_bnb", "to_bnb"]

# What bnb stores beside a 4-bit weight (the packed codes keep the weight's own name).
BNB_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")


def _quant_state_key(quant_type: str) -> str:
    return f"quant_state.bitsandbytes__{quant_type}"


def to_bnb(q: nf4.QuantizedTensor, prefix: str = "weight") -> dict[str, np.ndarray]:
    """One matrix as transformers saves a bnb ``Linear4bit`` weight (torch layout, fresh numpy arrays, uint8 storage).

    Keys ``{prefix}``, ``.absmax``, ``.quant_map``, with double quantization ``.nested_absmax`` and
    ``.nested_quant_map``, and ``.quant_state.bitsandbytes__{nf4,fp4}``: the JSON bnb's
    ``QuantState.as_dict(packed=True)`` writes for the non-tensor fields, as uint8 bytes.
    """
    if q.lead_shape:
        raise ValueError(f"to_bnb takes one matrix; this tensor has leading dims {q.lead_shape} (index it first)")
    n_in, n_out = q.matrix_shape
    packed = np.array(q.packed)
    if q.layout == "row":
        packed = packed.T
    out = {prefix: packed.reshape(-1, 1),
           f"{prefix}.absmax": np.array(nf4.torch_order(q.absmax, q.layout)),
           f"{prefix}.quant_map": nf4.CODES[q.quant_type].copy()}
    state = {"quant_type": q.quant_type, "blocksize": q.blocksize, "dtype": q.dtype_name, "shape": [n_out, n_in]}
    if q.double_quant:
        out[f"{prefix}.nested_absmax"] = np.array(q.nested_absmax)
        out[f"{prefix}.nested_quant_map"] = SIGNED_MAP.copy()
        state.update(nested_blocksize=nf4.NESTED_BLOCKSIZE, nested_dtype="float32",
                     nested_offset=float(np.asarray(q.offset)))
    out[f"{prefix}.{_quant_state_key(q.quant_type)}"] = np.frombuffer(json.dumps(state).encode(), np.uint8).copy()
    return out


def _read_quant_state(tensors: dict) -> tuple[str, dict]:
    """(key prefix, decoded JSON) of the single packed quant-state entry."""
    keys = [k for k in tensors if any(k.endswith(_quant_state_key(t)) for t in nf4.QUANT_TYPES)]
    if len(keys) != 1:
        raise ValueError(f"expected exactly one '*.quant_state.bitsandbytes__nf4|fp4' entry, found {keys}")
    key = keys[0]
    prefix = key[: -len(_quant_state_key("nf4"))].rstrip(".")
    return prefix, json.loads(_raw_bytes(tensors[key]).tobytes().decode("utf-8"))


def _raw_bytes(x) -> np.ndarray:
    """The array's bytes as uint8 (bnb may store packed codes in any ``bnb_4bit_quant_storage`` dtype)."""
    return np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8)


def _check_code(tensors: dict, key: str, expected: np.ndarray) -> None:
    if key in tensors and not np.array_equal(np.asarray(tensors[key], np.float32), expected):
        raise ValueError(f"{key} is not bitsandbytes' standard code book; only the standard ones are supported")


def from_bnb(tensors: dict, shape_out_in: Optional[tuple[int, int]] = None) -> nf4.QuantizedTensor:
    """A bnb/transformers 4-bit weight dict (as :func:`to_bnb` writes, any key prefix) as a JAX-layout tensor.

    The packed JSON gives shape, dtype, blocksize and quant_type; ``shape_out_in`` (torch order) is only needed when
    the JSON has no shape, and must agree with it otherwise.
    """
    prefix, state = _read_quant_state(tensors)
    quant_type, blocksize = state["quant_type"], int(state["blocksize"])
    nf4.check_options(blocksize, quant_type)
    shape = state.get("shape") or shape_out_in
    if shape is None or len(shape) != 2:
        raise ValueError(f"need a 2-D [out, in] shape, quant state has {state.get('shape')!r}")
    if shape_out_in is not None and tuple(shape) != tuple(shape_out_in):
        raise ValueError(f"shape_out_in {tuple(shape_out_in)} disagrees with the quant state's {tuple(shape)}")
    if state["dtype"] not in nf4.FLOAT_DTYPES:
        raise ValueError(f"unsupported original dtype {state['dtype']!r}")
    n_out, n_in = (int(s) for s in shape)
    _check_code(tensors, f"{prefix}.quant_map", nf4.CODES[quant_type])
    layout = nf4.layout_for(n_in, blocksize)
    packed = _raw_bytes(tensors[prefix])[: -(-n_in * n_out // 2)]
    absmax = np.asarray(tensors[f"{prefix}.absmax"]).reshape(-1)
    nested = offset = None
    if f"{prefix}.nested_absmax" in tensors:
        if int(state["nested_blocksize"]) != nf4.NESTED_BLOCKSIZE:
            raise ValueError(f"nested_blocksize must be {nf4.NESTED_BLOCKSIZE}, got {state['nested_blocksize']}")
        _check_code(tensors, f"{prefix}.nested_quant_map", SIGNED_MAP)
        nested = jnp.asarray(np.asarray(tensors[f"{prefix}.nested_absmax"], np.float32).reshape(-1))
        offset = jnp.asarray(np.float32(state["nested_offset"]))
        absmax = absmax.astype(np.uint8)
    else:
        absmax = absmax.astype(np.float32)
    if layout == "row":
        packed = packed.reshape(n_out, n_in // 2).T
        absmax = absmax.reshape(n_out, n_in // blocksize).T
    return nf4.QuantizedTensor(jnp.asarray(packed), jnp.asarray(absmax), nested, offset, matrix_shape=(n_in, n_out),
                               dtype_name=state["dtype"], blocksize=blocksize, quant_type=quant_type, layout=layout)
