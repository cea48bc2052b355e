"""Reward spans are exact for a trained tokenizer (labels as symbols) and for one with no symbols at all."""
import itertools
import os
import pickle

import numpy as np
import pytest

from engine.data.reward_bins import RewardBins
from engine.data.sar import (REWARD_LABELS, SPECIAL_SYMBOLS, RecordError, parse_record, reward_label,
                             serialize_segments, serialize_text)
from engine.data.synthetic import DOMAIN_REWARDS, SyntheticConfig, generate
from engine.data.tokenizer import RecordEncoder, Tokenizer, split_words, train_tokenizer


def _records():
    config = SyntheticConfig(seed=3, train_per_domain=60)
    records = [parse_record(r, f"synthetic:{i}") for domain in config.domains
               for i, r in enumerate(generate(config, domain, "train"))]
    records += [
        parse_record({"domain": "ads", "state": {"query": "<|r1|> is not a label", "x": "a;b=c\\", "emoji": "🙂 中文",
                                "ws": "  two  spaces\ttab  "},
                      "action": {"kw": "<|reward|>", "bid": 0.4}, "reward": {"click": 1, "cost": 3.25}}, "hand:1"),
        parse_record({"domain": "ads", "steps": [
            {"state": {"q": "r1|>"}, "action": {"kw": "<|r"}, "reward": {"click": 0, "cost": 0.1}},
            {"state": {"q": ""}, "action": {}, "reward": {"click": 1, "cost": 9.0}},
            {"state": {"q": "1"}, "action": {"k": "|>"}, "reward": {"click": 1, "cost": 1.5}}]}, "hand:2"),
    ]
    return records


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Records, their bins, and two tokenizers trained once for the module (small vocabularies)."""
    records = _records()
    bins = RewardBins.fit_records(records, num_bins=5)
    texts = [serialize_text(r, bins.classify) for r in records]
    tmp = tmp_path_factory.mktemp("tok")
    with_symbols = train_tokenizer(texts, str(tmp / "sym.model"), vocab_size=400)
    # Stands in for a Llama-2 tokenizer.model: no user-defined symbols, dummy prefix, byte fallback,
    # identity normalization that keeps whitespace as is.
    plain = train_tokenizer(texts, str(tmp / "plain.model"), vocab_size=400, special_symbols=(),
                            add_dummy_prefix=True, byte_fallback=True)
    return {"records": records, "bins": bins, "sym": with_symbols, "plain": plain}


def brute_force_label_windows(tok: Tokenizer, tokens) -> list[tuple[int, int, str]]:
    """Every minimal window of tokens whose decoded text is exactly a reward label."""
    labels = set(REWARD_LABELS)
    found = []
    for start in range(len(tokens)):
        for end in range(start + 1, min(len(tokens), start + 12) + 1):
            text = tok.decode(tokens[start:end])
            if text in labels:
                # minimal: no shorter window inside it decodes to a label
                inner = any(tok.decode(tokens[s:e]) in labels for s in range(start, end)
                            for e in range(s + 1, end + 1) if (s, e) != (start, end))
                if not inner:
                    found.append((start, end, text))
                break
    return found


@pytest.mark.parametrize("which", ["sym", "plain"])
def test_reward_spans_are_exact(corpus, which):
    tok, bins = corpus[which], corpus["bins"]
    encoder = RecordEncoder(tok, bins)
    assert tok.unk_id not in itertools.chain.from_iterable(encoder.label_ids)
    for record in corpus["records"]:
        encoded = encoder.encode(record)
        rewards = [(i, name, value) for i, s in enumerate(record.steps) for name, value in s.reward.items()]
        assert len(encoded.spans) == len(rewards)
        for span, (step, name, value) in zip(encoded.spans, rewards):
            cls = bins.classify(record.domain, name, value)
            assert (span.step, span.field, span.label_class) == (step, name, cls)
            assert span.num_classes == bins.num_classes(record.domain, name)
            assert tok.decode(encoded.tokens[span.start:span.end]) == reward_label(cls)
        # Independent check: scanning the token ids for label text finds exactly these spans.
        windows = brute_force_label_windows(tok, encoded.tokens.tolist())
        assert [(s, e) for s, e, _ in windows] == [(s.start, s.end) for s in encoded.spans], record.where
        mask = encoded.reward_mask()
        assert mask.dtype == np.uint8 and len(mask) == len(encoded.tokens)
        assert np.flatnonzero(mask).tolist() == [i for s in encoded.spans for i in range(s.start, s.end)]


def test_trained_tokenizer_has_single_token_markers_and_labels(corpus):
    tok = corpus["sym"]
    assert all(tok.is_single_token(s) for s in SPECIAL_SYMBOLS)
    encoder = RecordEncoder(tok, corpus["bins"])
    for record in corpus["records"]:
        encoded = encoder.encode(record)
        assert all(s.end - s.start == 1 for s in encoded.spans)
        # No dummy prefix, no normalization, byte fallback: ids decode back to the serialized text exactly.
        assert tok.decode(encoded.tokens) == serialize_text(record, corpus["bins"].classify)


def test_plain_tokenizer_knows_no_symbols_and_falls_back_to_bytes(corpus):
    tok = corpus["plain"]
    assert not any(tok.is_single_token(s) for s in SPECIAL_SYMBOLS)
    assert all(tok.piece_to_id(s) is None for s in SPECIAL_SYMBOLS)
    assert tok.piece_to_id("<0xF0>") is not None  # byte pieces exist
    text = "unseen ☃ ∑  characters ﬁ"  # identity normalization: double space and ligature kept
    ids = tok.encode(text)
    assert tok.unk_id not in ids and tok.decode(ids) == text
    encoder = RecordEncoder(tok, corpus["bins"])
    assert all(len(ids) > 1 for ids in encoder.label_ids)


@pytest.mark.parametrize("which", ["sym", "plain"])
def test_tokens_are_the_segments_encoded_separately(corpus, which):
    tok, bins = corpus[which], corpus["bins"]
    encoder = RecordEncoder(tok, bins)
    record = corpus["records"][-1]  # the episode
    expected = []
    for seg in serialize_segments(record, bins.classify):
        expected += tok.encode(seg.text)
    assert encoder.encode(record).tokens.tolist() == expected


@pytest.mark.parametrize("which", ["sym", "plain"])
def test_scoring_items_give_prefix_and_candidates(corpus, which):
    tok, bins = corpus[which], corpus["bins"]
    encoder = RecordEncoder(tok, bins)
    for record in corpus["records"][::7]:
        encoded = encoder.encode(record)
        items = encoder.scoring_items(record)
        assert len(items) == len(encoded.spans)
        for item, span in zip(items, encoded.spans):
            assert item.prefix.tolist() == encoded.tokens[:span.start].tolist()
            assert list(item.candidates[item.target]) == encoded.tokens[span.start:span.end].tolist()
            assert len(item.candidates) == bins.num_classes(record.domain, item.field)
            assert len(set(item.candidates)) == len(item.candidates)
            assert [tok.decode(c) for c in item.candidates] == [reward_label(k) for k in range(len(item.candidates))]


def test_tokenizer_properties_and_errors(corpus, tmp_path):
    tok = corpus["sym"]
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, None)
    assert tok.vocab_size <= 400
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("<|state|>q=1") == tok.encode("<|state|>q=1")
    with pytest.raises(FileNotFoundError, match="missing.model"):
        Tokenizer(str(tmp_path / "missing.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model"):
        Tokenizer(str(bad))
    with pytest.raises(ValueError, match="no BOS"):
        RecordEncoder(_NoBos(tok), corpus["bins"], add_bos=True)


class _NoBos:
    def __init__(self, tok):
        self._tok, self.model_path = tok, tok.model_path

    bos_id = None


def test_add_bos_shifts_spans(corpus):
    tok, bins = corpus["sym"], corpus["bins"]
    record = corpus["records"][0]
    plain, with_bos = RecordEncoder(tok, bins).encode(record), RecordEncoder(tok, bins, add_bos=True).encode(record)
    assert with_bos.tokens[0] == tok.bos_id and with_bos.tokens[1:].tolist() == plain.tokens.tolist()
    assert [(s.start - 1, s.end - 1) for s in with_bos.spans] == [(s.start, s.end) for s in plain.spans]


def test_training_creates_the_model_directory(corpus, tmp_path):
    texts = [serialize_text(r, corpus["bins"].classify) for r in corpus["records"][:50]]
    path = tmp_path / "not" / "yet" / "tok.model"
    tok = train_tokenizer(texts, str(path), vocab_size=400)
    assert path.is_file() and tok.is_single_token("<|reward|>")
    assert os.listdir(path.parent) == ["tok.model"]  # no temporary left beside it


def _many_records():
    """Thousands of records of every synthetic domain (episodes, numeric and binary rewards) plus
    values that stress word cuts: runs of spaces, the SentencePiece whitespace character, characters
    no tokenizer saw, marker-like text."""
    config = SyntheticConfig(seed=11, train_per_domain=500, domains=tuple(DOMAIN_REWARDS), ood_domains=())
    records = [parse_record(r, f"synthetic:{d}:{i}") for d in config.domains
               for i, r in enumerate(generate(config, d, "train"))]
    odd = [" ", "  ", " lead", "trail ", "a\u2581b", "\u2581\u2581x", "中文 中文", "☃  ☃", "<|state|> x", "|> <|", "x\ty"]
    for i, value in enumerate(odd * 3):
        records.append(parse_record({"domain": "ads/ctr", "state": {"q": value, "n": i, "f": i / 7},
                                     "action": {"kw": odd[-1 - i % len(odd)]}, "reward": {"click": i % 2}},
                                    f"odd:{i}"))
    return records


@pytest.fixture(scope="module")
def many(corpus, tmp_path_factory):
    records = _many_records()
    bins = RewardBins.fit_records(records)
    texts = [serialize_text(r, bins.classify) for r in records[:1500]]
    tmp = tmp_path_factory.mktemp("many")
    # No byte fallback: unseen characters become unknown tokens (a run of them merges into one).
    no_fallback = train_tokenizer(texts, str(tmp / "nofb.model"), vocab_size=400, byte_fallback=False)
    unigram = train_tokenizer(texts, str(tmp / "uni.model"), vocab_size=400, model_type="unigram")
    return {"records": records, "bins": bins, "sym": corpus["sym"], "plain": corpus["plain"],
            "nofb": no_fallback, "unigram": unigram}


def test_which_models_split_into_words(many):
    assert many["sym"].splits_into_words and many["nofb"].splits_into_words
    # Dummy prefix and no marker symbols / unigram lattices: whole texts are encoded.
    assert not many["plain"].splits_into_words and not many["unigram"].splits_into_words
    assert split_words("<|domain|>a b  c\u2581d<|state|>") == ["<|domain|>", "a", " b", " ", " c", "\u2581d",
                                                                "<|state|>"]


@pytest.mark.parametrize("which", ["sym", "plain", "nofb", "unigram"])
@pytest.mark.parametrize("add_bos,eod", [(False, None), (True, 2)])
def test_encode_many_equals_records_encoded_one_by_one(many, which, add_bos, eod):
    """The batched path (one SentencePiece call per chunk, words encoded once) gives the same tokens
    and masks as encoding each record segment by segment, chunk after chunk with the same encoder."""
    tok, records = many[which], many["records"]
    reference = RecordEncoder(tok, many["bins"], add_bos=add_bos)
    expected_tokens, expected_mask = [], []
    for record in records:
        encoded = reference.encode(record)
        expected_tokens += encoded.tokens.tolist() + ([eod] if eod is not None else [])
        expected_mask += encoded.reward_mask().tolist() + ([0] if eod is not None else [])
    batched = RecordEncoder(tok, many["bins"], add_bos=add_bos)
    tokens, masks, lengths = [], [], []
    bounds = np.cumsum([0, 700, 1, 299, 700, 1000, len(records)]).clip(max=len(records))
    for start, end in zip(bounds[:-1], bounds[1:]):
        t, m, outcome = batched.encode_many(records[start:end], eod, np.uint16, num_threads=2)
        assert t.dtype == np.uint16 and m.dtype == np.uint8 and len(t) == len(m) == sum(outcome)
        tokens.append(t)
        masks.append(m)
        lengths += outcome
    assert np.concatenate(tokens).tolist() == expected_tokens
    assert np.concatenate(masks).tolist() == expected_mask
    assert len(lengths) == len(records)
    if which == "nofb":
        assert tok.unk_id in expected_tokens  # the unknown runs were exercised


def test_encode_many_reports_records_the_bins_cannot_classify(many):
    records = many["records"][:3] + [parse_record({"domain": "ads/ctr", "state": {}, "action": {},
                                                   "reward": {"unseen": 1}}, "f.jsonl:9")] + many["records"][3:5]
    encoder = RecordEncoder(many["sym"], many["bins"])
    tokens, mask, outcomes = encoder.encode_many(records)
    assert isinstance(outcomes[3], RecordError) and "f.jsonl:9: field 'reward.unseen'" in str(outcomes[3])
    good = records[:3] + records[4:]
    assert tokens.tolist() == [i for r in good for i in encoder.encode(r).tokens.tolist()]
    assert [o for o in outcomes if isinstance(o, int)] == [len(encoder.encode(r).tokens) for r in good]
    assert encoder.encode_many([])[0].size == 0
