"""Raw safetensors I/O: write tensors from buffers without building the file in
memory, read tensors back as buffers. Atomic writes (temp file + rename)."""

from __future__ import annotations

import json
import mmap
import os
import struct
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

# numpy dtype -> safetensors dtype (little-endian, as safetensors stores them)
_TO_ST = {
    np.dtype("<f8"): "F64",
    np.dtype("<f4"): "F32",
    np.dtype("<f2"): "F16",
    np.dtype("<i8"): "I64",
    np.dtype("<i4"): "I32",
    np.dtype("<i2"): "I16",
    np.dtype("i1"): "I8",
    np.dtype("<u8"): "U64",
    np.dtype("<u4"): "U32",
    np.dtype("<u2"): "U16",
    np.dtype("u1"): "U8",
    np.dtype("?"): "BOOL",
}
_FROM_ST = {v: k for k, v in _TO_ST.items()}


def st_dtype(dt: np.dtype) -> str:
    dt = np.dtype(dt)
    if dt.byteorder == ">":
        raise ValueError(f"big-endian dtype {dt} (convert to little-endian first)")
    code = _TO_ST.get(dt)
    if code is None:
        raise ValueError(f"dtype {dt} has no safetensors equivalent fed-aggregate reads")
    return code


def np_dtype(code: str) -> np.dtype:
    try:
        return _FROM_ST[code]
    except KeyError:
        raise ValueError(f"safetensors dtype {code} is not handled here") from None


def write(
    path: Path | str,
    tensors: Iterable[tuple[str, str, tuple[int, ...], memoryview | bytes]],
    metadata: dict[str, str] | None = None,
    fsync: bool = True,
) -> None:
    """Write (name, st_dtype, shape, raw little-endian C-order bytes) tensors.
    Each buffer is written once, straight from where it lies."""
    tensors = list(tensors)
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    off = 0
    for name, code, shape, buf in tensors:
        n = memoryview(buf).nbytes
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb", buffering=0) as f:
            f.write(struct.pack("<Q", len(h)))
            f.write(h)
            for _, _, _, buf in tensors:
                mv = memoryview(buf).cast("B")
                while mv:
                    mv = mv[f.write(mv) :]
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_json_atomic(path: Path | str, obj) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Reader:
    """A safetensors file mapped read-only: header plus zero-copy views."""

    def __init__(self, path: Path | str):
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            self.header = json.loads(f.read(n))
            self._base = 8 + n
            size = os.fstat(f.fileno()).st_size
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self.metadata = self.header.pop("__metadata__", {}) or {}

    def names(self) -> list[str]:
        return list(self.header)

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        e = self.header[name]
        return e["dtype"], tuple(e["shape"])

    def raw(self, name: str) -> memoryview:
        a, b = self.header[name]["data_offsets"]
        return memoryview(self._mm)[self._base + a : self._base + b]

    def numpy(self, name: str) -> np.ndarray:
        code, shape = self.info(name)
        return np.frombuffer(self.raw(name), dtype=np_dtype(code)).reshape(shape)
