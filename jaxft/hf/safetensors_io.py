"""Reading and writing ``.safetensors`` files with numpy and ml_dtypes (bf16 included), no torch.

The format is an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}``
and a flat byte buffer. Files are memory-mapped, so reading one tensor (or one slice of it, for sharded
loading) touches only its bytes. Every structural problem is reported with the file name.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file or folder is unusable; the message names the file, tensor or key."""


class SafetensorsFile:
    """A memory-mapped safetensors file: ``keys()``, ``shape(name)``, ``get(name)``, ``get_slice(name, idx)``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{self.path}: header length {n} does not fit a {size}-byte file (truncated or not safetensors)")
            raw = f.read(n)
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: the safetensors header is not valid JSON ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._entries = header
        data_len = size - self._data_start
        for name, e in header.items():
            if e.get("dtype") not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {e.get('dtype')!r}")
            start, end = e["data_offsets"]
            expected = int(np.prod(e["shape"], dtype=np.int64)) * DTYPES[e["dtype"]].itemsize
            if end - start != expected:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} spans {end - start} bytes but shape {e['shape']} "
                    f"{e['dtype']} needs {expected}")
            if end > data_len:
                raise CheckpointError(
                    f"{self.path}: truncated file: tensor {name!r} ends at byte {end} of a {data_len}-byte buffer")
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r") if header else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self._entries[name]["dtype"]]

    def get(self, name: str) -> np.ndarray:
        """A read-only view of the whole tensor (no copy)."""
        e = self._entries[name]
        start, end = e["data_offsets"]
        raw = self._mmap[self._data_start + start:self._data_start + end]
        return raw.view(DTYPES[e["dtype"]]).reshape(e["shape"])

    def get_slice(self, name: str, index) -> np.ndarray:
        """``get(name)[index]`` copied out; with a memory map only the pages of the slice are read."""
        return np.array(self.get(name)[index])


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict | None = None):
    """Write ``tensors`` atomically (a temporary file renamed into place)."""
    path = Path(path)
    header, offset, arrays = {}, 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in DTYPE_NAMES:
            raise CheckpointError(f"{path}: cannot store tensor {name!r} of dtype {a.dtype}")
        header[name] = {"dtype": DTYPE_NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data buffer 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())
    os.replace(tmp, path)
