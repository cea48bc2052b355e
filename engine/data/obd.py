"""Open Bandit Dataset (OBD) CSV layout -> SAR records.

Layout: ``<policy>/<campaign>/<campaign>.csv`` (the log) with ``item_context.csv`` beside it. Log
columns: row number, ``timestamp``, ``item_id``, ``position``, ``click``, ``propensity_score``,
``user_feature_0..3`` (hashed categories), ``user-item_affinity_<k>`` (one per item of the campaign).

Each row becomes one decision of domain ``obd/<policy>/<campaign>``:

- state: the four user features, the slot ``position`` (1-3), ``affinity_nonzero`` (how many items the
  user has a non-zero affinity with) and ``affinity_top`` (up to 3 such item ids, highest first, or
  ``none``): the 30-80 affinity columns are summarized, not spelled out.
- action: ``item_id``, the item's four features from item_context.csv, and ``affinity`` (the user's
  affinity with this item).
- reward: ``click`` (0/1).
- meta (not serialized): ``propensity_score`` (the logging policy's probability of this action, for
  off-policy estimators), ``timestamp`` and ``row`` (the log's row number).

Hashed features (32 hex characters) are shortened to their first ``hash_chars`` characters: at the
few dozen distinct values per feature a collision is practically impossible, and it saves ~20 tokens
per feature. Malformed rows raise RecordError naming file:line and the column.
"""
from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass
from typing import Iterator

from engine.data.sar import RecordError

REQUIRED_COLUMNS = ("timestamp", "item_id", "position", "click", "propensity_score")
USER_FEATURES = tuple(f"user_feature_{i}" for i in range(4))
AFFINITY_PREFIX = "user-item_affinity_"
ITEM_CONTEXT = "item_context.csv"


@dataclass(frozen=True)
class ObdOptions:
    hash_chars: int = 8
    top_affinities: int = 3


def is_obd_log(path: str) -> bool:
    """True for a CSV whose header has the OBD log columns."""
    if not path.endswith(".csv") or os.path.basename(path) == ITEM_CONTEXT:
        return False
    with open(path, encoding="utf-8", newline="") as fh:
        header = next(csv.reader(fh), [])
    return all(c in header for c in REQUIRED_COLUMNS)


def domain_for(path: str) -> str:
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    policy, campaign = (parts[-3], parts[-2]) if len(parts) >= 3 else ("unknown", parts[-1])
    return f"obd/{_domain_part(policy)}/{_domain_part(campaign)}"


def _domain_part(name: str) -> str:
    """A folder name made valid in a SAR domain, whatever characters it has."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name) or "_"


def _short(value: str, options: ObdOptions) -> str:
    return value[:options.hash_chars] if options.hash_chars > 0 else value


def _number(text: str, where: str, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise RecordError(where, column, f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise RecordError(where, column, f"non-finite number {text!r}")
    return value


def _integer(text: str, where: str, column: str) -> int:
    value = _number(text, where, column)
    if not value.is_integer():
        raise RecordError(where, column, f"not an integer: {text!r}")
    return int(value)


def load_item_context(path: str, options: ObdOptions = ObdOptions()) -> dict[int, dict]:
    """item_id -> {item_feature_0: float, item_feature_1..3: shortened hashes}."""
    items = {}
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or "item_id" not in header:
            raise RecordError(f"{path}:1", "item_id", "missing column in item context header")
        feature_cols = [(i, c) for i, c in enumerate(header) if c.startswith("item_feature_")]
        id_col = header.index("item_id")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if len(row) != len(header):
                raise RecordError(where, None, f"{len(row)} columns, header has {len(header)}")
            item_id = _integer(row[id_col], where, "item_id")
            features = {}
            for i, name in feature_cols:
                try:
                    value = float(row[i])
                    features[name] = value if math.isfinite(value) else row[i]
                except ValueError:
                    features[name] = _short(row[i], options)
            if item_id in items:
                raise RecordError(where, "item_id", f"duplicate item {item_id}")
            items[item_id] = features
    return items


def iter_obd_rows(path: str, options: ObdOptions = ObdOptions()) -> Iterator[tuple[str, dict | RecordError]]:
    """Yield ``(file:line, record dict)`` per log row, or ``(file:line, RecordError)`` for a bad row.

    Errors are yielded rather than raised so the caller decides whether to stop or skip and count.
    """
    context_path = os.path.join(os.path.dirname(path), ITEM_CONTEXT)
    if not os.path.isfile(context_path):
        raise FileNotFoundError(f"{path}: OBD log without {ITEM_CONTEXT} beside it ({context_path})")
    items = load_item_context(context_path, options)
    domain = domain_for(path)
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None) or []
        missing = [c for c in REQUIRED_COLUMNS + USER_FEATURES if c not in header]
        if missing:
            raise RecordError(f"{path}:1", missing[0], "missing column in OBD log header")
        cols = {name: i for i, name in enumerate(header)}
        affinity_cols = [(int(c[len(AFFINITY_PREFIX):]), i) for i, c in enumerate(header)
                         if c.startswith(AFFINITY_PREFIX) and c[len(AFFINITY_PREFIX):].isdigit()]
        for row in reader:
            where = f"{path}:{reader.line_num}"
            try:
                if len(row) != len(header):
                    raise RecordError(where, None, f"{len(row)} columns, header has {len(header)}")
                yield where, _row_to_record(row, cols, affinity_cols, items, domain, where, options)
            except RecordError as exc:
                yield where, exc


def _row_to_record(row, cols, affinity_cols, items, domain, where, options) -> dict:
    item_id = _integer(row[cols["item_id"]], where, "item_id")
    if item_id not in items:
        raise RecordError(where, "item_id", f"item {item_id} is not in {ITEM_CONTEXT}")
    position = _integer(row[cols["position"]], where, "position")
    if position < 1:
        raise RecordError(where, "position", f"must be >= 1, got {position}")
    click = _integer(row[cols["click"]], where, "click")
    if click not in (0, 1):
        raise RecordError(where, "click", f"must be 0 or 1, got {click}")
    propensity = _number(row[cols["propensity_score"]], where, "propensity_score")
    if not 0.0 < propensity <= 1.0:
        raise RecordError(where, "propensity_score", f"must be in (0, 1], got {propensity}")
    affinities = [(k, _number(row[i], where, f"{AFFINITY_PREFIX}{k}")) for k, i in affinity_cols]
    nonzero = sorted(((a, k) for k, a in affinities if a != 0.0), key=lambda t: (-t[0], t[1]))
    top = " ".join(str(k) for _, k in nonzero[:options.top_affinities]) or "none"
    own = dict(affinities).get(item_id, 0.0)
    state = {f: _short(row[cols[f]], options) for f in USER_FEATURES}
    state.update(position=position, affinity_nonzero=len(nonzero), affinity_top=top)
    action = {"item_id": item_id, **items[item_id], "affinity": own}
    row_number = int(row[0]) if cols.get("", -1) == 0 and row[0].isdigit() else None
    meta = {"propensity_score": propensity, "timestamp": row[cols["timestamp"]], "row": row_number}
    return {"domain": domain, "state": state, "action": action, "reward": {"click": click}, "meta": meta}

