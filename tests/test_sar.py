"""SAR records: validation errors name file:line and field; serialization is deterministic and marker-safe."""
import json
import random

import pytest

from engine.data.sar import (REWARD_LABELS, SEGMENT_MARKERS, RecordError, deserialize_text, escape_value,
                             format_value, parse_json_line, parse_record, reward_label, serialize_segments,
                             serialize_text, unescape_value)

WHERE = "logs/train.jsonl:7"


def classify_click_cost(domain, field, value):
    if field == "click":
        return int(value)
    if field == "cost":
        return 0 if value <= 1.0 else 1
    raise KeyError(f"no reward bins for domain '{domain}' field '{field}'")


def single(**overrides):
    record = {"domain": "ads", "state": {"query": "red running shoes", "device": "mobile"},
              "action": {"keyword": "running shoes", "bid": 0.42}, "reward": {"click": 1}}
    record.update(overrides)
    return record


def test_golden_single_and_episode_text():
    text = serialize_text(parse_record(single()), classify_click_cost)
    assert text == ("<|domain|>ads<|state|>query=red running shoes; device=mobile"
                    "<|action|>keyword=running shoes; bid=0.42<|reward|>click=<|r1|>")
    episode = {"domain": "game/level-1", "steps": [
        {"state": {"hp": 10, "alive": True, "note": None}, "action": {"move": "left"}, "reward": {"click": 0, "cost": 2.5}},
        {"state": {"hp": 7.0}, "action": {}, "reward": {"click": True}}]}
    text = serialize_text(parse_record(episode), classify_click_cost)
    assert text == ("<|domain|>game/level-1<|state|>hp=10; alive=true; note=null<|action|>move=left"
                    "<|reward|>click=<|r0|>; cost=<|r1|><|state|>hp=7<|action|><|reward|>click=<|r1|>")


def test_field_order_is_the_records_and_serialization_is_deterministic():
    a = parse_json_line(json.dumps(single(state={"b": 1, "a": 2})), WHERE)
    b = parse_json_line(json.dumps(single(state={"a": 2, "b": 1})), WHERE)
    ta, tb = serialize_text(a, classify_click_cost), serialize_text(b, classify_click_cost)
    assert "b=1; a=2" in ta and "a=2; b=1" in tb
    # Same record, different JSON whitespace: same text, every time.
    c = parse_json_line(json.dumps(single(state={"b": 1, "a": 2}), indent=2).replace("\n", " "), WHERE)
    assert serialize_text(c, classify_click_cost) == ta == serialize_text(a, classify_click_cost)


def test_number_formatting():
    assert [format_value(v) for v in (3, 3.0, -0.0, 0.1 + 0.2, 1e-7, 123456789.0, True, None)] == \
        ["3", "3", "0", "0.3", "1e-07", "123456789", "true", "null"]


ADVERSARIAL = ["<|state|>", "<|reward|>click=<|r1|>", "a; b=c", "x=y", "back\\slash", "trailing\\", "<|", "|>",
               "<<|r0|>|>", "line\nbreak\r", "\\;", "; ", "=", "", " spaced ", "<|domain|>evil", "ünïcode 🙂"]


def test_adversarial_values_cannot_forge_markers():
    record = parse_record({"domain": "d", "steps": [
        {"state": {f"s{i}": v for i, v in enumerate(ADVERSARIAL)}, "action": {"a": ADVERSARIAL[1]},
         "reward": {"click": 1}},
        {"state": {"s": "<|action|>"}, "action": {"a": "<|r0|>"}, "reward": {"cost": 3.0}}]})
    segments = serialize_segments(record, classify_click_cost)
    text = "".join(s.text for s in segments)
    # Markers appear only where the layout puts them: 2 steps x 3 + domain; labels once per reward.
    for marker, expected in zip(SEGMENT_MARKERS, (1, 2, 2, 2)):
        assert text.count(marker) == expected, marker
    assert text.count("<|") == 1 + 6 + 2
    for seg in segments:
        if not seg.is_reward:
            assert not any(label in seg.text for label in REWARD_LABELS)
    domain, steps = deserialize_text(text)
    assert domain == "d"
    assert steps[0][0] == {f"s{i}": v for i, v in enumerate(ADVERSARIAL)}
    assert steps[0][1] == {"a": ADVERSARIAL[1]} and steps[0][2] == {"click": 1}
    assert steps[1] == ({"s": "<|action|>"}, {"a": "<|r0|>"}, {"cost": 1})


def test_random_strings_round_trip():
    rng = random.Random(1234)
    alphabet = ["<", "|", ">", ";", "=", "\\", " ", "\n", "r", "1", "a", "state", "<|", "|>", "é"]
    for _ in range(300):
        state = {f"f{i}": "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
                 for i in range(rng.randint(0, 4))}
        action = {"a": "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))}
        text = serialize_text(parse_record({"domain": "x", "state": state, "action": action,
                                            "reward": {"click": rng.randint(0, 1)}}), classify_click_cost)
        assert deserialize_text(text)[1][0][:2] == (state, action)
        value = action["a"]
        assert "<|" not in escape_value(value) and unescape_value(escape_value(value)) == value


def test_reward_labels_and_segments():
    assert reward_label(0) == "<|r0|>" and len(set(REWARD_LABELS)) == len(REWARD_LABELS)
    with pytest.raises(ValueError):
        reward_label(len(REWARD_LABELS))
    segments = serialize_segments(parse_record(single(reward={"click": 0, "cost": 7})), classify_click_cost)
    rewards = [s for s in segments if s.is_reward]
    assert [(s.field, s.label_class, s.text) for s in rewards] == [("click", 0, "<|r0|>"), ("cost", 1, "<|r1|>")]
    assert segments[-1].is_reward and segments[0].text.endswith("<|reward|>click=")


def test_meta_is_kept_but_not_serialized():
    record = parse_record(single(meta={"propensity_score": 0.0123456, "nested": {"ok": [1, 2]}}))
    assert record.meta["propensity_score"] == 0.0123456
    assert "0.0123" not in serialize_text(record, classify_click_cost)


BAD = [
    ('{"domain": "ads", "state": {}', None, "invalid JSON"),
    ('[1, 2]', None, "must be a JSON object"),
    ('{"state": {}, "action": {}, "reward": {"click": 1}}', "domain", "missing"),
    ('{"domain": "a b", "state": {}, "action": {}, "reward": {"click": 1}}', "domain", "must be a name"),
    ('{"domain": 5, "state": {}, "action": {}, "reward": {"click": 1}}', "domain", "must be a name"),
    ('{"domain": "d", "state": {}, "action": {}, "reward": {"click": 1}, "extra": 1}', "extra", "unknown key"),
    ('{"domain": "d", "action": {}, "reward": {"click": 1}}', "state", "missing"),
    ('{"domain": "d", "state": [], "action": {}, "reward": {"click": 1}}', "state", "object of named fields"),
    ('{"domain": "d", "state": {"user": {"age": 3}}, "action": {}, "reward": {"click": 1}}', "state.user", "nested object"),
    ('{"domain": "d", "state": {}, "action": {"tags": [1]}, "reward": {"click": 1}}', "action.tags", "nested list"),
    ('{"domain": "d", "state": {"q": "ok \\ud83d\\ude00", "s": "a\\ud800"}, "action": {}, "reward": {"click": 1}}',
     "state.s", "lone surrogate"),
    ('{"domain": "d", "state": {}, "action": {"bid": NaN}, "reward": {"click": 1}}', "action.bid", "non-finite"),
    ('{"domain": "d", "state": {}, "action": {}, "reward": {"cost": -Infinity}}', "reward.cost", "non-finite"),
    ('{"domain": "d", "state": {}, "action": {}, "reward": {"click": "yes"}}', "reward.click", "number or a boolean"),
    ('{"domain": "d", "state": {}, "action": {}, "reward": {"click": null}}', "reward.click", "number or a boolean"),
    ('{"domain": "d", "state": {}, "action": {}, "reward": {}}', "reward", "at least one field"),
    ('{"domain": "d", "state": {"a=b": 1}, "action": {}, "reward": {"click": 1}}', "state.a=b", "field names"),
    ('{"domain": "d", "state": {"a": 1, "a": 2}, "action": {}, "reward": {"click": 1}}', None, "duplicate key 'a'"),
    ('{"domain": "d", "steps": []}', "steps", "non-empty list"),
    ('{"domain": "d", "steps": [{"state": {}, "action": {}, "reward": {"click": 1}}, '
     '{"state": {}, "action": {}}]}', "steps[1].reward", "missing"),
    ('{"domain": "d", "steps": [{"state": {}, "action": {}, "reward": {"click": 1}, "x": 1}]}', "steps[0].x", "unknown key"),
    ('{"domain": "d", "steps": [{"state": {"q": {}}, "action": {}, "reward": {"click": 1}}]}', "steps[0].state.q", "nested"),
    ('{"domain": "d", "steps": [], "state": {}}', "steps", "not both"),
]


@pytest.mark.parametrize("line,field,reason", BAD)
def test_validation_error_names_file_line_and_field(line, field, reason):
    with pytest.raises(RecordError) as info:
        parse_json_line(line, WHERE)
    message = str(info.value)
    assert message.startswith(WHERE + ": ")
    assert info.value.field_path == field
    if field:
        assert f"field '{field}'" in message
    assert reason in message


def test_unbinnable_reward_names_the_field():
    record = parse_json_line(json.dumps({"domain": "d", "steps": [
        {"state": {}, "action": {}, "reward": {"click": 1}},
        {"state": {}, "action": {}, "reward": {"dwell": 3}}]}), WHERE)
    with pytest.raises(RecordError, match=r"logs/train.jsonl:7: field 'steps\[1\].reward.dwell': no reward bins"):
        serialize_text(record, classify_click_cost)


@pytest.mark.parametrize("ending", ["\n", "\r\n", ""])
def test_json_error_column_is_on_the_line_itself(ending):
    # A record line as read from a file, its closing '}' missing: the parser stops where the '}'
    # belongs, column 84 (one past the 83 characters), not at column 1 of the next line.
    line = '{"domain":"ads","state":{"query":"shoes"},"action":{"bid":0.5},"reward":{"click":1}'
    assert len(line) == 83
    with pytest.raises(RecordError) as info:
        parse_json_line(line + ending, WHERE)
    assert str(info.value) == f"{WHERE}: invalid JSON: Expecting ',' delimiter at column 84"
    # An error inside the line keeps its own column (the stray ':' is character 11).
    with pytest.raises(RecordError, match=r"column 11\Z"):
        parse_json_line('{"domain":: "ads"}' + ending, WHERE)


def test_fast_json_path_gives_json_objects_or_defers_to_json():
    """Lines the fast parser (orjson, when installed) accepts decode to exactly json's objects;
    repeated keys, NaN, huge integers and lone surrogates are left to json and its errors."""
    import random
    from engine.data.sar import _fast_loads, _reject_duplicates
    rng = random.Random(2)
    lines = []
    for i in range(3000):
        x = rng.uniform(-1e6, 1e6) * 10 ** rng.randint(-30, 30)
        big = 2 ** rng.choice((10, 53, 62, 64))
        quote_colon = '\\":' if i % 5 == 0 else ""  # a quote and colon inside a string value
        obj = {"domain": "d", "state": {"f": x, "g": rng.randint(-big, big), "s": f"a{quote_colon}b{i} ✓"},
               "action": {"e": float(f"{x:.{rng.randint(1, 17)}e}"), "z": -0.0}, "reward": {"r": rng.random()},
               "meta": {"nested": [{"k": [1, {"k": 2}]}, None, True]}}
        lines.append(json.dumps(obj, ensure_ascii=rng.random() < 0.5, separators=(",", ":") if i % 2 else None))
    deferred = ['{"a":1,"a":2}', '{"a" :1,"a":2}', '{"a":{"b":1,"b":2}}', '{"a":[{"b":1},{"b":1,"b":3}]}',
                '{"a":NaN}', '{"a":123456789012345678901234567890}', '{"a":"\\ud800"}', '[1]', '{"a":1', '']
    for line in lines + deferred:
        fast = _fast_loads(line)
        if fast is None:
            continue
        expected = json.loads(line, object_pairs_hook=_reject_duplicates, parse_constant=float)
        assert repr(fast) == repr(expected) and fast == expected, line
    assert all(_fast_loads(line) is None for line in deferred)
    try:
        import orjson  # noqa: F401
    except ImportError:
        return
    assert sum(_fast_loads(line) is not None for line in lines) > 1000  # the fast path is taken
