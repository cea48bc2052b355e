"""Reward classes: numeric rewards -> a small closed set of classes, fitted on the training split.

Per (domain, reward field):
- ``binary``: every training value is 0 or 1 (booleans included): classes 0 and 1 stay as they are.
- ``quantile``: with the n training values sorted as x[0] <= ... <= x[n-1], edge k (k = 1..num_bins-1)
  is x[floor((n-1) k / num_bins)] (the "lower" k/num_bins quantile, computed in integers so it is
  exact); repeated edges (ties) are merged and edges equal to the maximum dropped. Class of v = number
  of edges strictly below v, i.e. class k covers (edge[k-1], edge[k]]. Since every edge is a training
  value, every class holds at least one training value. A constant column gets a single class.

Saved as JSON beside the dataset (``<prefix>.reward_bins.json``) so that validation and test splits
are classified with the training split's edges.
"""
from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

from engine.data.sar import MAX_REWARD_CLASSES, SARRecord
from engine.fileio import write_json_atomic

FORMAT = "ltu-reward-bins"
VERSION = 1
DEFAULT_NUM_BINS = 5


@dataclass(frozen=True)
class FieldBins:
    kind: str                    # "binary" or "quantile"
    edges: tuple[float, ...]     # quantile only: sorted, strictly increasing
    count: int                   # training values the bins were fitted on

    @property
    def num_classes(self) -> int:
        return 2 if self.kind == "binary" else len(self.edges) + 1

    def classify(self, value: float) -> int:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"non-finite reward {value!r}")
        if self.kind == "binary":
            if value not in (0.0, 1.0):
                raise ValueError(f"reward {value!r} is not 0 or 1, but this field was fitted as binary")
            return int(value)
        return bisect.bisect_left(self.edges, value)

    def classify_array(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        if self.kind == "binary":
            if not np.isin(values, (0.0, 1.0)).all():
                raise ValueError("binary field given values other than 0 and 1")
            return values.astype(np.int64)
        return np.searchsorted(np.asarray(self.edges, dtype=np.float64), values, side="left")


def fit_field(values: Iterable[float], num_bins: int = DEFAULT_NUM_BINS) -> FieldBins:
    if not 2 <= num_bins <= MAX_REWARD_CLASSES:
        raise ValueError(f"num_bins must be in [2, {MAX_REWARD_CLASSES}], got {num_bins}")
    arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("cannot fit reward bins on no values")
    if not np.isfinite(arr).all():
        raise ValueError("reward values must be finite")
    if np.isin(arr, (0.0, 1.0)).all():
        return FieldBins("binary", (), int(arr.size))
    xs = np.sort(arr)
    positions = [(xs.size - 1) * k // num_bins for k in range(1, num_bins)]
    edges = tuple(float(e) for e in np.unique(xs[positions]) if e < xs[-1])
    return FieldBins("quantile", edges, int(arr.size))


class RewardBins:
    """Bins of every (domain, reward field); ``classify`` is the classifier serialization uses."""

    def __init__(self, fields: Mapping[tuple[str, str], FieldBins], num_bins: int = DEFAULT_NUM_BINS):
        self.fields = dict(sorted(fields.items()))
        self.num_bins = num_bins

    @classmethod
    def fit(cls, values: Mapping[tuple[str, str], Iterable[float]], num_bins: int = DEFAULT_NUM_BINS) -> "RewardBins":
        fitted = {}
        for key, vals in values.items():
            try:
                fitted[key] = fit_field(vals, num_bins)
            except ValueError as exc:
                raise ValueError(f"domain '{key[0]}' reward field '{key[1]}': {exc}") from None
        return cls(fitted, num_bins)

    @classmethod
    def fit_records(cls, records: Iterable[SARRecord], num_bins: int = DEFAULT_NUM_BINS) -> "RewardBins":
        values: dict[tuple[str, str], list[float]] = {}
        for record in records:
            for step in record.steps:
                for name, value in step.reward.items():
                    values.setdefault((record.domain, name), []).append(value)
        return cls.fit(values, num_bins)

    def get(self, domain: str, field: str) -> FieldBins:
        try:
            return self.fields[(domain, field)]
        except KeyError:
            raise KeyError(f"no reward bins for domain '{domain}' field '{field}' "
                           "(fit them on a training split that has this field)") from None

    def classify(self, domain: str, field: str, value: float) -> int:
        return self.get(domain, field).classify(value)

    def classify_many(self, keys: list[tuple[str, str]], key_index: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Classes of many rewards at once: reward i is of field ``keys[key_index[i]]``, value
        ``values[i]``; the same classes as ``classify`` one by one (an unknown field raises KeyError,
        a value a binary field cannot hold ValueError)."""
        classes = np.zeros(len(values), dtype=np.int64)
        for index, (domain, field) in enumerate(keys):
            where = key_index == index
            classes[where] = self.get(domain, field).classify_array(values[where])
        return classes

    def num_classes(self, domain: str, field: str) -> int:
        return self.get(domain, field).num_classes

    @classmethod
    def merge(cls, parts: list["RewardBins"]) -> "RewardBins":
        """Union of several bin sets (e.g. in-domain bins plus an out-of-domain task's own bins)."""
        fields: dict[tuple[str, str], FieldBins] = {}
        for part in parts:
            for key, fb in part.fields.items():
                if key in fields and (fields[key].kind, fields[key].edges) != (fb.kind, fb.edges):
                    raise ValueError(f"domain '{key[0]}' field '{key[1]}' has different bins in two files")
                fields[key] = fb
        return cls(fields, parts[0].num_bins if parts else DEFAULT_NUM_BINS)

    def to_json(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION, "num_bins": self.num_bins,
            "fields": [{"domain": d, "field": f, "kind": b.kind, "edges": list(b.edges),
                        "num_classes": b.num_classes, "count": b.count}
                       for (d, f), b in self.fields.items()],
        }

    def save(self, path: str) -> None:
        """Written to a temporary name then renamed, so a reader never sees half a file."""
        write_json_atomic(path, self.to_json())

    @classmethod
    def from_json(cls, obj: dict, source: str = "<json>") -> "RewardBins":
        if not isinstance(obj, dict) or obj.get("format") != FORMAT or obj.get("version") != VERSION:
            raise ValueError(f"{source}: not a {FORMAT} version {VERSION} file")
        fields = {}
        for i, item in enumerate(obj.get("fields", [])):
            where = f"{source}: fields[{i}]"
            try:
                kind, edges, count = item["kind"], tuple(float(e) for e in item["edges"]), int(item["count"])
                key = (str(item["domain"]), str(item["field"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{where}: malformed entry ({exc})") from None
            if kind not in ("binary", "quantile"):
                raise ValueError(f"{where}: unknown kind {kind!r}")
            if kind == "binary" and edges:
                raise ValueError(f"{where}: a binary field has no edges")
            if any(not math.isfinite(e) for e in edges) or any(a >= b for a, b in zip(edges, edges[1:])):
                raise ValueError(f"{where}: edges must be finite and strictly increasing")
            if len(edges) + 1 > MAX_REWARD_CLASSES:
                raise ValueError(f"{where}: {len(edges) + 1} classes, at most {MAX_REWARD_CLASSES}")
            if key in fields:
                raise ValueError(f"{where}: duplicate domain/field {key}")
            fields[key] = FieldBins(kind, edges, count)
        return cls(fields, int(obj.get("num_bins", DEFAULT_NUM_BINS)))

    @classmethod
    def load(cls, path: str) -> "RewardBins":
        with open(path, encoding="utf-8") as fh:
            try:
                obj = json.load(fh)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: invalid JSON: {exc}") from None
        return cls.from_json(obj, path)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RewardBins) and self.fields == other.fields and self.num_bins == other.num_bins

    def __repr__(self) -> str:
        return f"RewardBins({len(self.fields)} fields, num_bins={self.num_bins})"
