"""SentencePiece tokenizer, training on SAR logs, and record encoding with exact reward spans.

The reward span of every record is exact for any SentencePiece model (one trained here with the
markers and reward labels as single user-defined tokens, or an existing Llama-2 ``tokenizer.model``
that knows none of them) because a record is encoded segment by segment: the text before a reward
label, the label, the text before the next label... and the ids are concatenated. A label's tokens
are therefore exactly ``encode(label)`` wherever it appears, whatever the text around it.

``RecordEncoder.encode_many`` gives the same tokens for many records at once, and
``RecordEncoder.encode_lines`` for many JSON lines, read in C++ (``engine._C.SarTextBatch``) when
they are well-formed records of JSON's plain types and by ``sar.parse_json_line`` otherwise. The
texts go through a word cache in C++ (``engine._C.WordEncoder``): with a model where encoding never
crosses a space or a segment marker (``splits_into_words``: BPE, identity normalization, markers as
user-defined symbols; the models ``train_tokenizer`` makes), texts are cut into words there and each
distinct word is encoded once per encoder (markers, field names and categorical values repeat
across records); other models get whole texts, the short ones kept. What the cache does not know
goes to SentencePiece in one batch call per chunk.
"""
from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import sentencepiece as spm

from engine import _C
from engine.data.reward_bins import RewardBins
from engine.data.sar import (FLOAT_DIGITS, REWARD_LABELS, SEGMENT_MARKERS, SPECIAL_SYMBOLS, RecordError, SARRecord,
                             Segment, parse_item, serialize_parts, serialize_segments)
from engine.fileio import atomic_open


_PIECE_USER_DEFINED, _PIECE_TYPES_NOT_MERGED = 4, (2, 3, 6)  # unknown, control, byte
_BPE = 2
_WHITESPACE = ("\u2581", " ")


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            return value, i
        shift += 7


def _proto_fields(buf: bytes):
    """(field number, value) of a protobuf message: ints for varints, bytes otherwise."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, value


def splits_into_words(model_bytes: bytes) -> bool:
    """Whether encoding a text equals concatenating the encodings of its words, where words are cut
    before every space and around every segment marker (``<|state|>``...).

    True for a BPE model whose normalization is the identity without a dummy prefix or whitespace
    removal, whose markers are user-defined symbols (BPE never merges those with a neighbour), no
    other user-defined symbol of which could span a cut, and no mergeable piece of which holds a
    whitespace after its first character (so no merge crosses a cut before a space), and with the
    whitespace piece itself. A model trained by ``train_tokenizer`` on text with spaces is one.
    """
    model_type, normalizer = 1, {}
    pieces: list[tuple[str, int]] = []
    for number, value in _proto_fields(model_bytes):
        if number == 1:
            fields = dict(_proto_fields(value))
            pieces.append((fields.get(1, b"").decode("utf-8", "replace"), fields.get(3, 1)))
        elif number == 2:
            model_type = dict(_proto_fields(value)).get(3, 1)
        elif number == 3:
            normalizer = dict(_proto_fields(value))
    if model_type != _BPE or normalizer.get(2, b"") or normalizer.get(3, 1) or normalizer.get(4, 1) \
            or not normalizer.get(5, 1):
        return False
    user_defined = {piece for piece, kind in pieces if kind == _PIECE_USER_DEFINED}
    # A word after a cut starts with a whitespace: it must be a known piece, or an unknown run
    # ending the word before would merge with it into one unknown token.
    if not set(SEGMENT_MARKERS) <= user_defined or (_WHITESPACE[0], 1) not in pieces:
        return False
    for piece in user_defined - set(SPECIAL_SYMBOLS):
        if any(ch in piece for ch in "<|>" + "".join(_WHITESPACE)):
            return False
    return not any(any(ch in piece[1:] for ch in _WHITESPACE)
                   for piece, kind in pieces if kind not in _PIECE_TYPES_NOT_MERGED + (_PIECE_USER_DEFINED,))


_WORD_CUTS = re.compile("(" + "|".join(re.escape(m) for m in SEGMENT_MARKERS) + ")|(?=[ \u2581])")


def split_words(text: str) -> list[str]:
    """``text`` cut before every space and around every segment marker (no empty words); the
    encoder's C++ word cache cuts texts the same way (``engine._C.WordEncoder.split``)."""
    return [word for word in _WORD_CUTS.split(text) if word]


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
        with open(model_path, "rb") as fh:
            self.splits_into_words = splits_into_words(fh.read())

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


# Texts (or words) up to this many characters are kept with their ids for reuse: they repeat exactly
# (markers, field names, categorical values); longer ones rarely do.
CACHED_TEXT_CHARS = 48
CACHED_TEXTS = 1 << 18


def _unclassified(domain: str, field: str, value: float) -> int:
    return 0  # a placeholder class while the bins are not fitted yet


@dataclass
class EncodedTexts:
    """Tokens of the texts of records, each text the one before a reward label (see serialize_parts)."""

    tokens: np.ndarray              # every text's ids, concatenated
    text_lengths: np.ndarray        # per reward: tokens of the text before its label
    rewards_per_record: np.ndarray  # per encoded record
    classes: np.ndarray | None      # per reward, when classified with the encoder's bins
    keys: list[tuple[str, str]]     # the distinct (domain, field), in order of first appearance ...
    key_index: np.ndarray           # ... of each reward, and its value
    values: np.ndarray


def classify_rewards(bins: RewardBins, keys: list[tuple[str, str]], key_index: np.ndarray,
                     values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(classes, classifiable) of rewards: reward i is of field ``keys[key_index[i]]``, value
    ``values[i]``; each class is what ``bins.classify`` gives, where it gives one (not for a field
    the bins do not know, nor for a value a binary field cannot hold)."""
    classes = np.zeros(len(values), dtype=np.int64)
    valid = np.zeros(len(values), dtype=bool)
    for index, key in enumerate(keys):
        where = key_index == index
        field_bins = bins.fields.get(key)
        if field_bins is None:
            continue
        chosen = values[where]
        if field_bins.kind == "binary":
            ok = (chosen == 0.0) | (chosen == 1.0)
            classes[where] = np.where(ok, chosen, 0.0).astype(np.int64)
            valid[where] = ok
        elif field_bins.kind == "quantile":
            classes[where] = np.searchsorted(np.asarray(field_bins.edges, dtype=np.float64), chosen, side="left")
            valid[where] = True
    return classes, valid


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
        # Ids of short words (or texts) seen before, kept for the encoder's life.
        self._words = _C.WordEncoder(tokenizer.splits_into_words, CACHED_TEXT_CHARS, CACHED_TEXTS)

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

    def encode_many(self, records: list[SARRecord], eod_id: int | None = None, dtype=np.int64,
                    num_threads: int = 1) -> tuple[np.ndarray, np.ndarray, list]:
        """Tokens and reward masks of ``records``, each as ``encode(record)`` gives them (plus
        ``eod_id`` at the end when given), concatenated in order.

        Returns (tokens as ``dtype``, mask as uint8, outcomes): per record its number of tokens, or
        the RecordError that serializing it raised (a reward the bins cannot classify); such a
        record adds no tokens. ``num_threads`` is SentencePiece's for the batch.
        """
        texts, outcomes = self.encode_texts(records, classify=True, num_threads=num_threads, dtype=dtype)
        tokens, mask, lengths = self.assemble(texts, texts.classes, eod_id)
        found = iter(lengths.tolist())
        return tokens, mask, [o if isinstance(o, RecordError) else next(found) for o in outcomes]

    def encode_texts(self, records: list[SARRecord], classify: bool = True, num_threads: int = 1,
                     dtype=np.int64) -> tuple["EncodedTexts", list]:
        """The tokens of the records' texts without their labels; ``assemble`` adds the labels.

        With ``classify`` the rewards are classified with the encoder's bins (a reward they cannot
        classify makes its record a RecordError in the outcomes, else the record's number of
        rewards); without, each reward's (domain, field) and value are kept, to be classified once
        bins are fitted on them (they are kept in both cases).
        """
        batch = _C.SarTextBatch(self.float_digits)
        classifier = self.bins.classify if classify else _unclassified
        outcomes = [self._add_serialized(batch, record, classifier) for record in records]
        rewards = batch.rewards()
        classes = classify_rewards(self.bins, *rewards[:3])[0] if classify else None
        return self._encoded(batch, classes, num_threads, dtype, rewards), outcomes

    def encode_lines(self, items: list[tuple[str, object]], classify: bool = True, num_threads: int = 1,
                     dtype=np.int64) -> tuple["EncodedTexts", list]:
        """``encode_texts`` of the records of log lines, read and validated on the way.

        ``items`` are (file:line, payload) as a log reader yields them: the line's JSON text, the
        object decoded from it, or the RecordError found reading it. JSON lines are read in C++
        while they are well-formed records of JSON's plain types; any other item by
        ``sar.parse_item``, so every error and its message are the Python path's. Returns the
        encoded texts and, per item, its RecordError or (rewards, domain, steps, episode).
        """
        batch = _C.SarTextBatch(self.float_digits)
        classifier = self.bins.classify if classify else _unclassified
        payloads = [payload for _, payload in items]
        outcomes: list = [None] * len(items)
        record_items: list[int] = []  # per record of the batch: its item
        start = 0
        while start < len(items):
            taken = batch.add_json_lines(payloads, start)
            record_items += range(start, start + taken)
            start += taken
            if start == len(items):
                break
            try:  # an item the C++ reading declined
                outcome = self._add_serialized(batch, parse_item(*items[start]), classifier)
            except RecordError as exc:
                outcome = exc
            if isinstance(outcome, RecordError):
                outcomes[start] = outcome
            else:
                record_items.append(start)
            start += 1
        rewards = batch.rewards()
        classes = None
        if classify:
            classes, classifiable = classify_rewards(self.bins, *rewards[:3])
            if not classifiable.all():
                for record in np.unique(rewards[3][~classifiable]).tolist():  # the Python path says why
                    outcomes[record_items[record]] = self._classification_error(items[record_items[record]])
                    batch.drop(record)
                rewards = batch.rewards()
                classes = classify_rewards(self.bins, *rewards[:3])[0]
        names, domains, steps, episodes, counts = batch.records()
        for item, count, domain, steps_, episode in zip(record_items, counts.tolist(), domains.tolist(),
                                                        steps.tolist(), episodes.tolist()):
            if outcomes[item] is None:
                outcomes[item] = (count, names[domain], steps_, episode)
        return self._encoded(batch, classes, num_threads, dtype, rewards), outcomes

    def _add_serialized(self, batch, record: SARRecord, classifier) -> int | RecordError:
        """Adds a record serialized by ``serialize_parts`` to ``batch``: its number of rewards, or
        the RecordError of a reward ``classifier`` cannot classify (nothing added)."""
        try:
            texts, _ = serialize_parts(record, classifier, self.float_digits)
        except RecordError as exc:
            return exc
        fields = [name for step in record.steps for name in step.reward]
        values = [value for step in record.steps for value in step.reward.values()]
        batch.add_record(record.domain, len(record.steps), record.episode, texts, fields, values)
        return len(texts)

    def _classification_error(self, item: tuple[str, object]) -> RecordError:
        try:
            serialize_parts(parse_item(*item), self.bins.classify, self.float_digits)
        except RecordError as exc:
            return exc
        raise RuntimeError(f"{item[0]}: the C++ reading of this record found a reward its bins cannot "
                           "classify, the Python reading did not")

    def _encoded(self, batch, classes: np.ndarray | None, num_threads: int, dtype, rewards: tuple) -> "EncodedTexts":
        """The encoded texts of ``batch`` with its ``rewards()`` and their classes (None: not classified)."""
        keys, key_index, values, _ = rewards
        tokens, text_lengths, rewards_per_record = batch.encode(
            self._words, lambda words: self.tokenizer.encode_batch(words, num_threads))
        return EncodedTexts(tokens=tokens.astype(dtype, copy=False), text_lengths=text_lengths,
                            rewards_per_record=rewards_per_record, classes=classes, keys=keys,
                            key_index=key_index, values=values)

    def assemble(self, texts: "EncodedTexts", classes: np.ndarray, eod_id: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, reward mask, tokens per record) of encoded texts with the labels of ``classes``
        (one per reward, in order) placed after their texts, BOS (when the encoder adds it) and
        ``eod_id`` around each record."""
        label_lengths = np.array([len(ids) for ids in self.label_ids], dtype=np.int64)
        label_table = np.array([i for ids in self.label_ids for i in ids], dtype=texts.tokens.dtype)
        label_starts = np.cumsum(label_lengths) - label_lengths
        bos = self.tokenizer.bos_id if self.add_bos else None
        extras = [t for t in (bos, eod_id) if t is not None]
        source = np.concatenate([texts.tokens, label_table, np.array(extras, dtype=texts.tokens.dtype)])
        # Pieces in output order: text, label, text, label... of each record, BOS and EOD around.
        num_pairs = len(classes)
        lengths = np.empty(2 * num_pairs, dtype=np.int64)
        starts = np.empty(2 * num_pairs, dtype=np.int64)
        lengths[0::2] = texts.text_lengths
        starts[0::2] = np.cumsum(texts.text_lengths) - texts.text_lengths
        lengths[1::2] = label_lengths[classes]
        starts[1::2] = len(texts.tokens) + label_starts[classes]
        is_label = np.tile(np.array([0, 1], dtype=np.uint8), num_pairs)
        record_first_piece = 2 * (np.cumsum(texts.rewards_per_record) - texts.rewards_per_record)
        record_end_piece = record_first_piece + 2 * texts.rewards_per_record
        extra_start = len(texts.tokens) + len(label_table)
        if eod_id is not None:
            at = record_end_piece
            lengths, starts = np.insert(lengths, at, 1), np.insert(starts, at, extra_start + len(extras) - 1)
            is_label = np.insert(is_label, at, 0)
            record_end_piece = record_end_piece + np.arange(1, len(at) + 1)
            record_first_piece = record_first_piece + np.arange(len(at))
        if bos is not None:
            at = record_first_piece
            lengths, starts = np.insert(lengths, at, 1), np.insert(starts, at, extra_start)
            is_label = np.insert(is_label, at, 0)
            record_end_piece = record_end_piece + np.arange(1, len(at) + 1)
        ends = np.cumsum(lengths)
        gather = np.repeat(starts - (ends - lengths), lengths) + np.arange(int(ends[-1]) if len(ends) else 0)
        record_ends = ends[record_end_piece - 1] if len(record_end_piece) else np.zeros(0, dtype=np.int64)
        return source[gather], np.repeat(is_label, lengths), np.diff(record_ends, prepend=0)

    def candidate_ids(self, domain: str, field: str) -> tuple[tuple[int, ...], ...]:
        """Token ids of every class label of a reward field, in class order."""
        return self.label_ids[:self.bins.num_classes(domain, field)]

    def scoring_items(self, record: SARRecord) -> list[ScoringItem]:
        encoded = self.encode(record)
        return [ScoringItem(record.domain, span.step, span.field, encoded.tokens[:span.start],
                            self.candidate_ids(record.domain, span.field), span.label_class)
                for span in encoded.spans]
