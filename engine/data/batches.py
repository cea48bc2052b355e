"""Training samples for continued pre-training (CT) and supervised fine-tuning (SFT), and the loader
that hands a data-parallel rank one whole optimizer step of microbatches at a time.

Samples
    Every sample is a dict of numpy arrays of length ``seq_length``: ``tokens`` (int64), ``labels``
    (int64, :data:`IGNORE_INDEX` where there is no loss) and ``loss_mask`` (float32, 1 exactly where
    ``labels`` is a token).

    CT (:class:`CTSamples`): GPT packing across records (:class:`GPTSampleDataset`); a sample of
    ``seq_length + 1`` stream tokens gives ``tokens = s[:-1]``, ``labels = s[1:]``, loss everywhere.

    SFT (:class:`SFTSamples`): one whole record (document) per sample, never two. For a record ``r``
    of ``n <= seq_length + 1`` tokens with reward mask ``m``: ``tokens[:n-1] = r[:-1]``, then
    ``pad_id``; ``labels[i] = r[i+1]`` where ``m[i+1] == 1`` (the predicted token is a reward token),
    else :data:`IGNORE_INDEX`. Padding sits at the end, so under causal attention it never affects
    a real token. A record longer than ``seq_length + 1`` is an error, found from the index when the
    dataset is built. Records whose tokens after the first hold no reward token have nothing to
    learn and are skipped (``skipped_records`` counts them); finding them reads the reward mask
    once, sequentially, at build time. Record order: the usable record ids shuffled per epoch with
    ``engine._C.document_order`` (the document-order generator of engine/data/samples.py, stream 1,
    epoch e), as many epochs as ``num_samples`` needs, cut to ``num_samples``.

    :func:`build_dataset` builds either from a data spec ``"PREFIX"`` or ``"W1 P1 W2 P2 ..."``;
    several prefixes are blended by weight (:class:`BlendedDataset`), each member built with exactly
    the samples the blend takes from it. Validation data is built the same way from ``data.valid``
    with ``num_samples = eval_iters * global_batch_size`` and read by a :class:`BatchLoader` that
    :meth:`~BatchLoader.restart` rewinds before every evaluation.

Batches
    :class:`BatchLoader` serves global batch after global batch in dataset order. With
    ``c = consumed_samples``, DP rank r's microbatch j of the next step holds samples
    ``c + (j*dp + r)*mb ... c + (j*dp + r + 1)*mb - 1``, so the union over ranks is the samples
    ``[c, c + global_batch_size)`` whatever the DP size, and a checkpoint needs only ``c``. Token and
    label ids are checked against the vocabulary here, once, where data enters the run.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
import torch

from engine import _C
from engine.config import parse_data_spec
from engine.data.indexed import IndexedDataset, data_file_path, index_file_path
from engine.data.preprocess import MASK_SUFFIX
from engine.data.samples import (BlendedDataset, GPTSampleDataset, blended_sample_counts,
                                 document_token_counts, hash_inputs, sequence_starts)

IGNORE_INDEX = -100  # label of positions without loss (torch's cross_entropy default)
SFT_VERSION = "ltu-sft-records/1"
STAGES = ("ct", "sft")
_MASK_SCAN_CHUNK = 1 << 26  # mask elements read per step when looking for reward tokens


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def open_tokens(prefix: str) -> IndexedDataset:
    """The token dataset at ``prefix``; a missing file is an error naming it."""
    for path in (data_file_path(prefix), index_file_path(prefix)):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data prefix {prefix!r}: {path} not found")
    return IndexedDataset(prefix)


def open_reward_mask(prefix: str, tokens: IndexedDataset) -> IndexedDataset:
    """The reward mask ``<prefix>_reward_mask`` of ``tokens``, checked to line up with it."""
    mask_prefix = prefix + MASK_SUFFIX
    for path in (data_file_path(mask_prefix), index_file_path(mask_prefix)):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data prefix {prefix!r}: SFT needs its reward mask, {path} not found")
    mask = IndexedDataset(mask_prefix)
    if mask.dtype.kind not in "iu":
        raise ValueError(f"{mask_prefix}: a reward mask holds integers 0/1, not {mask.dtype}")
    if not np.array_equal(mask.sequence_lengths, tokens.sequence_lengths):
        diff = np.flatnonzero(mask.sequence_lengths != tokens.sequence_lengths) \
            if mask.sequence_lengths.shape == tokens.sequence_lengths.shape else None
        where = (f"sequence {int(diff[0])} has {int(mask.sequence_lengths[diff[0]])} mask values for "
                 f"{int(tokens.sequence_lengths[diff[0]])} tokens" if diff is not None and diff.size else
                 f"{len(mask)} mask sequences for {len(tokens)} token sequences")
        raise ValueError(f"{mask_prefix}: the reward mask does not line up with {prefix} ({where})")
    if not np.array_equal(mask.document_indices, tokens.document_indices):
        raise ValueError(f"{mask_prefix}: the reward mask's documents differ from those of {prefix}")
    return mask


def read_vocab_size(prefix: str) -> int | None:
    """The tokenizer vocabulary recorded in ``<prefix>.meta.json``, or None without one."""
    path = f"{prefix}.meta.json"
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err})") from None
    size = (meta.get("tokenizer") or {}).get("vocab_size") if isinstance(meta, dict) else None
    if size is None:
        return None
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"{path}: tokenizer.vocab_size {size!r} is not a positive integer")
    return size


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------

class CTSamples:
    """Causal-LM samples over GPT-packed ``samples``: next token everywhere, loss on every token."""

    def __init__(self, samples: GPTSampleDataset, vocab_size: int | None = None):
        self.samples = samples
        self.seq_length = samples.seq_length
        self.prefix = getattr(samples.indexed, "prefix", "<indexed dataset>")
        self.vocab_size = vocab_size
        self.cache_key = "ct:" + samples.cache_key

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        stream = self.samples[k]
        return {"tokens": stream[:-1], "labels": stream[1:].copy(),
                "loss_mask": np.ones(self.seq_length, dtype=np.float32)}


class SampleMasks:
    """The per-token values (a reward mask) of each packed sample, read with the same pieces as
    its tokens: ``masks[k]`` lines up with ``samples[k]`` token for token."""

    def __init__(self, samples: GPTSampleDataset, mask: IndexedDataset):
        if not np.array_equal(samples.indexed.sequence_lengths, mask.sequence_lengths):
            raise ValueError(f"{mask.prefix}: the mask does not have the token dataset's sequence lengths")
        self.samples, self.mask = samples, mask

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, k: int) -> np.ndarray:
        pieces = self.samples.sample_span(k)
        return np.concatenate([self.mask.get(int(s), int(o), int(n)) for s, o, n in pieces])


def predicted_reward_counts(mask: IndexedDataset) -> np.ndarray:
    """Per document, the reward tokens after its first token (those a next-token loss predicts).

    Reads the mask file once in chunks and keeps only the positions of its non-zero values."""
    if mask.num_tokens:
        values = np.memmap(data_file_path(mask.prefix), dtype=mask.dtype, mode="r")
        ones = np.concatenate([np.flatnonzero(values[start:start + _MASK_SCAN_CHUNK]) + start
                               for start in range(0, values.size, _MASK_SCAN_CHUNK)]).astype(np.int64)
        del values
    else:
        ones = np.zeros(0, dtype=np.int64)
    lengths = np.asarray(mask.sequence_lengths, dtype=np.int64)
    starts = np.asarray(mask.sequence_pointers, dtype=np.int64) // mask.dtype.itemsize
    per_sequence = np.searchsorted(ones, starts + lengths) - np.searchsorted(ones, starts)
    cumulative = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(per_sequence, out=cumulative[1:])
    documents = np.asarray(mask.document_indices, dtype=np.int64)
    per_document = cumulative[documents[1:]] - cumulative[documents[:-1]]
    # A document's first token is the first token of its first non-empty sequence.
    n = lengths.size
    nonempty_from = np.append(np.where(lengths > 0, np.arange(n), n), n)
    nonempty_from = np.minimum.accumulate(nonempty_from[::-1])[::-1]
    first_sequence = nonempty_from[documents[:-1]]
    has_tokens = first_sequence < documents[1:]
    first_position = starts[first_sequence[has_tokens]]
    slot = np.searchsorted(ones, first_position)
    found = slot < ones.size
    first_is_reward = np.zeros(first_position.size, dtype=np.int64)
    first_is_reward[found] = ones[slot[found]] == first_position[found]
    per_document[has_tokens] -= first_is_reward
    return per_document


class SFTSamples:
    """One record per sample, loss on its reward tokens (see the module docstring).

    ``num_records`` usable records, ``skipped_records`` without a predicted reward token;
    ``len()`` is ``num_samples``.
    """

    def __init__(self, tokens: IndexedDataset, mask: IndexedDataset, seq_length: int, num_samples: int,
                 seed: int, vocab_size: int | None = None, pad_id: int = 0):
        _check_positive("seq_length", seq_length)
        _check_positive("num_samples", num_samples)
        if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        self.tokens, self.mask = tokens, mask
        self.prefix = tokens.prefix
        self.seq_length, self.seed, self.pad_id = int(seq_length), int(seed), int(pad_id)
        self.vocab_size = vocab_size
        self._sequence_starts = sequence_starts(tokens.sequence_lengths)
        self._documents = np.asarray(tokens.document_indices, dtype=np.int64)
        counts = document_token_counts(tokens.sequence_lengths, self._documents, self._sequence_starts)
        too_long = np.flatnonzero(counts > self.seq_length + 1)
        if too_long.size:
            d = int(too_long[0])
            raise ValueError(
                f"{self.prefix}: document {d} has {int(counts[d])} tokens, more than data.seq_length + 1 "
                f"= {self.seq_length + 1} (an SFT sample holds one whole record; {too_long.size} records "
                f"are too long, the longest has {int(counts.max())} tokens): raise data.seq_length to at "
                f"least {int(counts.max()) - 1}")
        rewarded = predicted_reward_counts(mask) > 0
        self.record_ids = np.flatnonzero(rewarded).astype(np.int64)
        self.num_records = int(self.record_ids.size)
        self.skipped_records = int(counts.size - self.num_records)
        if self.num_records == 0:
            raise ValueError(f"{self.prefix}: none of its {counts.size} records has a reward token to "
                             "predict (a reward token after the record's first token): no SFT sample")
        self.num_epochs = -(-int(num_samples) // self.num_records)
        self.order = _C.document_order(self.record_ids, counts.size, self.num_epochs, self.seed)
        self._length = int(num_samples)
        self.cache_key = hash_inputs([
            ("version", SFT_VERSION), ("document_token_counts", counts), ("records", self.record_ids),
            ("seq_length", self.seq_length), ("seed", self.seed), ("num_samples", self._length),
            ("pad_id", self.pad_id)])

    def __len__(self) -> int:
        return self._length

    def record(self, k: int) -> int:
        """The document id of sample k."""
        k = int(k)
        if k < 0:
            k += self._length
        if not 0 <= k < self._length:
            raise IndexError(f"sample {k} is out of range for {self._length} samples")
        return int(self.order[k])

    def _read(self, source: IndexedDataset, d: int) -> np.ndarray:
        first, end = int(self._documents[d]), int(self._documents[d + 1])
        parts = [np.asarray(source.get(s)) for s in range(first, end)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        d = self.record(k)
        record, reward = self._read(self.tokens, d), self._read(self.mask, d)
        n = record.size - 1  # inputs of the record; guaranteed >= 1 by its reward token
        tokens = np.full(self.seq_length, self.pad_id, dtype=np.int64)
        tokens[:n] = record[:-1]
        labels = np.full(self.seq_length, IGNORE_INDEX, dtype=np.int64)
        labels[:n] = np.where(reward[1:] != 0, record[1:], IGNORE_INDEX)
        return {"tokens": tokens, "labels": labels, "loss_mask": (labels != IGNORE_INDEX).astype(np.float32)}


class BlendedSamples(BlendedDataset):
    """A weighted blend of CT or SFT sample datasets with the vocabulary they agree on."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int, *,
                 cache_dir: str | None = None):
        super().__init__(datasets, weights, size, cache_dir=cache_dir)
        self.seq_length = self.datasets[0].seq_length
        self.vocab_size = _common_vocab_size(self.datasets)


def _common_vocab_size(datasets: Sequence) -> int | None:
    known = {ds.prefix: ds.vocab_size for ds in datasets if ds.vocab_size is not None}
    if len(set(known.values())) > 1:
        listed = ", ".join(f"{p}: {v}" for p, v in known.items())
        raise ValueError(f"the blended datasets were tokenized with different vocabularies ({listed})")
    return next(iter(known.values()), None)


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _build_one(prefix: str, stage: str, seq_length: int, num_samples: int, seed: int,
               cache_dir: str | None):
    tokens = open_tokens(prefix)
    vocab_size = read_vocab_size(prefix)
    if stage == "sft":
        mask = open_reward_mask(prefix, tokens)
        return SFTSamples(tokens, mask, seq_length, num_samples, seed, vocab_size)
    if tokens.num_tokens < seq_length + 1:
        raise ValueError(f"data prefix {prefix!r} holds {tokens.num_tokens} tokens, fewer than one sample "
                         f"(data.seq_length + 1 = {seq_length + 1})")
    samples = GPTSampleDataset(tokens, seq_length, seed, num_samples=num_samples, cache_dir=cache_dir)
    return CTSamples(samples, vocab_size)


def build_dataset(spec: str, stage: str, seq_length: int, num_samples: int, seed: int,
                  cache_dir: str | None = None, *, name: str = "data spec"):
    """The ``num_samples`` samples of ``stage`` ("ct" or "sft") over the data spec ``spec``
    (``engine.config.parse_data_spec``; ``name``, e.g. ``data.train``, names it in errors).

    Returns a dataset with ``len()``, ``ds[i] -> {"tokens", "labels", "loss_mask"}``,
    ``seq_length`` and ``vocab_size`` (from the prefixes' ``.meta.json``, None when none has one).
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    _check_positive("seq_length", seq_length)
    _check_positive("num_samples", num_samples)
    pairs = parse_data_spec(spec, name)
    if len(pairs) == 1:
        return _build_one(pairs[0][1], stage, seq_length, num_samples, seed, cache_dir)
    weights = [w for w, _ in pairs]
    taken = blended_sample_counts(weights, num_samples)
    # A member the blend draws nothing from is still built (one sample) so its errors show.
    members = [_build_one(prefix, stage, seq_length, max(1, int(n)), seed, cache_dir)
               for (_, prefix), n in zip(pairs, taken)]
    return BlendedSamples(members, weights, num_samples, cache_dir=cache_dir)


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------

class BatchLoader:
    """This DP rank's microbatches of one optimizer step at a time (see the module docstring).

    :meth:`next_step` returns ``num_microbatches`` dicts of tensors ``tokens``, ``labels``,
    ``position_ids`` (int64) and ``loss_mask`` (float32), each ``[micro_batch_size, seq_length]``;
    with ``reads_data=False`` (ranks that take no input, such as middle pipeline stages) a list of
    None, read from nothing, the position advancing all the same. A global batch the dataset cannot
    fill whole is dropped: :meth:`next_step` then raises StopIteration. Iterating the loader yields
    the steps left.
    """

    def __init__(self, dataset, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 vocab_size: int, consumed_samples: int = 0, reads_data: bool = True):
        for name, value in (("global_batch_size", global_batch_size), ("micro_batch_size", micro_batch_size),
                            ("dp_size", dp_size), ("vocab_size", vocab_size)):
            _check_positive(name, value)
        if not isinstance(dp_rank, (int, np.integer)) or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size), got dp_rank={dp_rank!r}, dp_size={dp_size}")
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(f"global_batch_size {global_batch_size} is not divisible by micro_batch_size "
                             f"{micro_batch_size} x data-parallel size {dp_size}")
        self.dataset = dataset
        self.global_batch_size = int(global_batch_size)
        self.micro_batch_size = int(micro_batch_size)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.vocab_size = int(vocab_size)
        self.reads_data = bool(reads_data)
        self.num_microbatches = self.global_batch_size // (self.micro_batch_size * self.dp_size)
        self.consumed_samples = self._check_consumed(consumed_samples)

    def _check_consumed(self, consumed: Any) -> int:
        if isinstance(consumed, bool) or not isinstance(consumed, (int, np.integer)) or consumed < 0:
            raise ValueError(f"consumed_samples must be an integer >= 0, got {consumed!r}")
        if consumed > len(self.dataset):
            raise ValueError(f"consumed_samples = {consumed} is past the end of the dataset "
                             f"({len(self.dataset)} samples)")
        return int(consumed)

    def steps_left(self) -> int:
        """Whole global batches left from the current position."""
        return (len(self.dataset) - self.consumed_samples) // self.global_batch_size

    def next_step(self) -> list[dict[str, torch.Tensor] | None]:
        """The next step's microbatches of this rank; StopIteration when no whole global batch is left."""
        if self.steps_left() < 1:
            raise StopIteration(f"{len(self.dataset) - self.consumed_samples} samples left, fewer than a "
                                f"global batch of {self.global_batch_size}")
        first = self.consumed_samples
        if self.reads_data:
            step = [self._microbatch(first + (j * self.dp_size + self.dp_rank) * self.micro_batch_size)
                    for j in range(self.num_microbatches)]
        else:
            step = [None] * self.num_microbatches
        self.consumed_samples += self.global_batch_size
        return step

    def _microbatch(self, start: int) -> dict[str, torch.Tensor]:
        samples = [self.dataset[i] for i in range(start, start + self.micro_batch_size)]
        tokens = np.stack([s["tokens"] for s in samples]).astype(np.int64, copy=False)
        labels = np.stack([s["labels"] for s in samples]).astype(np.int64, copy=False)
        loss_mask = np.stack([s["loss_mask"] for s in samples]).astype(np.float32, copy=False)
        self._check_ids(tokens, start, "token")
        self._check_ids(np.where(labels == IGNORE_INDEX, 0, labels), start, "label")
        rows, length = tokens.shape
        return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
                "loss_mask": torch.from_numpy(loss_mask),
                "position_ids": torch.arange(length, dtype=torch.int64).repeat(rows, 1)}

    def _check_ids(self, ids: np.ndarray, start: int, what: str) -> None:
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            row, column = (int(v) for v in np.argwhere(bad)[0])
            raise ValueError(f"sample {start + row}: {what} id {int(ids[row, column])} at position {column} "
                             f"is outside the vocabulary [0, {self.vocab_size})")

    def restart(self) -> None:
        """Back to the first sample (validation: every evaluation reads the same batches)."""
        self.consumed_samples = 0

    def __iter__(self):
        return self

    def __next__(self) -> list[dict[str, torch.Tensor] | None]:
        return self.next_step()

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "consumed_samples" not in state:
            raise KeyError("loader state has no 'consumed_samples'")
        self.consumed_samples = self._check_consumed(state["consumed_samples"])
