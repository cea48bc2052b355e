"""Plain-Python MMIDIDX reader and writer written from the format spec (struct + numpy only).

Independent of engine.data.indexed: tests use it to check that our C++ writer produces the bytes
the spec prescribes, that our reader accepts exactly the files the spec allows, and that it stands
in for files written by other MMIDIDX tools.
"""
from __future__ import annotations

import struct

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
CODE_TO_DTYPE = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
                 7: np.float32, 8: np.uint16}
DTYPE_TO_CODE = {np.dtype(t): c for c, t in CODE_TO_DTYPE.items()}
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, N, D: 34 bytes


class InvalidDataset(Exception):
    """The files break the spec (the reason is in the message)."""


def index_bytes(dtype, lengths, doc_indices) -> bytes:
    """The .idx bytes for these lengths and document indices."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(lengths, dtype=np.int64)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths):
        pointers[1:] = np.cumsum(lengths[:-1] * dtype.itemsize)
    header = HEADER.pack(MAGIC, 1, DTYPE_TO_CODE[dtype], len(lengths), len(doc_indices))
    return (header + lengths.astype("<i4").tobytes() + pointers.astype("<i8").tobytes()
            + np.asarray(doc_indices, dtype="<i8").tobytes())


def write_dataset(prefix: str, documents, dtype) -> None:
    """documents: list of documents, each a list of sequences (sequences of token ids)."""
    dtype = np.dtype(dtype)
    lengths, doc_indices = [], [0]
    with open(prefix + ".bin", "wb") as f:
        for document in documents:
            for sequence in document:
                array = np.asarray(sequence, dtype=dtype)
                f.write(array.astype(dtype.newbyteorder("<")).tobytes())
                lengths.append(len(array))
            doc_indices.append(len(lengths))
    with open(prefix + ".idx", "wb") as f:
        f.write(index_bytes(dtype, lengths, doc_indices))


def parse(idx: bytes, bin_data: bytes):
    """Validates the pair per spec; returns (dtype, lengths, pointers, doc_indices, sequences)."""
    if len(idx) < HEADER.size:
        raise InvalidDataset("short header")
    magic, version, code, n, d = HEADER.unpack_from(idx, 0)
    if magic != MAGIC:
        raise InvalidDataset("magic")
    if version != 1:
        raise InvalidDataset("version")
    if code not in CODE_TO_DTYPE:
        raise InvalidDataset("dtype code")
    if d < 1 or HEADER.size + 12 * n + 8 * d != len(idx):  # Python ints: no overflow
        raise InvalidDataset("index size")
    dtype = np.dtype(CODE_TO_DTYPE[code]).newbyteorder("<")
    lengths = np.frombuffer(idx, dtype="<i4", count=n, offset=HEADER.size).astype(np.int64)
    pointers = np.frombuffer(idx, dtype="<i8", count=n, offset=HEADER.size + 4 * n).astype(np.int64)
    doc_indices = np.frombuffer(idx, dtype="<i8", count=d, offset=HEADER.size + 12 * n).astype(np.int64)
    if (lengths < 0).any():
        raise InvalidDataset("negative length")
    expected = np.concatenate([[0], np.cumsum(lengths * dtype.itemsize)])
    if not np.array_equal(pointers, expected[:-1]):
        raise InvalidDataset("pointers")
    if int(expected[-1]) != len(bin_data):
        raise InvalidDataset("bin size")
    if doc_indices[0] != 0 or (np.diff(doc_indices) < 0).any() or doc_indices[-1] != n:
        raise InvalidDataset("document indices")
    tokens = np.frombuffer(bin_data, dtype=dtype)
    starts = expected[:-1] // dtype.itemsize
    sequences = [tokens[s:s + ln] for s, ln in zip(starts, lengths)]
    return np.dtype(CODE_TO_DTYPE[code]), lengths, pointers, doc_indices, sequences


def read_dataset(prefix: str):
    with open(prefix + ".idx", "rb") as f:
        idx = f.read()
    with open(prefix + ".bin", "rb") as f:
        bin_data = f.read()
    return parse(idx, bin_data)
