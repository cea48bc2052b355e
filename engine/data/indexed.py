"""Memory-mapped indexed dataset, byte-compatible with Megatron-LM's MMIDIDX ``.bin``/``.idx``.

A thin face over the C++ core in ``engine._C``: the reader maps both files once, validates every
header field and array against the file sizes (a corrupt file raises :class:`IndexedDatasetError`,
a ``ValueError``, naming the file and the problem) and hands out zero-copy read-only numpy views;
the builder streams tokens and index entries to disk so memory stays flat however many documents
it writes, and publishes the ``.idx`` only when it is complete.

Layout (little-endian, no padding) of ``<prefix>.idx``: magic ``MMIDIDX\\0\\0``, u64 version 1,
u8 dtype code, u64 number of sequences N, u64 number of document indices D, then int32 lengths[N],
int64 byte pointers[N], int64 document indices[D]. ``<prefix>.bin`` holds the tokens, nothing else.
"""
from __future__ import annotations

import operator
import os
from typing import Any, Iterable

import numpy as np

from engine import _C

IndexedDatasetError = _C.IndexedDatasetError


class _DtypeCodes(dict):
    """numpy dtype -> MMIDIDX code; looks up any spelling of a dtype (np.uint16, "uint16", np.dtype)."""

    def __getitem__(self, key: Any) -> int:
        return super().__getitem__(np.dtype(key).type)

    def __contains__(self, key: Any) -> bool:
        try:
            return super().__contains__(np.dtype(key).type)
        except TypeError:
            return False

    def get(self, key: Any, default: Any = None) -> Any:
        return self[key] if key in self else default


DTYPE_CODES = _DtypeCodes({
    np.uint8: 1,
    np.int8: 2,
    np.int16: 3,
    np.int32: 4,
    np.int64: 5,
    np.float64: 6,
    np.float32: 7,
    np.uint16: 8,
})


def best_dtype(vocab_size: int | None) -> type:
    """Smallest token dtype for a vocabulary (Megatron's rule): uint16 under 65500 ids, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def index_file_path(prefix: str | os.PathLike) -> str:
    return os.fspath(prefix) + ".idx"


def data_file_path(prefix: str | os.PathLike) -> str:
    return os.fspath(prefix) + ".bin"


class IndexedDataset:
    """Read-only MMIDIDX dataset: ``len(ds)`` sequences, ``ds[i]`` a zero-copy numpy view.

    Views are read-only and keep the memory map alive on their own, so they stay valid after the
    dataset object is dropped. Pickling sends only the prefix; the worker re-maps (and re-validates)
    the files. The files must not be truncated while mapped (the OS would signal the process).
    """

    def __init__(self, prefix: str | os.PathLike):
        self._prefix = os.fspath(prefix)
        self._reader = _C.IndexedReader(index_file_path(self._prefix), data_file_path(self._prefix))

    @staticmethod
    def exists(prefix: str | os.PathLike) -> bool:
        return os.path.isfile(index_file_path(prefix)) and os.path.isfile(data_file_path(prefix))

    def __len__(self) -> int:
        return len(self._reader)

    def __getitem__(self, index: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self._reader))
            if step != 1:
                raise ValueError(f"slices of an IndexedDataset must have step 1, got {index.step}")
            return [self._reader.get(i) for i in range(start, stop)]
        try:
            position = operator.index(index)
        except TypeError:
            raise TypeError(f"IndexedDataset indices must be integers or slices, not {type(index).__name__}") from None
        return self._reader.get(_int64("sequence index", position))

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``index`` (to its end when length is None)."""
        return self._reader.get(_int64("sequence index", index), _int64("offset", offset),
                                None if length is None else _int64("length", length))

    @property
    def sequence_lengths(self) -> np.ndarray:
        """int32 token count of every sequence (aligned read-only copy of the .idx array)."""
        return self._reader.sequence_lengths

    @property
    def sequence_pointers(self) -> np.ndarray:
        """int64 byte offset of every sequence in the .bin."""
        return self._reader.sequence_pointers

    @property
    def document_indices(self) -> np.ndarray:
        """int64 sequence boundaries of the documents: 0, then each document's exclusive end."""
        return self._reader.document_indices

    def get_document_indices(self) -> np.ndarray:
        """Megatron-LM's accessor name for :attr:`document_indices`."""
        return self._reader.document_indices

    @property
    def dtype(self) -> np.dtype:
        return self._reader.dtype

    @property
    def num_tokens(self) -> int:
        return self._reader.num_tokens

    @property
    def num_documents(self) -> int:
        return self._reader.num_documents

    @property
    def prefix(self) -> str:
        return self._prefix

    def __getstate__(self) -> dict:
        return {"prefix": self._prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    def __repr__(self) -> str:
        return (f"IndexedDataset({self._prefix!r}, sequences={len(self)}, documents={self.num_documents}, "
                f"tokens={self.num_tokens}, dtype={self.dtype})")


def _int64(what: str, value: Any) -> int:
    """An index argument as a Python int; one beyond int64 is out of range like any other."""
    value = operator.index(value)
    if not -(2 ** 63) <= value < 2 ** 63:
        raise IndexError(f"{what} {value} out of range")
    return value


def _token_array(tokens: Any, dtype: np.dtype) -> np.ndarray:
    """One sequence as a flat, contiguous, native-endian numpy array the C++ writer accepts."""
    if type(tokens) is np.ndarray and tokens.ndim == 1 and tokens.flags.c_contiguous \
            and tokens.dtype.kind in "iu" and tokens.dtype.isnative:
        return tokens  # the common case, checked and converted in C++
    if type(tokens).__module__.split(".")[0] == "torch" and hasattr(tokens, "detach"):
        tokens = tokens.detach().cpu().numpy()
    array = np.asarray(tokens)
    if array.dtype.kind == "f" and not isinstance(tokens, np.ndarray):
        # numpy turns a list mixing ints >= 2**63 with others into (rounded) floats: keep them exact.
        exact = np.array(tokens, dtype=object)
        if all(isinstance(v, (int, np.integer)) for v in exact.reshape(-1)):
            array = exact
    if array.dtype.kind == "b":
        array = array.astype(np.uint8)
    elif array.dtype.kind == "f" and array.dtype.itemsize < 4:
        array = array.astype(np.float32)
    elif array.dtype.kind == "O":
        array = _object_tokens(array, dtype)
    elif array.dtype.kind not in "iuf":
        raise TypeError(f"token ids must be numbers, got numpy dtype {array.dtype}")
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return np.ascontiguousarray(array.reshape(-1))


def _object_tokens(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Python ints too large for int64 end up as objects: name the first one that does not fit."""
    limits = np.iinfo(dtype) if dtype.kind in "iu" else None
    for value in array.reshape(-1):
        if not isinstance(value, (int, np.integer)):
            raise TypeError(f"token ids must be integers, got {value!r} ({type(value).__name__})")
        if limits is not None and not limits.min <= int(value) <= limits.max:
            raise ValueError(f"token id {int(value)} does not fit the dataset dtype {dtype.name} "
                             f"(range {limits.min}..{limits.max})")
        if limits is None and not _exact_float64(int(value)):
            # float64 is the carrier to the C++ writer: it must hold the value exactly (the writer
            # then checks float32 datasets itself).
            raise ValueError(f"token id {int(value)} does not fit the dataset dtype {dtype.name} "
                             "(not exactly representable)")
    return array.astype(np.float64 if limits is None else dtype)


def _exact_float64(value: int) -> bool:
    try:
        return float(value) == value  # int/float comparison in Python is exact
    except OverflowError:
        return False


class IndexedDatasetBuilder:
    """Streaming MMIDIDX writer with Megatron-LM's method names.

    Tokens go to a temporary file beside ``bin_path``; ``finalize(idx_path)`` writes the index,
    fsyncs, removes any old ``idx_path`` and renames the new .bin then the new .idx into place. A
    builder that is abandoned, aborted or leaves a ``with`` block by an exception writes no .idx
    (and removes its temporary .bin). A ``with`` block left normally finalizes to the .idx beside
    the .bin. Token ids that the dtype cannot hold exactly are refused before anything is written.
    """

    def __init__(self, bin_path: str | os.PathLike, dtype: Any = np.int32, multimodal: bool = False):
        if multimodal:
            raise NotImplementedError("multimodal datasets (sequence modes) are not supported")
        self._dtype = np.dtype(dtype)
        if self._dtype not in DTYPE_CODES:
            raise ValueError(f"unsupported token dtype {self._dtype}; supported: "
                             + ", ".join(np.dtype(t).name for t in DTYPE_CODES))
        self._bin_path = os.fspath(bin_path)
        self._writer = _C.IndexedWriter(self._bin_path, DTYPE_CODES[self._dtype])

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def num_sequences(self) -> int:
        return self._writer.num_sequences

    @property
    def num_documents(self) -> int:
        return self._writer.num_documents

    def add_item(self, tokens: Any, mode: int = 0) -> None:
        """Appends one sequence (list, numpy array or torch tensor of token ids).

        ``mode`` is Megatron-LM's multimodal sequence mode: only the text mode 0 is supported.
        """
        if mode != 0:
            raise NotImplementedError(f"multimodal sequence mode {mode} is not supported (only 0)")
        self._writer.add_item(_token_array(tokens, self._dtype))

    def end_document(self) -> None:
        """Closes the current document after the sequences added since the previous one."""
        self._writer.end_document()

    def add_document(self, tokens: Any, lengths: Iterable[int], modes: Any = None) -> None:
        """Appends one document made of ``len(lengths)`` sequences whose tokens are concatenated."""
        if modes is not None:
            raise NotImplementedError("multimodal sequence modes are not supported")
        self._writer.add_document(_token_array(tokens, self._dtype), np.asarray(lengths, dtype=np.int64).reshape(-1))

    def add_index(self, path_prefix: str | os.PathLike) -> None:
        """Appends every document of the dataset at ``path_prefix`` (same dtype required)."""
        self._writer.add_index(index_file_path(path_prefix), data_file_path(path_prefix))

    def finalize(self, idx_path: str | os.PathLike) -> None:
        """Writes the index and publishes both files; open trailing sequences form a last document."""
        self._writer.finalize(os.fspath(idx_path))

    def abort(self) -> None:
        """Drops everything written so far; no .idx appears."""
        self._writer.abort()

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, traceback) -> bool:
        if exc_type is not None:
            self.abort()
            return False
        if not self._writer.finalized:
            if not self._bin_path.endswith(".bin"):
                self.abort()
                raise ValueError(f"builder for {self._bin_path} left without finalize(idx_path) and its "
                                 "path does not end in .bin to infer one; nothing was written")
            self.finalize(self._bin_path[: -len(".bin")] + ".idx")
        return False
