"""Reading and writing ``.safetensors`` files with numpy and ml_dtypes (bf16 included), no torch.

The format is an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}``
and a flat byte buffer. Tensors are read with positioned reads into fresh arrays (not a memory map, whose
touched pages would stay in the process's resident set), so loading a model holds one tensor at a time and
reading rows of a tensor (for sharded loading) reads only those bytes. Every structural problem is reported
with the file name.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxft.errors import JaxftError
from jaxft.files import atomic_file

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(JaxftError, ValueError):
    """A checkpoint file or folder is unusable; the message names the file, tensor or key."""


class SafetensorsFile:
    """A safetensors file: ``keys()``, ``shape(name)``, ``dtype(name)``, ``get(name)``, ``get_rows(name, a, b)``."""

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

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self._entries[name]["dtype"]]

    def get(self, name: str) -> np.ndarray:
        """The whole tensor, read into a new array."""
        return self.get_rows(name, 0, self.shape(name)[0] if self.shape(name) else 1)

    def get_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """``get(name)[start:stop]`` reading only those rows' bytes."""
        e = self._entries[name]
        dtype, shape = DTYPES[e["dtype"]], e["shape"]
        row = int(np.prod(shape[1:], dtype=np.int64)) if shape else 1
        count = (stop - start) * row
        offset = self._data_start + e["data_offsets"][0] + start * row * dtype.itemsize
        with open(self.path, "rb") as f:
            f.seek(offset)
            out = np.fromfile(f, dtype=dtype, count=count)
        if out.size != count:
            raise CheckpointError(f"{self.path}: could not read tensor {name!r} (file changed or truncated)")
        return out.reshape([stop - start, *shape[1:]] if shape else [])


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
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())
