"""GPT samples over an indexed dataset, weighted blending of several datasets, and their disk cache.

The index arrays are built in C++ (``engine._C``); this text is their specification, precise enough
for a plain-Python version to reproduce every array bit for bit. All integers are int64 and all
arithmetic on 64-bit words is modulo 2**64.

PRNG (SplitMix64)
    ``mix64(z)``: ``z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9; z = (z ^ (z >> 27)) * 0x94D049BB133111EB;
    return z ^ (z >> 31)``. A generator has a 64-bit state; ``next()`` does
    ``state += 0x9E3779B97F4A7C15`` and returns ``mix64(state)``. The generator for
    ``(seed, stream, epoch)`` starts from ``state = mix64(mix64(mix64(seed) + stream) + epoch)``.
    Streams: 1 = document order, 2 = sample shuffle.
    ``below(n)`` (n >= 1, Lemire): ``m = next() * n`` as a 128-bit product; while
    ``m mod 2**64 < (2**64 - n) mod n``, draw again; return ``m >> 64``.
    ``shuffle(a, rng)`` (Fisher-Yates): for ``i = len(a)-1`` down to 1: swap ``a[i]`` and
    ``a[rng.below(i + 1)]``.

Documents
    Document d is the tokens of sequences ``document_indices[d]`` to ``document_indices[d+1]-1``;
    its token count is the sum of their ``sequence_lengths`` (zero is allowed). ``document_ids``
    (default: every document, ascending) is the list of documents used, in the given order.

Document order (``order``)
    For epoch ``e = 0 .. E-1``: a copy of ``document_ids`` shuffled with the generator
    ``(seed, 1, e)``; the E blocks are concatenated (length ``E * len(document_ids)``).

Sample boundaries (``boundaries``)
    The order defines a token stream (each document's tokens in turn) of ``E * T`` tokens, T being
    the token count of ``document_ids``. ``N = (E*T - 1) // seq_length`` samples; sample k is the
    stream positions ``[k*seq_length, k*seq_length + seq_length + 1)``, so consecutive samples share
    one token. ``boundaries`` has ``N + 1`` rows; row k is ``(i, offset)`` where i is the position in
    ``order`` of the document holding stream token ``k*seq_length`` (zero-length documents hold
    none) and offset is that token's index within the document. Sample k runs from row k to row
    k+1, both ends included.

Sample order (``shuffle``)
    ``0 .. N-1`` where ``[0, head)`` is shuffled with the generator ``(seed, 2, 0)`` and
    ``[head, N)`` with ``(seed, 2, 1)``. With ``num_epochs`` given, ``head = N`` and E is that
    number. With ``num_samples`` given, E is the smallest number of epochs with
    ``(E*T - 1) // seq_length >= num_samples``, ``head = max(0, ((E-1)*T - 1) // seq_length)`` (the
    samples that lie wholly in the first E-1 epochs, so every document is seen E-1 times before the
    partial last epoch starts), and the dataset shows the first ``num_samples`` entries.

Blending
    Weights are divided by their sum (summed in order). ``m = max(2, number of positive weights)``,
    ``floor = 1 / (2m - 2)``, ``sigma = 1 - floor``. At step ``i = 0 .. size-1``, with ``t = i + 1``
    and ``count[d]`` the samples taken from d so far, ``deficit[d] = w[d] * t - count[d]``. Among
    the d with ``deficit[d] >= floor`` choose the smallest ``(count[d] + sigma) / w[d]`` (the step
    at which its deficit would pass sigma); if there is none (only possible through rounding) choose
    the largest deficit; ties go to the lowest d. Record ``(d, count[d])`` and add one to
    ``count[d]``. All float64, each product, difference and quotient rounded on its own. This is
    Tijdeman's chairman-assignment rule: ``|count[d] - w[d] * t| <= 1 - 1/(2m - 2) < 1`` at every
    step, where choosing the largest deficit alone drifts past one sample with four or more
    datasets.

Cache
    With a ``cache_dir`` the arrays are saved as ``<key>-<name>.npy`` plus ``<key>.json`` (inputs,
    and per array its dtype, shape, file size and a sampled sha256), each written to a temporary
    file then renamed, the JSON last. The key is the sha256 of the algorithm version and of every
    input the arrays depend on. Ranks that share a cache directory may build at once: they write
    identical bytes, and every rename is atomic.

    Loading checks each file cheaply, because every rank loads the index at start-up and the arrays
    of a 10B-token dataset are gigabytes: the ``.npy`` header (dtype, shape), the file size, and the
    sha256 of the file's first and last ``FINGERPRINT_SLICE`` bytes (1 MiB each; a file of up to
    2 MiB is thus hashed whole). A missing, truncated, extended, re-shaped or foreign file, or one
    altered near either end, fails the check and the index is rebuilt. The trade-off: a byte altered
    in the middle of a file larger than 2 MiB, with size and header intact, is not detected; the
    files are written atomically and only by this module, so such damage means a failing disk,
    which the full sha256 per start-up would not be worth guarding against.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from engine import _C
from engine.fileio import atomic_open

ALGORITHM_VERSION = "ltu-gpt-sample-index/1"
BLEND_VERSION = "ltu-tijdeman-blend/1"

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Pure index construction
# --------------------------------------------------------------------------------------------

def sequence_starts(sequence_lengths: np.ndarray) -> np.ndarray:
    """Token position of each sequence in the concatenation of all sequences, plus the total."""
    lengths = np.asarray(sequence_lengths)
    if lengths.ndim != 1:
        raise ValueError(f"sequence_lengths must be one-dimensional, got shape {lengths.shape}")
    if lengths.size and int(lengths.min()) < 0:
        raise ValueError(f"sequence_lengths holds a negative length at index {int(lengths.argmin())}")
    starts = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, dtype=np.int64, out=starts[1:])
    return starts


def document_token_counts(sequence_lengths: np.ndarray, document_indices: np.ndarray,
                          starts: np.ndarray | None = None) -> np.ndarray:
    """Tokens per document: the summed lengths of its sequences (int64). ``starts``, if given, is
    ``sequence_starts(sequence_lengths)`` already computed."""
    starts = sequence_starts(sequence_lengths) if starts is None else starts
    docs = np.asarray(document_indices, dtype=np.int64)
    n_seq = starts.size - 1
    if docs.ndim != 1 or docs.size < 1 or docs[0] != 0 or docs[-1] != n_seq:
        raise ValueError(f"document_indices must start at 0 and end at the number of sequences "
                         f"({n_seq}); got {docs.size} entries")
    if np.any(np.diff(docs) < 0):
        raise ValueError(f"document_indices decrease at index {int(np.argmax(np.diff(docs) < 0))}")
    return starts[docs[1:]] - starts[docs[:-1]]


def epochs_for_samples(num_samples: int, tokens_per_epoch: int, seq_length: int) -> int:
    """Smallest E with (E*T - 1) // seq_length >= num_samples."""
    if tokens_per_epoch < 1:
        raise ValueError("the selected documents hold no tokens")
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


@dataclass(frozen=True)
class GPTSampleIndex:
    order: np.ndarray       # (E * len(document_ids),) document ids
    boundaries: np.ndarray  # (N + 1, 2) rows of (position in order, offset in document)
    shuffle: np.ndarray     # (N,) sample ids in the order they are served


@dataclass(frozen=True)
class IndexPlan:
    """What the arrays depend on beyond the document counts and ids: epochs and shuffle split."""
    seq_length: int
    seed: int
    num_epochs: int
    head: int | None  # None: head = N (one shuffled block)
    num_samples: int | None  # samples shown; None: all N

    @staticmethod
    def make(tokens_per_epoch: int, seq_length: int, seed: int, num_samples: int | None,
             num_epochs: int | None) -> "IndexPlan":
        if not isinstance(seq_length, (int, np.integer)) or seq_length < 1:
            raise ValueError(f"seq_length must be an integer >= 1, got {seq_length!r}")
        if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        if num_samples is not None and num_epochs is not None:
            raise ValueError("give num_samples or num_epochs, not both")
        if tokens_per_epoch < 1:
            raise ValueError("the selected documents hold no tokens")
        if num_samples is not None:
            if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
                raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
            epochs = epochs_for_samples(int(num_samples), tokens_per_epoch, int(seq_length))
            head = max(0, ((epochs - 1) * tokens_per_epoch - 1) // int(seq_length))
            return IndexPlan(int(seq_length), int(seed), epochs, head, int(num_samples))
        epochs = 1 if num_epochs is None else num_epochs
        if not isinstance(epochs, (int, np.integer)) or epochs < 1:
            raise ValueError(f"num_epochs must be an integer >= 1, got {num_epochs!r}")
        return IndexPlan(int(seq_length), int(seed), int(epochs), None, None)


def build_gpt_sample_index(counts: np.ndarray, document_ids: np.ndarray, plan: IndexPlan
                           ) -> GPTSampleIndex:
    """The three index arrays for documents `document_ids` with token counts `counts` (by id)."""
    order = _C.document_order(document_ids, counts.size, plan.num_epochs, plan.seed)
    boundaries = _C.sample_boundaries(order, counts, plan.seq_length)
    n = boundaries.shape[0] - 1
    shuffle = _C.sample_shuffle(n, n if plan.head is None else plan.head, plan.seed)
    return GPTSampleIndex(order, boundaries, shuffle)


# --------------------------------------------------------------------------------------------
# Disk cache
# --------------------------------------------------------------------------------------------

def hash_inputs(fields: Sequence[tuple[str, Any]]) -> str:
    """sha256 over named fields; arrays by their little-endian int64/float64 bytes and shape."""
    h = hashlib.sha256()
    for name, value in fields:
        h.update(name.encode() + b"\0")
        if isinstance(value, np.ndarray):
            dtype = "<f8" if value.dtype.kind == "f" else "<i8"
            data = np.ascontiguousarray(value, dtype=dtype)
            h.update(f"array:{dtype}:{data.shape}".encode() + b"\0")
            h.update(memoryview(data).cast("B"))
        else:
            h.update(json.dumps(value, sort_keys=True).encode() + b"\0")
    return h.hexdigest()


FINGERPRINT_SLICE = 1 << 20  # bytes hashed at each end of a cached file


def file_fingerprint(path: str) -> dict[str, Any]:
    """Size of the file and sha256 of its first and last FINGERPRINT_SLICE bytes (each byte once)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(f.read(min(size, FINGERPRINT_SLICE)))
        if size > FINGERPRINT_SLICE:
            f.seek(max(FINGERPRINT_SLICE, size - FINGERPRINT_SLICE))
            h.update(f.read())
    return {"file_size": size, "sampled_sha256": h.hexdigest()}


def save_cached_arrays(cache_dir: str, key: str, arrays: dict[str, np.ndarray],
                       description: dict[str, Any]) -> None:
    os.makedirs(cache_dir, exist_ok=True)
    checks = {}
    for name, array in arrays.items():
        path = os.path.join(cache_dir, f"{key}-{name}.npy")
        with atomic_open(path, "wb") as f:
            np.save(f, array, allow_pickle=False)
        checks[name] = {"dtype": str(array.dtype), "shape": list(array.shape), **file_fingerprint(path)}
    meta = json.dumps({"key": key, "inputs": description, "arrays": checks}, indent=1).encode()
    with atomic_open(os.path.join(cache_dir, f"{key}.json"), "wb") as f:
        f.write(meta)


def load_cached_arrays(cache_dir: str, key: str, names: Sequence[str]) -> dict[str, np.ndarray] | None:
    """The cached arrays for `key` (memory-mapped, read-only), or None if any is missing or fails the
    header, size and sampled-hash check described in the module docstring."""
    meta_path = os.path.join(cache_dir, f"{key}.json")
    if not os.path.exists(meta_path):
        return None
    try:
        with open(meta_path, "rb") as f:
            checks = json.loads(f.read())["arrays"]
        arrays = {}
        for name in names:
            path = os.path.join(cache_dir, f"{key}-{name}.npy")
            want = checks[name]
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            if str(array.dtype) != want["dtype"] or list(array.shape) != want["shape"]:
                raise ValueError(f"{path} header says {array.dtype}{list(array.shape)}, "
                                 f"recorded {want['dtype']}{want['shape']}")
            got = file_fingerprint(path)
            if got["file_size"] != want["file_size"]:
                raise ValueError(f"{path} has {got['file_size']} bytes, recorded {want['file_size']}")
            if got["sampled_sha256"] != want["sampled_sha256"]:
                raise ValueError(f"{path} does not match its recorded checksum")
            arrays[name] = array
        return arrays
    except (OSError, ValueError, KeyError, TypeError, EOFError) as err:
        logger.warning("sample-index cache %s in %s is unusable (%s); rebuilding", key, cache_dir, err)
        return None


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------

class GPTSampleDataset:
    """Samples of ``seq_length + 1`` tokens (np.int64) from an indexed dataset, shuffled.

    ``indexed`` needs ``sequence_lengths``, ``document_indices``, ``get(i, offset, length)`` and
    ``prefix``. Give ``num_samples`` (the length you need; epochs are added to reach it) or
    ``num_epochs`` (default 1). ``document_ids`` restricts the documents (a train/valid split).
    ``loaded_from_cache`` tells whether the index came from ``cache_dir``.
    """

    _ARRAYS = ("order", "boundaries", "shuffle")

    def __init__(self, indexed, seq_length: int, seed: int, num_samples: int | None = None,
                 num_epochs: int | None = None, cache_dir: str | None = None,
                 document_ids: Sequence[int] | np.ndarray | None = None):
        self.indexed = indexed
        name = getattr(indexed, "prefix", "<indexed dataset>")
        self._sequence_starts = sequence_starts(indexed.sequence_lengths)
        self._document_indices = np.ascontiguousarray(indexed.document_indices, dtype=np.int64)
        counts = document_token_counts(indexed.sequence_lengths, self._document_indices,
                                       self._sequence_starts)
        ids = self._check_document_ids(document_ids, counts.size, name)
        tokens = int(counts.sum() if document_ids is None else counts[ids].sum())
        if tokens < 1:
            raise ValueError(f"{name}: the {ids.size} selected documents hold no tokens")
        self.plan = IndexPlan.make(tokens, seq_length, seed, num_samples, num_epochs)
        self.seq_length = self.plan.seq_length
        self.cache_key = hash_inputs([
            ("version", ALGORITHM_VERSION), ("document_token_counts", counts),
            ("document_ids", ids if document_ids is not None else "all"),
            ("seq_length", self.plan.seq_length), ("seed", self.plan.seed),
            ("num_epochs", self.plan.num_epochs), ("head", self.plan.head),
        ])
        arrays = load_cached_arrays(cache_dir, self.cache_key, self._ARRAYS) if cache_dir else None
        self.loaded_from_cache = arrays is not None
        if arrays is None:
            index = build_gpt_sample_index(counts, ids, self.plan)
            arrays = {"order": index.order, "boundaries": index.boundaries, "shuffle": index.shuffle}
            if cache_dir:
                save_cached_arrays(cache_dir, self.cache_key, arrays, {
                    "prefix": str(name), "num_documents": int(ids.size), "tokens_per_epoch": tokens,
                    "seq_length": self.plan.seq_length, "seed": self.plan.seed,
                    "num_epochs": self.plan.num_epochs, "head": self.plan.head,
                    "version": ALGORITHM_VERSION})
        self.index = GPTSampleIndex(arrays["order"], arrays["boundaries"], arrays["shuffle"])
        total = self.index.shuffle.shape[0]
        self._length = total if self.plan.num_samples is None else self.plan.num_samples
        if self._length > total:  # guarded by epochs_for_samples; a failure here is a bug
            raise RuntimeError(f"index holds {total} samples, fewer than {self._length} requested")

    @staticmethod
    def _check_document_ids(document_ids, num_documents: int, name: str) -> np.ndarray:
        if document_ids is None:
            return np.arange(num_documents, dtype=np.int64)
        ids = np.asarray(document_ids)
        if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
            raise ValueError(f"{name}: document_ids must be a non-empty 1-D integer sequence")
        ids = ids.astype(np.int64)
        bad = (ids < 0) | (ids >= num_documents)
        if bad.any():
            raise ValueError(f"{name}: document_ids[{int(np.argmax(bad))}] = {int(ids[bad][0])} "
                             f"is not a document id in [0, {num_documents})")
        if np.unique(ids).size != ids.size:
            raise ValueError(f"{name}: document_ids holds duplicates")
        return ids

    def __len__(self) -> int:
        return self._length

    def _sample_id(self, k: int) -> int:
        k = int(k)
        if k < 0:
            k += self._length
        if not 0 <= k < self._length:
            raise IndexError(f"sample {k} is out of range for {self._length} samples")
        return int(self.index.shuffle[k])

    def sample_span(self, k: int) -> np.ndarray:
        """(pieces, 3) int64 rows (sequence, offset, length) whose tokens, in turn, make sample k.

        A per-token dataset with the same sequence lengths (for example a loss mask) read with
        these pieces lines up with ``self[k]`` token for token.
        """
        return _C.sample_pieces(self.index.order, self.index.boundaries, self._document_indices,
                                self._sequence_starts, self._sample_id(k))

    def __getitem__(self, k: int) -> np.ndarray:
        pieces = self.sample_span(k)
        parts = [np.asarray(self.indexed.get(int(s), int(o), int(n))) for s, o, n in pieces]
        tokens = np.concatenate(parts).astype(np.int64, copy=False)
        if tokens.shape != (self.seq_length + 1,):
            raise RuntimeError(f"sample {k} has {tokens.shape[0]} tokens, expected "
                               f"{self.seq_length + 1}: the indexed dataset returned wrong lengths")
        return tokens


def blended_sample_counts(weights: Sequence[float], size: int) -> np.ndarray:
    """How many samples the blend of `size` takes from each dataset (size each member this big)."""
    dataset_index, _ = _C.blending_indices(np.asarray(weights, dtype=np.float64), int(size))
    return np.bincount(dataset_index, minlength=len(weights)).astype(np.int64)


class BlendedDataset:
    """``size`` samples drawn from ``datasets`` in proportion to ``weights`` (deterministic).

    Each member must hold at least the samples the blend takes from it
    (``blended_sample_counts(weights, size)``); members keep their own shuffled order.
    """

    _ARRAYS = ("dataset_index", "dataset_sample_index")

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int, *,
                 cache_dir: str | None = None):
        self.datasets = list(datasets)
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or w.size != len(self.datasets) or w.size == 0:
            raise ValueError(f"need one weight per dataset: {len(self.datasets)} datasets, "
                             f"weights of shape {w.shape}")
        if not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"size must be an integer >= 1, got {size!r}")
        self.size = int(size)
        self.cache_key = hash_inputs(
            [("version", BLEND_VERSION), ("weights", w), ("size", self.size)]
            + [(f"member{d}", getattr(ds, "cache_key", f"{type(ds).__name__}:{len(ds)}"))
               for d, ds in enumerate(self.datasets)])
        arrays = load_cached_arrays(cache_dir, self.cache_key, self._ARRAYS) if cache_dir else None
        self.loaded_from_cache = arrays is not None
        if arrays is None:
            dataset_index, sample_index = _C.blending_indices(w, self.size)
            arrays = {"dataset_index": dataset_index, "dataset_sample_index": sample_index}
            if cache_dir:
                save_cached_arrays(cache_dir, self.cache_key, arrays,
                                   {"weights": w.tolist(), "size": self.size, "version": BLEND_VERSION})
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        taken = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for d, ds in enumerate(self.datasets):
            if taken[d] > len(ds):
                raise ValueError(f"the blend takes {int(taken[d])} samples from dataset {d} "
                                 f"({getattr(getattr(ds, 'indexed', None), 'prefix', type(ds).__name__)}) "
                                 f"which has {len(ds)}; build it with num_samples >= {int(taken[d])}")

    def __len__(self) -> int:
        return self.size

    def sample_source(self, i: int) -> tuple[int, int]:
        """(dataset id, index within that dataset) of blended sample i."""
        i = int(i)
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(f"sample {i} is out of range for {self.size} samples")
        return int(self.dataset_index[i]), int(self.dataset_sample_index[i])

    def __getitem__(self, i: int) -> np.ndarray:
        d, j = self.sample_source(i)
        return self.datasets[d][j]
