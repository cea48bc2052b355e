"""SentencePiece tokenizer, training on SAR logs, and record encoding with exact reward spans.

The reward span of every record is exact for any SentencePiece model (one trained here with the
markers and reward labels as single user-defined tokens, or an existing Llama-2 ``tokenizer.model``
that knows none of them) because a record is encoded segment by segment: the text before a reward
label, the label, the text before the next label... and the ids are concatenated. A label's tokens
are therefore exactly ``encode(label)`` wherever it appears, whatever the text around it.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import sentencepiece as spm

from engine.data.reward_bins import RewardBins
from engine.data.sar import (FLOAT_DIGITS, REWARD_LABELS, SPECIAL_SYMBOLS, SARRecord, Segment,
                             serialize_segments)
from engine.fileio import atomic_open


class Tokenizer:
    """A SentencePiece model: ``Tokenizer("tokenizer.model")``."""

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model not found: {model_path}")
        self.model_path = model_path
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(model_path)
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"{model_path}: not a SentencePiece model ({exc})") from None

    def __getstate__(self):  # worker processes re-load the model from its path
        return {"model_path": self.model_path}

    def __setstate__(self, state):
        self.__init__(state["model_path"])

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    def _optional(self, value: int) -> int | None:
        return value if value >= 0 else None

    @property
    def bos_id(self) -> int | None:
        return self._optional(self._sp.bos_id())

    @property
    def eos_id(self) -> int | None:
        return self._optional(self._sp.eos_id())

    @property
    def pad_id(self) -> int | None:
        return self._optional(self._sp.pad_id())

    @property
    def unk_id(self) -> int | None:
        return self._optional(self._sp.unk_id())

    def encode(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """One thread by default: preprocessing parallelises over worker processes instead."""
        return self._sp.Encode(texts, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.IdToPiece(int(token_id))

    def piece_to_id(self, piece: str) -> int | None:
        token_id = self._sp.PieceToId(piece)
        return token_id if self._sp.IdToPiece(token_id) == piece else None

    def is_single_token(self, text: str) -> bool:
        return len(self.encode(text)) == 1


def train_tokenizer(texts: Iterable[str], model_path: str, vocab_size: int = 8000,
                    special_symbols: Iterable[str] = SPECIAL_SYMBOLS, model_type: str = "bpe",
                    byte_fallback: bool = True, add_dummy_prefix: bool = False,
                    num_threads: int = 1, input_sentence_size: int = 0, **trainer_options) -> Tokenizer:
    """Train a SentencePiece model in-process on ``texts`` and write it atomically to ``model_path``.

    Defaults follow Llama (BPE, byte fallback, split digits, identity normalization keeping whitespace
    as is, so decoding gives back the serialized text exactly; unk=0 bos=1 eos=2, no pad) except
    ``add_dummy_prefix``: off, so a user-defined label encodes to exactly one token. Other
    SentencePiece trainer options (e.g. ``normalization_rule_name``) pass through ``trainer_options``.
    """
    options = dict(
        vocab_size=vocab_size, model_type=model_type, user_defined_symbols=list(special_symbols),
        byte_fallback=byte_fallback, add_dummy_prefix=add_dummy_prefix, split_digits=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, num_threads=num_threads,
        input_sentence_size=input_sentence_size, shuffle_input_sentence=False,
        max_sentence_length=1 << 16, minloglevel=2)
    options.update(trainer_options)
    # Create the destination folder first: training can take minutes and must not fail at the end.
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.Train(sentence_iterator=iter(texts), model_writer=buffer, **options)
    with atomic_open(model_path, "wb") as fh:
        fh.write(buffer.getvalue())
    return Tokenizer(model_path)


@dataclass(frozen=True)
class RewardSpan:
    """Tokens [start, end) of one reward label: the class of reward ``field`` of step ``step``."""

    step: int
    field: str
    start: int
    end: int
    label_class: int
    num_classes: int


@dataclass(frozen=True)
class EncodedRecord:
    tokens: np.ndarray                 # int64 token ids
    spans: tuple[RewardSpan, ...]

    def reward_mask(self) -> np.ndarray:
        mask = np.zeros(len(self.tokens), dtype=np.uint8)
        for span in self.spans:
            mask[span.start:span.end] = 1
        return mask


@dataclass(frozen=True)
class ScoringItem:
    """What evaluation needs for one reward: score each candidate's tokens after ``prefix``."""

    domain: str
    step: int
    field: str
    prefix: np.ndarray                  # the record's tokens before this reward label
    candidates: tuple[tuple[int, ...], ...]  # token ids of class 0, 1, ... num_classes-1
    target: int                         # the observed class


class RecordEncoder:
    """Serializes SAR records with reward bins and encodes them with exact reward spans."""

    def __init__(self, tokenizer: Tokenizer, bins: RewardBins, float_digits: int = FLOAT_DIGITS,
                 add_bos: bool = False):
        self.tokenizer = tokenizer
        self.bins = bins
        self.float_digits = float_digits
        self.add_bos = add_bos
        if add_bos and tokenizer.bos_id is None:
            raise ValueError(f"{tokenizer.model_path} has no BOS token")
        self.label_ids = tuple(tuple(ids) for ids in tokenizer.encode_batch(list(REWARD_LABELS)))
        for label, ids in zip(REWARD_LABELS, self.label_ids):
            if not ids or (tokenizer.unk_id is not None and tokenizer.unk_id in ids):
                raise ValueError(f"{tokenizer.model_path} cannot encode the reward label {label!r} "
                                 f"without unknown tokens: {ids}")
        if len(set(self.label_ids)) != len(self.label_ids):
            raise ValueError(f"{tokenizer.model_path} encodes two reward labels to the same tokens")

    def segments(self, record: SARRecord) -> list[Segment]:
        return serialize_segments(record, self.bins.classify, self.float_digits)

    def encode(self, record: SARRecord) -> EncodedRecord:
        segments = self.segments(record)
        tokens: list[int] = [self.tokenizer.bos_id] if self.add_bos else []
        spans = []
        for seg in segments:
            if seg.is_reward:
                ids = self.label_ids[seg.label_class]
                start = len(tokens)
                tokens.extend(ids)
                spans.append(RewardSpan(seg.step, seg.field, start, len(tokens), seg.label_class,
                                        self.bins.num_classes(record.domain, seg.field)))
            else:
                tokens.extend(self.tokenizer.encode(seg.text))
        return EncodedRecord(np.asarray(tokens, dtype=np.int64), tuple(spans))

    def candidate_ids(self, domain: str, field: str) -> tuple[tuple[int, ...], ...]:
        """Token ids of every class label of a reward field, in class order."""
        return self.label_ids[:self.bins.num_classes(domain, field)]

    def scoring_items(self, record: SARRecord) -> list[ScoringItem]:
        encoded = self.encode(record)
        return [ScoringItem(record.domain, span.step, span.field, encoded.tokens[:span.start],
                            self.candidate_ids(record.domain, span.field), span.label_class)
                for span in encoded.spans]
