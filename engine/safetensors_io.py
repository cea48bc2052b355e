"""Safetensors files read and written one tensor at a time, and the JSON form of training states.

Why a reader of our own: ``safetensors.safe_open`` maps the file, and the pages it touches stay in
the process's resident memory, so loading a large checkpoint makes memory climb to the file's size.
:func:`read_tensor` uses plain file reads straight into a fresh tensor, so peak memory stays near
one tensor. :class:`SafetensorsWriter` declares the header first and then fills tensors in any
order, so a file larger than memory is written holding one tensor at a time. Files stay readable
and writable by the safetensors library.

:func:`encode_state` / :func:`decode_state` turn RNG states, optimizer states and loader positions
(nested dicts with int keys, tuples, tensors, numpy arrays) into JSON plus optional safetensors
tensors and back, so that nothing in a checkpoint needs unpickling.
"""
from __future__ import annotations

import base64
import json
import os
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

import torch


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, of another model, or inconsistent; names the cause."""


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_CHUNK = 64 << 20
_MAX_HEADER = 100 << 20


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_little_endian() -> None:
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; this machine is not")


class TensorInfo(NamedTuple):
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor names, dtypes, shapes and offsets of a safetensors file, validated against its size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < n <= min(size - 8, _MAX_HEADER):
            raise ValueError(f"{path}: not a safetensors file (header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    infos = {}
    for name, entry in header.items():
        try:
            dtype = _ST_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r}: unsupported or malformed header entry {entry!r}") from None
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if min(shape, default=0) < 0 or begin < 0 or end - begin != nbytes or 8 + n + end > size:
            raise ValueError(f"{path}: tensor {name!r}: offsets {[begin, end]} do not fit "
                             f"{entry['dtype']}{list(shape)} in a file of {size} bytes")
        infos[name] = TensorInfo(dtype, shape, 8 + n + begin, 8 + n + end)
    return infos, metadata


def header_problems(label: str, header: Mapping, expected: Mapping[str, tuple[int, ...]],
                     first: Mapping) -> list[str]:
    """What is wrong with a file's ``header`` (from :func:`read_header`) against the ``expected``
    shapes: missing, unexpected and mis-shaped tensors, and dtypes that differ from ``first`` (the
    header of the same file on TP rank 0), each list prefixed by ``label``."""
    missing = [n for n in expected if n not in header]
    unexpected = sorted(set(header) - set(expected))
    misshaped = [f"{n} {header[n].shape} (expected {s})" for n, s in expected.items()
                 if n in header and header[n].shape != s]
    misshaped += [f"{n} is {header[n].dtype} but {first[n].dtype} on TP rank 0" for n in expected
                  if n in header and n in first and header[n].dtype != first[n].dtype]
    return [f"{label}: {what} {items}" for what, items in (
        ("missing tensor(s)", missing), ("unexpected tensor(s)", unexpected),
        ("mis-shaped tensor(s)", misshaped)) if items]


def read_tensor(path: str | os.PathLike, info: TensorInfo) -> torch.Tensor:
    """Read one tensor straight into a fresh tensor (no mmap, no intermediate copy)."""
    _check_little_endian()
    out = torch.empty(info.shape, dtype=info.dtype)
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    with open(path, "rb", buffering=0) as f:
        f.seek(info.start)
        done = 0
        while done < len(view):
            got = f.readinto(view[done:done + _CHUNK])
            if not got:
                raise ValueError(f"{path}: file ends inside a tensor at byte {info.start + done}")
            done += got
    return out


def read_rows(path: str | os.PathLike, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` (along dimension 0) of one tensor: a contiguous byte range, read alone."""
    if not info.shape or not 0 <= start <= stop <= info.shape[0]:
        raise ValueError(f"{path}: rows {start}:{stop} outside a tensor of shape {list(info.shape)}")
    row_bytes = int(np.prod(info.shape[1:], dtype=np.int64)) * info.dtype.itemsize
    part = TensorInfo(info.dtype, (stop - start,) + tuple(info.shape[1:]),
                      info.start + start * row_bytes, info.start + stop * row_bytes)
    return read_tensor(path, part)


class SafetensorsWriter:
    """A safetensors file whose tensors are declared up front and written one at a time, in any
    order: a file larger than memory is produced holding one tensor at a time.

    Use as a context manager: leaving with an exception deletes the file; leaving normally checks
    that every declared tensor was written, then flushes and fsyncs.
    """

    def __init__(self, path: str | os.PathLike, specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None):
        _check_little_endian()
        self.path = Path(path)
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        self._slots: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        offset = 0
        for name, (dtype, shape) in specs.items():
            if dtype not in _ST_NAMES:
                raise ValueError(f"{self.path}: tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._slots[name] = (dtype, tuple(shape), offset)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data buffer starts 8-byte aligned, as the format recommends
        self._base = 8 + len(raw)
        self.nbytes = offset
        self._pending = set(self._slots)
        self._row_ranges: dict[str, list[tuple[int, int]]] = {}  # tensors written in row blocks so far
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._slots:
            raise ValueError(f"{self.path}: tensor {name!r} was not declared for this file")
        dtype, shape, offset = self._slots[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: tensor {name!r} is {tensor.dtype}{list(tensor.shape)}, "
                             f"declared {dtype}{list(shape)}")
        if name not in self._pending:
            raise ValueError(f"{self.path}: tensor {name!r} written twice")
        self._write_at(self._base + offset, tensor)
        self._pending.discard(name)

    def write_rows(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Write rows ``start : start + len(rows)`` (dimension 0) of a declared tensor; the tensor
        counts as written once its blocks cover every row, each exactly once."""
        if name not in self._slots:
            raise ValueError(f"{self.path}: tensor {name!r} was not declared for this file")
        dtype, shape, offset = self._slots[name]
        stop = start + (rows.shape[0] if rows.dim() else 0)
        if rows.dtype != dtype or not shape or tuple(rows.shape[1:]) != shape[1:] or not 0 <= start <= stop <= shape[0]:
            raise ValueError(f"{self.path}: rows {start}:{stop} of tensor {name!r} given as "
                             f"{rows.dtype}{list(rows.shape)}, declared {dtype}{list(shape)}")
        done = self._row_ranges.setdefault(name, [])
        if name not in self._pending or any(a < stop and start < b for a, b in done):
            raise ValueError(f"{self.path}: rows {start}:{stop} of tensor {name!r} written twice")
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self._write_at(self._base + offset + start * row_bytes, rows)
        done.append((start, stop))
        if sum(b - a for a, b in done) == shape[0]:
            self._pending.discard(name)

    def _write_at(self, position: int, tensor: torch.Tensor) -> None:
        """The bytes of ``tensor`` at file offset ``position``, in chunks (no full-size bytes copy)."""
        data = memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        self._file.seek(position)
        for i in range(0, len(data), _CHUNK):
            self._file.write(data[i:i + _CHUNK])

    def close(self) -> None:
        if self._pending:
            self.abort()
            raise ValueError(f"{self.path}: tensor(s) declared but never written: {sorted(self._pending)}")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ------------------------------------------------------- JSON form of states (RNG, optimizer, loader)
def encode_state(obj: Any, tensors: dict[str, torch.Tensor] | None = None, key: str = "state") -> Any:
    """JSON-able form of nested dicts, lists, tuples, scalars, tensors and numpy arrays.

    Tensors are moved into ``tensors`` under a path-like key when it is given (optimizer moments),
    else inlined as base64 (small things: RNG states). Non-string dict keys and tuples survive.
    """
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        if tensors is not None:
            tensors[key] = t
            return {"__tensor__": key}
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        return {"__tensor_b64__": base64.b64encode(raw).decode(), "dtype": _ST_NAMES[t.dtype], "shape": list(t.shape)}
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        return {"__ndarray__": base64.b64encode(arr.tobytes()).decode(), "dtype": arr.dtype.str, "shape": list(arr.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_state(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_state(v, tensors, f"{key}.{k}") for k, v in obj.items()}
        return {"__items__": [[encode_state(k), encode_state(v, tensors, f"{key}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    raise TypeError(f"cannot store a {type(obj).__name__} (at {key}) in a checkpoint")


def decode_state(obj: Any, tensors: Mapping[str, torch.Tensor] | None = None) -> Any:
    """Inverse of :func:`encode_state`."""
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        if tensors is None or obj["__tensor__"] not in tensors:
            raise CheckpointError(f"state refers to tensor {obj['__tensor__']!r}, absent from its safetensors file")
        return tensors[obj["__tensor__"]]
    if "__tensor_b64__" in obj:
        raw = bytearray(base64.b64decode(obj["__tensor_b64__"]))
        flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        return flat.view(_ST_DTYPES[obj["dtype"]]).reshape(obj["shape"])
    if "__ndarray__" in obj:
        raw = base64.b64decode(obj["__ndarray__"])
        return np.frombuffer(raw, dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
    if "__tuple__" in obj:
        return tuple(decode_state(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {decode_state(k): decode_state(v, tensors) for k, v in obj["__items__"]}
    return {k: decode_state(v, tensors) for k, v in obj.items()}
