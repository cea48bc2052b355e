"""The C++ reading of record lines (engine._C.SarTextBatch) and its word cache (engine._C.WordEncoder)
give exactly what the Python path gives: on thousands of generated lines, tricky and malformed ones
included, every line C++ takes is one sar.parse_json_line accepts, with the same texts, rewards,
steps and domain; lines it declines are read by Python with Python's errors."""
import json
import random
import struct

import numpy as np
import pytest

from engine import _C
from engine.data.reward_bins import FieldBins, RewardBins
from engine.data.sar import (
    RecordError,
    parse_json_line,
    serialize_parts,
    serialize_text,
)
from engine.data.synthetic import DOMAIN_REWARDS, SyntheticConfig, generate
from engine.data.tokenizer import (
    CACHED_TEXT_CHARS,
    RecordEncoder,
    split_words,
    train_tokenizer,
)

TRICKY_CHARS = ["a", "b", "Z", "_", "0", " ", "  ", "\\", "\n", "\r", "\t", ";", "=", "<", "|", ">", "<|", "|>",
                '"', "/", "\u2581", "é", "中", "🙂", "\x00", "\x1f", "\u2028", "<|state|>", "<|r3|>", "\ud7ff"]
NUMBER_TOKENS = ["0", "-0", "7", "-12", "123456789012345678", "-999999999999999999", "1234567890123456789",
                 "0.0", "-0.0", "1.5", "1E5", "1e-7", "2.5e+3", "-3.25E-2", "1e15", "999999999999999.0",
                 "1e400", "-1e400", "5e-324", "2.5e-310", "1e-400", "1234.625", "0.1", "1.0000005", "1e16",
                 "123456.5", "0.000123456789", "9007199254740993", "1" + "0" * 70]


def random_scalar(rng):
    kind = rng.randrange(8)
    if kind == 0:
        return "".join(rng.choice(TRICKY_CHARS) for _ in range(rng.randrange(6)))
    if kind == 1:
        return rng.choice(["red shoes", "brand07", "65+", "", "x"])
    if kind == 2:
        return rng.randint(-10 ** rng.randint(1, 19), 10 ** rng.randint(1, 19))
    if kind == 3:
        return rng.uniform(-1, 1) * 10.0 ** rng.randint(-12, 20)
    if kind == 4:
        return struct.unpack("d", struct.pack("Q", rng.getrandbits(64)))[0]  # any double, NaN/inf too
    if kind == 5:
        return float(rng.randint(-10 ** 16, 10 ** 16))
    return rng.choice([True, False, None])


def random_fields(rng, reward=False):
    names = ["user_age", "x", "_q", "a.b", "a-b", "Z9", "click", "cost"]
    out = {}
    for _ in range(rng.randrange(1 if reward else 0, 5)):
        value = (rng.choice([0, 1, True, False, rng.random(), rng.randint(-5, 5) * 0.25, 3, -7])
                 if reward else random_scalar(rng))
        out[rng.choice(names) + ("" if rng.random() < 0.7 else str(rng.randrange(3)))] = value
    return out


def random_object(rng):
    step = lambda: {"state": random_fields(rng), "action": random_fields(rng), "reward": random_fields(rng, True)}
    domain = rng.choice(["ads/ctr", "shop", "a.b-c/d_e", "9x"])
    if rng.random() < 0.3:
        obj = {"domain": domain, "steps": [step() for _ in range(rng.randint(1, 3))]}
    else:
        obj = {"domain": domain, **step()}
    if rng.random() < 0.5:
        obj["meta"] = {"p": rng.random(), "nested": [{"k": [1, None, {"k": "🙂"}]}, "s\\/t", -0.0],
                       "big": 10 ** 30, "dup_elsewhere": {"p": 1}}
    keys = list(obj)
    rng.shuffle(keys)  # fields keep their order; the record's keys come in any order
    return {k: obj[k] for k in keys}


def dumps(rng, obj):
    text = json.dumps(obj, ensure_ascii=rng.random() < 0.5,
                      separators=rng.choice([(",", ":"), (", ", ": "), (" ,\t", " :  ")]))
    return rng.choice(["", " ", "\t"]) + text + rng.choice(["", "\n", " \r\n", "\t"])


def first_field(line, key, field):
    """``line`` with ``field`` put first in its ``key`` object (whichever separators it has)."""
    for opening in (f'"{key}": {{', f'"{key}":{{', f'"{key}" :  {{'):
        line = line.replace(opening, opening + field + ", ", 1)
    return line


def mutate(rng, line):
    """A line broken or made unusual in one of the ways json or validation treats specially."""
    kind = rng.randrange(12)
    i = rng.randrange(len(line))
    if kind == 0:
        return line[:i] + line[i + 1:]
    if kind == 1:
        return line[:i] + rng.choice(['"', "{", "}", ",", ":", "\\", "x", "[", "\x01", "0"]) + line[i:]
    if kind == 2:
        return line[:i]
    if kind == 3:
        return line.replace('"domain"', '"domain": "dup", "domain"', 1)
    if kind == 4:
        return first_field(line, "state", '"x": 1, "x": 2')
    if kind == 5:
        token = rng.choice(NUMBER_TOKENS + ["NaN", "-Infinity", "Infinity", "01", "1.", ".5", "-", "+1", "1e"])
        return first_field(line, "state", f'"n": {token}')
    if kind == 6:
        token = rng.choice(NUMBER_TOKENS + ["true", "false", "null", '"1"', "[1]", "{}"])
        return first_field(line, "reward", f'"r": {token}')
    if kind == 7:
        return line.replace('"user_age"', '"user\\u005fage"').replace('"x"', '"\\u0078"')
    if kind == 8:
        return "\ufeff" + line
    if kind == 9:
        return line.rstrip() + rng.choice([" x", "}", "\x0c", " {}"])
    if kind == 10:
        return line.replace('"meta"', '"other"', 1).replace('"domain"', '"domains"', 1)
    return line.replace('": "', '": "\\ud800', 1)


def lines_for_test(count=4000, seed=0):
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        line = dumps(rng, random_object(rng))
        lines.append(mutate(rng, line) if rng.random() < 0.35 else line)
    lines += ['{"domain":"d","state":{},"action":{},"reward":{"c":1},"steps":[]}',
              '{"domain":"d","steps":[{"state":{},"action":{},"reward":{"c":1}}],"state":{}}',
              '{"domain":"d","steps":[{"state":{},"action":{},"reward":{}}]}',
              '{"domain":"d","steps":[{"state":{},"action":{}}]}',
              '{"domain":"d","state":{},"action":{},"reward":{"c":1},"meta":' + "[" * 70 + "]" * 70 + "}",
              '{"domain":"d","state":{},"action":{},"reward":{"c":1},"meta":' + "[" * 40 + "]" * 40 + "}",
              '{"domain":"d","state":{"s":"\\ud83d\\ude00 \\u00e9\\n\\t\\/\\b\\f"},"action":{},"reward":{"c":true}}',
              '{"domain":null,"state":{},"action":{},"reward":{"c":1}}', '[1]', '{}', '', '   ']
    return lines


def python_reading(line, float_digits):
    """What the Python path makes of a line: the RecordError, or (domain, steps, episode, texts, rewards)."""
    try:
        record = parse_json_line(line, "f:1")
        texts, _ = serialize_parts(record, lambda d, f, v: 0, float_digits)
    except RecordError as exc:
        return exc
    rewards = [(name, value) for step in record.steps for name, value in step.reward.items()]
    return record.domain, len(record.steps), record.episode, texts, rewards


def cxx_reading(line, float_digits):
    batch = _C.SarTextBatch(float_digits)
    if batch.add_json_lines([line], 0) == 0:
        return None
    keys, key_index, values, _ = batch.rewards()
    names, domains, steps, episodes, _ = batch.records()
    rewards = [(keys[k][1], v) for k, v in zip(key_index.tolist(), values.tolist())]
    return names[domains[0]], int(steps[0]), bool(episodes[0]), batch.texts(0), rewards


def same_rewards(a, b):
    return [n for n, _ in a] == [n for n, _ in b] and all(
        struct.pack("d", x) == struct.pack("d", y) for (_, x), (_, y) in zip(a, b))  # -0.0 included


@pytest.mark.parametrize("float_digits", [6, 3, 17])
def test_lines_taken_read_as_python_reads_them(float_digits):
    taken = refused = 0
    for line in lines_for_test(seed=float_digits):
        expected, got = python_reading(line, float_digits), cxx_reading(line, float_digits)
        if got is None:
            continue
        assert not isinstance(expected, RecordError), (line, str(expected))
        assert got[:4] == expected[:4], line
        assert same_rewards(got[4], expected[4]), line
        taken += 1
    for line in lines_for_test(seed=100 + float_digits):
        refused += isinstance(python_reading(line, float_digits), RecordError)
    assert taken > 2000 and refused > 500  # both paths were exercised


def test_every_plain_record_and_number_is_taken():
    """The common case stays on the C++ path: synthetic logs, escapes, unicode, numbers json reads
    to ints and finite floats, and the texts equal serialize_text's with a classifier."""
    config = SyntheticConfig(seed=1, train_per_domain=40)
    objects = [r for domain in DOMAIN_REWARDS for r in generate(config, domain, "train")]
    objects.append({"domain": "d", "state": {"s": "a\\b\n\r;=<|x|> <|state|>\u2581\x00 é 中 🙂"},
                    "action": {"f": 0.1, "g": -0.0, "h": 1e15, "i": 1e-5, "j": 123456.5, "k": 1234.625},
                    "reward": {"c": True, "d": -0.0, "e": 2.5e-3}})
    lines = [json.dumps(o, ensure_ascii=a) for o in objects for a in (True, False)]
    lines += [f'{{"domain":"d","state":{{"n":{t}}},"action":{{}},"reward":{{"r":{t}}}}}'
              for t in NUMBER_TOKENS if t not in ("1e400", "-1e400", "1e-400", "2.5e-310", "5e-324", "1" + "0" * 70)]
    batch = _C.SarTextBatch(6)
    assert batch.add_json_lines(lines, 0) == len(lines)
    for index, line in enumerate(lines):
        record = parse_json_line(line, "x")
        assert "".join(t + "<|r1|>" for t in batch.texts(index)) == serialize_text(record, lambda d, f, v: 1)


def test_declined_lines_are_the_unusual_ones():
    declined = ['{"domain":"d","state":{"n":1%s},"action":{},"reward":{"r":1}}' % ("0" * 64),
                '{"domain":"d","state":{"n":NaN},"action":{},"reward":{"r":1}}',
                '{"domain":"d","state":{"n":1e400},"action":{},"reward":{"r":1}}',
                '{"domain":"d","state":{"s":"\\ud800"},"action":{},"reward":{"r":1}}',
                '{"domain":"d","state":{"a":1,"a":1},"action":{},"reward":{"r":1}}',
                '{"domain":"d","state":{},"action":{},"reward":{"r":1},"meta":{"k":1,"k":2}}',
                '{"domain":"d","state":{},"action":{},"reward":{"r":1},"meta":{"\\u006b":1}}',
                '{"domain":"d","state":{"q":{"n":1}},"action":{},"reward":{"r":1}}',
                '{"domain":"d","state":{},"action":{},"reward":{"r":"1"}}', '{"domain":"d","steps":[]}',
                '{"domain":"d","state":{},"action":{},"reward":{"r":1}} x', "\ufeff{}", 7]
    batch = _C.SarTextBatch(6)
    for index, line in enumerate(declined):
        assert batch.add_json_lines(declined, index) == 0, line
    good = '{"domain":"d","state":{},"action":{},"reward":{"r":1}}'
    assert batch.add_json_lines([good, good, declined[0], good], 0) == 2 and len(batch) == 2
    assert batch.add_json_lines([good, good, declined[0], good], 3) == 1 and len(batch) == 3


def test_word_cutting_equals_split_words():
    rng = random.Random(5)
    pieces = ["<|domain|>", "<|state|>", "<|action|>", "<|reward|>", "<|r1|>", "<|", "|>", "<", " ", "  ",
              "\u2581", "a", "bc", "é", "中", "🙂", "=", ";"]
    words = _C.WordEncoder(True, CACHED_TEXT_CHARS, 16)
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(12)))
        assert words.split(text) == split_words(text), text


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    rng = random.Random(9)
    objects = [random_object(rng) for _ in range(600)]
    lines = [json.dumps(o) for o in objects]
    records = [parse_json_line(line, "x") for line in lines if not isinstance(python_reading(line, 6), RecordError)]
    bins = RewardBins.fit_records(records)
    # Trained on plain logs: the tricky characters of the test lines become byte pieces.
    config = SyntheticConfig(seed=2, train_per_domain=60)
    plain_records = [parse_json_line(json.dumps(r), "x") for d in DOMAIN_REWARDS for r in generate(config, d, "train")]
    plain_bins = RewardBins.fit_records(plain_records)
    texts = [serialize_text(r, plain_bins.classify) for r in plain_records]
    tmp = tmp_path_factory.mktemp("fast")
    sym = train_tokenizer(texts, str(tmp / "sym.model"), vocab_size=400)
    plain = train_tokenizer(texts, str(tmp / "plain.model"), vocab_size=400, special_symbols=(),
                            add_dummy_prefix=True)
    return {"sym": sym, "plain": plain, "bins": bins}


def python_encoding(encoder, items, classify):
    """The reference: every item read by Python, each text encoded on its own by SentencePiece."""
    outcomes, tokens, lengths, rewards = [], [], [], []
    classifier = encoder.bins.classify if classify else lambda d, f, v: 0
    for where, line in items:
        try:
            record = parse_json_line(line, where)
            texts, _ = serialize_parts(record, classifier, encoder.float_digits)
        except RecordError as exc:
            outcomes.append(str(exc))
            continue
        outcomes.append((len(texts), record.domain, len(record.steps), record.episode))
        for text in texts:
            ids = encoder.tokenizer.encode(text)
            tokens += ids
            lengths.append(len(ids))
        rewards += [(record.domain, name, value) for step in record.steps for name, value in step.reward.items()]
    return outcomes, tokens, lengths, rewards


@pytest.mark.parametrize("which", ["sym", "plain"])
@pytest.mark.parametrize("classify", [True, False])
def test_encode_lines_equals_the_python_path(tokenizers, which, classify):
    tok, bins = tokenizers[which], tokenizers["bins"]
    # Some rewards the bins cannot classify: a field they do not know, a binary field given 0.5.
    bins = RewardBins({**bins.fields, ("ads/ctr", "click"): FieldBins("binary", (), 10)}, bins.num_bins)
    lines = lines_for_test(count=1500, seed=21)
    lines += ['{"domain":"ads/ctr","state":{},"action":{},"reward":{"click":0.5}}',
              '{"domain":"ads/ctr","state":{},"action":{},"reward":{"unknown_field":1}}']
    items = [(f"f.jsonl:{i + 1}", line) for i, line in enumerate(lines) if line.strip()]
    encoder = RecordEncoder(tok, bins)
    got_outcomes, got_tokens, got_lengths, keys, values = [], [], [], [], []
    for start in range(0, len(items), 256):  # chunk after chunk with the same encoder (and cache)
        texts, outcomes = encoder.encode_lines(items[start:start + 256], classify, 1, np.int32)
        got_outcomes += [str(o) if isinstance(o, RecordError) else o for o in outcomes]
        got_tokens += texts.tokens.tolist()
        got_lengths += texts.text_lengths.tolist()
        keys += [texts.keys[k] for k in texts.key_index.tolist()]
        values += texts.values.tolist()
        assert texts.tokens.dtype == np.int32 and sum(texts.rewards_per_record.tolist()) == len(texts.text_lengths)
        if classify:
            assert texts.classes.tolist() == [bins.classify(d, f, v) for (d, f), v in
                                              zip([texts.keys[k] for k in texts.key_index.tolist()],
                                                  texts.values.tolist())]
    expected_outcomes, expected_tokens, expected_lengths, expected_rewards = python_encoding(
        RecordEncoder(tok, bins), items, classify)
    assert got_outcomes == expected_outcomes
    assert got_tokens == expected_tokens and got_lengths == expected_lengths
    assert [(d, f) for d, f, _ in expected_rewards] == keys
    assert [struct.pack("d", v) for _, _, v in expected_rewards] == [struct.pack("d", v) for v in values]
    errors = [o for o in got_outcomes if isinstance(o, str)]
    assert any("invalid JSON" in e for e in errors) and any("f.jsonl:" in e for e in errors)
    if classify:
        assert any("reward.unknown_field': no reward bins" in e for e in errors)
        assert any("not 0 or 1" in e for e in errors)


def test_word_cache_keeps_short_words_up_to_its_capacity(tokenizers):
    tok = tokenizers["sym"]
    words = _C.WordEncoder(True, 9, 2)  # words of up to 9 characters, 2 of them
    text = "<|state|>a=1 " + "x" * 9
    batch = _C.SarTextBatch(6)
    batch.add_record("d", 1, False, [text], ["a"], [1.0])
    calls = []

    def encode(request):
        calls.append(list(request))
        return tok.encode_batch(request)
    tokens, lengths, per_record = batch.encode(words, encode)
    assert tokens.tolist() == tok.encode(text) and lengths.tolist() == [len(tokens)] and per_record.tolist() == [1]
    assert calls == [["<|state|>", "a=1", " " + "x" * 9]] and len(words) == 2  # 10 characters: not kept
    assert batch.encode(words, encode)[0].tolist() == tokens.tolist() and calls[1] == [" " + "x" * 9]
    other = _C.SarTextBatch(6)
    other.add_record("d", 1, False, ["<|state|>b=2"], ["b"], [0.0])
    other.encode(words, encode)
    other.encode(words, encode)
    assert calls[2:] == [["b=2"], ["b=2"]] and len(words) == 2  # full
    whole = _C.WordEncoder(False, 48, 100)  # a model that merges across spaces: whole texts
    assert batch.encode(whole, encode)[0].tolist() == tokens.tolist() and calls[4] == [text] and len(whole) == 1


def test_bad_use_is_refused_by_name(tokenizers):
    batch = _C.SarTextBatch(6)
    with pytest.raises(ValueError, match="one reward field and value per text, got 1 texts, 2 fields"):
        batch.add_record("d", 1, False, ["a="], ["a", "b"], [1.0])
    with pytest.raises(ValueError, match="at least one text"):
        batch.add_record("d", 1, False, [], [], [])
    with pytest.raises(TypeError, match="texts must be str"):
        batch.add_record("d", 1, False, [b"a="], ["a"], [1.0])
    assert len(batch) == 0
    batch.add_record("d", 1, False, ["a="], ["a"], [1.0])
    with pytest.raises(IndexError, match="record 5 out of range for 1 records"):
        batch.drop(5)
    with pytest.raises(ValueError, match=r"one list of token ids per word \(1 words\)"):
        batch.encode(_C.WordEncoder(True, 48, 10), lambda words: [])
    with pytest.raises(ValueError, match="token id -3 out of range"):
        batch.encode(_C.WordEncoder(True, 48, 10), lambda words: [[-3]])
    with pytest.raises(ValueError, match=r"float_digits must be in \[0, 100\]"):
        _C.SarTextBatch(-1)
    batch.drop(0)
    tokens, lengths, per_record = batch.encode(_C.WordEncoder(True, 48, 10), lambda words: 1 / 0)
    assert tokens.size == lengths.size == per_record.size == 0 and batch.rewards()[1].size == 0
