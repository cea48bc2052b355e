"""SAR records: parsing, validation and deterministic serialization to text.

A record is one decision or one episode (a list of decisions) of one domain:

    {"domain": "ads", "state": {...}, "action": {...}, "reward": {...}, "meta": {...}}
    {"domain": "ads", "steps": [{"state": {...}, "action": {...}, "reward": {...}}, ...], "meta": {...}}

State and action fields are flat: each value is a string, a number, a boolean or null (nested objects
and lists are refused; flatten them into named fields such as ``user.age``). Reward fields are numbers
or booleans. ``meta`` is optional, may hold any JSON value (for example an off-policy propensity or a
true reward distribution) and is never serialized into the text the model reads.

Text layout (fields in the order the record declares them):

    <|domain|>ads<|state|>query=red shoes; device=mobile<|action|>bid=0.42<|reward|>click=<|r1|>

Episodes repeat ``<|state|>...<|action|>...<|reward|>...`` once per step. Every reward value is
replaced by a class label ``<|rK|>`` (see reward_bins.py), so the reward segment is a closed set of
labels. Values are escaped so that no value can contain ``<|`` (the start of every marker and label),
nor an unescaped ``;`` or ``=``: ``deserialize_text`` recovers every segment and field exactly.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Union

try:  # a faster parser when installed (not a dependency); json gives the same objects otherwise
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None

Scalar = Union[str, int, float, bool, None]

DOMAIN_MARKER = "<|domain|>"
STATE_MARKER = "<|state|>"
ACTION_MARKER = "<|action|>"
REWARD_MARKER = "<|reward|>"
SEGMENT_MARKERS = (DOMAIN_MARKER, STATE_MARKER, ACTION_MARKER, REWARD_MARKER)
MAX_REWARD_CLASSES = 16
FIELD_SEPARATOR = "; "
KEY_VALUE_SEPARATOR = "="
FLOAT_DIGITS = 6


def reward_label(class_index: int) -> str:
    """The text of reward class ``class_index``: one closed set shared by every reward field."""
    if not 0 <= class_index < MAX_REWARD_CLASSES:
        raise ValueError(f"reward class {class_index} outside [0, {MAX_REWARD_CLASSES})")
    return f"<|r{class_index}|>"


REWARD_LABELS = tuple(reward_label(k) for k in range(MAX_REWARD_CLASSES))
# What a trained tokenizer registers as single tokens.
SPECIAL_SYMBOLS = SEGMENT_MARKERS + REWARD_LABELS

_DOMAIN_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-/]*\Z")
_FIELD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*\Z")
_TOP_KEYS = ("domain", "state", "action", "reward", "steps", "meta")
_STEP_KEYS = ("state", "action", "reward")


class RecordError(ValueError):
    """A malformed record; the message names where (file:line) and which field."""

    def __init__(self, where: str, field_path: str | None, message: str):
        self.where = where
        self.field_path = field_path
        self.reason = message
        location = f"{where}: " if where else ""
        what = f"field '{field_path}': " if field_path else ""
        super().__init__(f"{location}{what}{message}")


@dataclass(frozen=True, eq=True)
class Step:
    state: dict[str, Scalar]
    action: dict[str, Scalar]
    reward: dict[str, float]


@dataclass(frozen=True, eq=True)
class SARRecord:
    domain: str
    steps: tuple[Step, ...]
    episode: bool = False
    meta: Any = None
    where: str = field(default="", compare=False)


# --------------------------------------------------------------------------- parsing / validation


def _reject_duplicates(pairs):
    obj = dict(pairs)
    if len(obj) != len(pairs):  # rare: find the first repeated key for the message
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key '{key}'")
            seen.add(key)
    return obj


_BEYOND_64_BITS = float(2 ** 63)  # orjson reads integers beyond 64 bits as floats at least this large


def _fast_loads(line: str):
    """The line's object by orjson when that is certainly json's: parsed, and without repeated keys.

    A key ends in ``":`` unless whitespace precedes its colon; without any whitespace before a
    colon, the line holds at least as many ``":`` as keys, and the parsed objects hold fewer
    keys than the line when one repeats. So equal counts prove no key repeats. Anything else
    (invalid JSON, NaN literals, lone surrogates, a float of 2**63 or more, which may have been
    a huge integer, a count that differs) is None: json parses it, with its errors.
    """
    if _orjson is None or " :" in line or "\t:" in line or "\n:" in line or "\r:" in line:
        return None
    try:
        obj = _orjson.loads(line)
    except _orjson.JSONDecodeError:
        return None
    if type(obj) is not dict or line.count('":') != _num_keys(obj):
        return None
    return obj


def _num_keys(obj: dict) -> int:
    """Keys of the objects in ``obj``, or -1 when it holds a float that may be a huge integer."""
    count, pending = 0, [obj]
    while pending:
        item = pending.pop()
        if type(item) is dict:
            count += len(item)
            item = item.values()
        for value in item:
            kind = type(value)
            if kind is dict or kind is list:
                pending.append(value)
            elif kind is float and not -_BEYOND_64_BITS < value < _BEYOND_64_BITS:
                return -1
    return count


def parse_json_line(line: str, where: str) -> SARRecord:
    """Parse and validate one JSON Lines record; ``where`` is ``file:line`` for error messages.

    Preprocessing reads the common well-formed line in C++ (``engine._C.SarTextBatch``) to the same
    texts and rewards, and any other line here, so the errors are always this function's.
    """
    # Without its line ending, an error at the end of the line (a missing '}') is reported on this
    # line, at its column, instead of at column 1 of the line after it.
    line = line.rstrip("\r\n")
    obj = _fast_loads(line)
    if obj is not None:
        return parse_record(obj, where)
    try:
        # NaN/Infinity literals parse to floats so validation can name the field that holds them.
        obj = json.loads(line, object_pairs_hook=_reject_duplicates, parse_constant=float)
    except json.JSONDecodeError as exc:
        raise RecordError(where, None, f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    except ValueError as exc:  # duplicate key
        raise RecordError(where, None, f"invalid JSON: {exc}") from None
    return parse_record(obj, where)


def parse_item(where: str, payload: Any) -> SARRecord:
    """A record from what a log reader yields for one line: its JSON text, the object decoded from
    it (an OBD row), or the RecordError found reading it (raised)."""
    if isinstance(payload, RecordError):
        raise payload
    if isinstance(payload, str):
        return parse_json_line(payload, where)
    return parse_record(payload, where)


def parse_record(obj: Any, where: str = "") -> SARRecord:
    """Validate a decoded JSON object as a SAR record (single decision or episode)."""
    if not isinstance(obj, dict):
        raise RecordError(where, None, f"a record must be a JSON object, got {_type_name(obj)}")
    for key in obj:
        if key not in _TOP_KEYS:
            raise RecordError(where, key, f"unknown key (allowed: {', '.join(_TOP_KEYS)})")
    domain = obj.get("domain")
    if domain is None:
        raise RecordError(where, "domain", "missing")
    if not isinstance(domain, str) or not _DOMAIN_RE.match(domain):
        raise RecordError(where, "domain", f"must be a name matching {_DOMAIN_RE.pattern}, got {domain!r}")
    has_single = any(k in obj for k in _STEP_KEYS)
    if "steps" in obj:
        if has_single:
            raise RecordError(where, "steps", "a record has either 'steps' or state/action/reward, not both")
        steps_obj = obj["steps"]
        if not isinstance(steps_obj, list) or not steps_obj:
            raise RecordError(where, "steps", "must be a non-empty list of {state, action, reward} objects")
        steps = tuple(_parse_step(s, where, f"steps[{i}].") for i, s in enumerate(steps_obj))
        episode = True
    else:
        steps = (_parse_step(obj, where, "", allow_other=True),)
        episode = False
    return SARRecord(domain=domain, steps=steps, episode=episode, meta=obj.get("meta"), where=where)


def _parse_step(obj: Any, where: str, prefix: str, allow_other: bool = False) -> Step:
    if not isinstance(obj, dict):
        raise RecordError(where, prefix.rstrip("."), f"a step must be an object, got {_type_name(obj)}")
    if not allow_other:
        for key in obj:
            if key not in _STEP_KEYS:
                raise RecordError(where, prefix + key, "unknown key (allowed: state, action, reward)")
    for key in _STEP_KEYS:
        if key not in obj:
            raise RecordError(where, prefix + key, "missing")
    state = _parse_fields(obj["state"], where, prefix + "state")
    action = _parse_fields(obj["action"], where, prefix + "action")
    reward = _parse_fields(obj["reward"], where, prefix + "reward", reward=True)
    if not reward:
        raise RecordError(where, prefix + "reward", "must have at least one field")
    return Step(state=state, action=action, reward=reward)


_SCALAR_TYPES = (str, int, bool, type(None))  # float is checked for finiteness
_SURROGATE = re.compile("[\ud800-\udfff]")  # json keeps unpaired \ud800 escapes in the str
_NUMBER_TYPES = (int, bool)


def _parse_fields(obj: Any, where: str, path: str, reward: bool = False) -> dict:
    if type(obj) is not dict and not isinstance(obj, dict):
        raise RecordError(where, path, f"must be an object of named fields, got {_type_name(obj)}")
    match_name, isfinite = _FIELD_RE.match, math.isfinite
    # The common case (JSON's own types) is decided by exact type; anything else takes the checks
    # below, which also name the problem.
    if reward:
        out = {}
        for name, value in obj.items():
            kind = type(value)
            if match_name(name) and (kind is float and isfinite(value) or kind in _NUMBER_TYPES):
                out[name] = float(value)
            else:
                out[name] = _checked_value(name, value, where, path, reward)
        return out
    for name, value in obj.items():
        kind = type(value)
        if not (match_name(name) and (kind in _SCALAR_TYPES or kind is float and isfinite(value))) \
                or kind is str and not value.isascii() and _SURROGATE.search(value):
            _checked_value(name, value, where, path, reward)
    return dict(obj)


def _checked_value(name: str, value: Any, where: str, path: str, reward: bool):
    """A field's value as stored, or the RecordError that names what is wrong with it."""
    field_path = f"{path}.{name}"
    if not _FIELD_RE.match(name):
        raise RecordError(where, field_path, f"field names must match {_FIELD_RE.pattern}")
    if isinstance(value, (dict, list)):
        raise RecordError(where, field_path, f"nested {_type_name(value)} is not supported: "
                          "flatten it into named fields (e.g. 'user.age')")
    if isinstance(value, float) and not math.isfinite(value):
        raise RecordError(where, field_path, f"non-finite number {value!r}")
    if reward:
        if value is None or isinstance(value, str):
            raise RecordError(where, field_path, f"a reward must be a number or a boolean, got {_type_name(value)}")
        return float(value)
    if not (value is None or isinstance(value, (str, int, float, bool))):
        raise RecordError(where, field_path, f"unsupported value type {_type_name(value)}")
    if isinstance(value, str) and _SURROGATE.search(value):
        raise RecordError(where, field_path, "a lone surrogate (U+D800..U+DFFF, e.g. an unpaired \\ud800 "
                          "escape) is not text and cannot be tokenized")
    return value


def _type_name(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------- serialization


def format_value(value: Scalar, float_digits: int = FLOAT_DIGITS) -> str:
    """Deterministic text of a state/action value (types are not preserved: 1 and "1" read alike)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return format(value, f".{float_digits}g")
    return escape_value(value)


_NEEDS_ESCAPE = re.compile(r"[\\\n\r;=]|<\|")


_ESCAPES = (("\\", "\\\\"), ("\n", "\\n"), ("\r", "\\r"), (";", "\\;"), ("=", "\\="), ("<|", "<\\|"))
_UNESCAPES = {"\\": "\\", "n": "\n", "r": "\r", ";": ";", "=": "=", "|": "|"}


def escape_value(text: str) -> str:
    """Backslash-escape so a value never contains ``<|`` nor an unescaped ``;``, ``=`` or newline."""
    if _NEEDS_ESCAPE.search(text) is None:  # most values: nothing to escape
        return text
    for raw, escaped in _ESCAPES:  # backslash first so later escapes are not doubled
        text = text.replace(raw, escaped)
    return text


def unescape_value(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            if i + 1 >= len(text) or text[i + 1] not in _UNESCAPES:
                raise ValueError(f"bad escape at {i} in {text!r}")
            out.append(_UNESCAPES[text[i + 1]])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class Segment:
    """A piece of a record's text. Reward segments are exactly one class label."""

    text: str
    step: int = -1          # for reward segments: the step index
    field: str = ""         # for reward segments: the reward field name
    label_class: int = -1   # for reward segments: the class index (text == reward_label(label_class))

    @property
    def is_reward(self) -> bool:
        return self.label_class >= 0


# classify(domain, field, value) -> class index; reward_bins.RewardBins.classify has this shape.
Classifier = Callable[[str, str, float], int]


def _fields_text(fields: dict, float_digits: int) -> str:
    parts = []
    for name, value in fields.items():
        kind = type(value)  # JSON's own types first, without format_value's call
        if kind is str:
            text = value if _NEEDS_ESCAPE.search(value) is None else escape_value(value)
        elif kind is int:
            text = str(value)
        else:
            text = format_value(value, float_digits)
        parts.append(f"{name}{KEY_VALUE_SEPARATOR}{text}")
    return FIELD_SEPARATOR.join(parts)


def serialize_parts(record: SARRecord, classify: Classifier,
                    float_digits: int = FLOAT_DIGITS) -> tuple[list[str], list[int]]:
    """The record as (texts, classes): its text is ``texts[0] + label(classes[0]) + texts[1] + ...``.

    Every reward is preceded by a non-empty text (at least its field name) and the record ends
    with the label of its last reward, so the two lists have the same length.
    """
    texts: list[str] = []
    classes: list[int] = []
    domain = record.domain
    pending = DOMAIN_MARKER + domain
    for step_index, step in enumerate(record.steps):
        pending = (f"{pending}{STATE_MARKER}{_fields_text(step.state, float_digits)}"
                   f"{ACTION_MARKER}{_fields_text(step.action, float_digits)}{REWARD_MARKER}")
        for name, value in step.reward.items():
            try:
                cls = classify(domain, name, value)
            except (KeyError, ValueError) as exc:
                prefix = f"steps[{step_index}]." if record.episode else ""
                reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
                raise RecordError(record.where, f"{prefix}reward.{name}", str(reason)) from None
            texts.append(f"{pending}{name}{KEY_VALUE_SEPARATOR}")
            classes.append(cls)
            pending = FIELD_SEPARATOR
        pending = ""
    return texts, classes


def serialize_segments(record: SARRecord, classify: Classifier, float_digits: int = FLOAT_DIGITS) -> list[Segment]:
    """The record as alternating text and reward-label segments (text before every label, merged)."""
    texts, classes = serialize_parts(record, classify, float_digits)
    segments: list[Segment] = []
    parts = iter(zip(texts, classes))
    for step_index, step in enumerate(record.steps):
        for name in step.reward:
            text, cls = next(parts)
            segments.append(Segment(text))
            segments.append(Segment(reward_label(cls), step=step_index, field=name, label_class=cls))
    return segments


def serialize_text(record: SARRecord, classify: Classifier, float_digits: int = FLOAT_DIGITS) -> str:
    return "".join(s.text for s in serialize_segments(record, classify, float_digits))


_MARKER_RE = re.compile(r"<\|(domain|state|action|reward|r\d+)\|>")


def deserialize_text(text: str) -> tuple[str, list[tuple[dict, dict, dict]]]:
    """Inverse of serialize_text: (domain, [(state, action, reward classes)]), values as text.

    Exists to prove the layout unambiguous (tests round-trip adversarial values through it).
    """
    parts: list[tuple[str, str]] = []  # (marker name, following text)
    pos = 0
    for m in _MARKER_RE.finditer(text):
        if m.start() != pos:
            if not parts:
                raise ValueError(f"text before the first marker: {text[:m.start()]!r}")
            parts[-1] = (parts[-1][0], parts[-1][1] + text[pos:m.start()])
        parts.append((m.group(1), ""))
        pos = m.end()
    if pos != len(text):
        if not parts:
            raise ValueError("no markers in text")
        parts[-1] = (parts[-1][0], parts[-1][1] + text[pos:])
    if not parts or parts[0][0] != "domain":
        raise ValueError("text must start with the domain marker")
    domain = parts[0][1]
    steps, i = [], 1
    while i < len(parts):
        if parts[i][0] != "state" or i + 2 >= len(parts) or parts[i + 1][0] != "action" or parts[i + 2][0] != "reward":
            raise ValueError(f"expected state, action, reward markers at segment {i}")
        state, action = _parse_fields_text(parts[i][1]), _parse_fields_text(parts[i + 1][1])
        reward, pending_name = {}, parts[i + 2][1]
        i += 3
        while i < len(parts) and parts[i][0].startswith("r") and parts[i][0] != "reward":
            name = pending_name[len(FIELD_SEPARATOR):] if reward else pending_name
            if not name.endswith(KEY_VALUE_SEPARATOR) or (reward and not pending_name.startswith(FIELD_SEPARATOR)):
                raise ValueError(f"malformed reward field before a label: {pending_name!r}")
            reward[name[:-1]] = int(parts[i][0][1:])
            pending_name = parts[i][1]
            i += 1
        if pending_name or not reward:
            raise ValueError(f"malformed reward segment (trailing {pending_name!r})")
        steps.append((state, action, reward))
    return domain, steps


def _parse_fields_text(body: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    if not body:
        return fields
    items, current, i = [], [], 0
    while i < len(body):
        ch = body[i]
        if ch == "\\":
            current.append(body[i:i + 2])
            i += 2
        elif body.startswith(FIELD_SEPARATOR, i):
            items.append("".join(current))
            current = []
            i += len(FIELD_SEPARATOR)
        else:
            current.append(ch)
            i += 1
    items.append("".join(current))
    for item in items:
        name, sep, value = item.partition(KEY_VALUE_SEPARATOR)
        if not sep:
            raise ValueError(f"field without '=': {item!r}")
        fields[name] = unescape_value(value)
    return fields
