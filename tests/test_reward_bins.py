"""Reward bins against a plain-Python quantile and classification; binary, ties, constants, save/load."""
import json
import math
import os
import random
from fractions import Fraction

import numpy as np
import pytest

from engine.data.reward_bins import FieldBins, RewardBins, fit_field
from engine.data.sar import parse_record


def plain_quantile(sorted_values, k, num_bins):
    """The lower k/num_bins quantile: the value at rank floor((n-1) k / num_bins), in exact fractions."""
    return sorted_values[math.floor(Fraction(len(sorted_values) - 1) * Fraction(k, num_bins))]


def plain_edges(values, num_bins):
    xs = sorted(values)
    edges = []
    for k in range(1, num_bins):
        e = plain_quantile(xs, k, num_bins)
        if e < xs[-1] and (not edges or e > edges[-1]):
            edges.append(e)
    return edges


def plain_class(edges, value):
    return sum(1 for e in edges if e < value)


@pytest.mark.parametrize("seed", range(12))
def test_quantile_edges_and_classes_match_plain_python(seed):
    rng = random.Random(seed)
    n = rng.choice([3, 10, 57, 400])
    kind = seed % 4
    if kind == 0:
        values = [rng.gauss(0, 3) for _ in range(n)]
    elif kind == 1:
        values = [float(rng.choice([0, 0, 0, 0, 1, 2, 3, 7])) for _ in range(n)]  # heavy ties
    elif kind == 2:
        values = [math.exp(rng.gauss(0, 1)) for _ in range(n)]
    else:
        values = [float(rng.randint(0, 3)) for _ in range(n)] + [2.0]  # few distinct values
    num_bins = rng.choice([2, 3, 5, 8])
    bins = fit_field(values, num_bins)
    assert bins.kind == "quantile"
    expected = plain_edges(values, num_bins)
    assert list(bins.edges) == expected
    probe = values + [min(values) - 1, max(values) + 1] + list(expected)
    classes = [bins.classify(v) for v in probe]
    assert classes == [plain_class(expected, v) for v in probe]
    assert list(bins.classify_array(np.array(probe))) == classes
    # Every class holds at least one training value, and the top class is reachable.
    assert set(bins.classify(v) for v in values) == set(range(bins.num_classes))


def test_ties_at_edges_go_to_the_lower_class():
    bins = fit_field([0.0] * 6 + [1.0, 2.0, 3.0, 4.0], 4)
    # ranks floor(9 k / 4) = 2, 4, 6 -> values 0, 0 (merged), 1
    assert bins.edges == (0.0, 1.0)
    assert [bins.classify(v) for v in (-1, 0, 0.5, 1, 1.5, 4)] == [0, 0, 1, 1, 2, 2]


def test_binary_and_constant_columns():
    b = fit_field([0, 1, 1, True, False, 0.0], 5)
    assert b.kind == "binary" and b.num_classes == 2 and b.edges == ()
    assert (b.classify(0), b.classify(1.0), b.classify(True)) == (0, 1, 1)
    with pytest.raises(ValueError, match="not 0 or 1"):
        b.classify(0.5)
    assert fit_field([0, 0, 0], 5).kind == "binary"  # a never-clicked column is still a click column
    c = fit_field([2.5] * 10, 5)
    assert c.kind == "quantile" and c.edges == () and c.num_classes == 1
    assert c.classify(-100) == c.classify(100) == 0
    with pytest.raises(ValueError, match="no values"):
        fit_field([], 5)
    with pytest.raises(ValueError, match="num_bins"):
        fit_field([1.0, 2.0], 1)


def test_fit_records_per_domain_and_field_and_errors_name_them(tmp_path):
    records = [parse_record({"domain": d, "state": {}, "action": {}, "reward": {"click": i % 2, "cost": float(i)}})
               for d in ("a", "b") for i in range(20 if d == "a" else 7)]
    bins = RewardBins.fit_records(records, num_bins=4)
    assert sorted(bins.fields) == [("a", "click"), ("a", "cost"), ("b", "click"), ("b", "cost")]
    assert bins.get("a", "cost").edges == tuple(plain_edges([float(i) for i in range(20)], 4))
    assert bins.get("b", "cost").edges == tuple(plain_edges([float(i) for i in range(7)], 4))
    with pytest.raises(KeyError, match="domain 'c' field 'click'"):
        bins.classify("c", "click", 1)

    path = tmp_path / "bins.json"
    bins.save(str(path))
    assert os.listdir(tmp_path) == ["bins.json"]  # no temporary left
    loaded = RewardBins.load(str(path))
    assert loaded == bins
    assert json.loads(path.read_text())["fields"][1] == {
        "domain": "a", "field": "cost", "kind": "quantile", "edges": list(bins.get("a", "cost").edges),
        "num_classes": bins.num_classes("a", "cost"), "count": 20}


@pytest.mark.parametrize("mutate,message", [
    (lambda o: o.update(format="other"), "not a ltu-reward-bins"),
    (lambda o: o["fields"][0].update(kind="weird"), "unknown kind"),
    (lambda o: o["fields"][1].update(edges=[2.0, 1.0]), "strictly increasing"),
    (lambda o: o["fields"][0].pop("edges"), "malformed entry"),
    (lambda o: o["fields"].append(dict(o["fields"][0])), "duplicate"),
])
def test_load_refuses_malformed_files(tmp_path, mutate, message):
    bins = RewardBins({("d", "click"): FieldBins("binary", (), 3), ("d", "cost"): FieldBins("quantile", (1.0, 2.0), 9)})
    obj = bins.to_json()
    mutate(obj)
    path = tmp_path / "bins.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(ValueError, match=message) as info:
        RewardBins.load(str(path))
    assert str(path) in str(info.value)


def test_merge_unions_and_refuses_conflicts():
    a = RewardBins({("d", "click"): FieldBins("binary", (), 3)})
    b = RewardBins({("e", "cost"): FieldBins("quantile", (1.0,), 4), ("d", "click"): FieldBins("binary", (), 9)})
    assert sorted(RewardBins.merge([a, b]).fields) == [("d", "click"), ("e", "cost")]
    c = RewardBins({("e", "cost"): FieldBins("quantile", (2.0,), 4)})
    with pytest.raises(ValueError, match="domain 'e' field 'cost' has different bins"):
        RewardBins.merge([b, c])


def test_classify_many_equals_classify_one_by_one():
    rng = np.random.default_rng(5)
    values = {("ads", "cost"): rng.exponential(2.0, 300).round(1), ("ads", "click"): rng.integers(0, 2, 300),
              ("feed", "time"): rng.normal(0, 1, 300)}
    bins = RewardBins.fit(values, num_bins=4)
    keys = list(values)
    key_index = rng.integers(0, len(keys), 1000)
    drawn = np.array([values[keys[k]][i % 300] for i, k in enumerate(key_index)], dtype=np.float64)
    numeric = np.flatnonzero(key_index != keys.index(("ads", "click")))[:6]
    drawn[numeric] = [-1e9, 1e9, 0.0, -0.0, bins.get("ads", "cost").edges[0], np.nextafter(2.0, 3.0)]  # beyond, at edges
    expected = [bins.classify(*keys[k], v) for k, v in zip(key_index, drawn)]
    assert bins.classify_many(keys, key_index, drawn).tolist() == expected
    with pytest.raises(KeyError, match="no reward bins for domain 'shop' field 'buy'"):
        bins.classify_many([("shop", "buy")], np.zeros(1, dtype=np.int64), np.ones(1))
    with pytest.raises(ValueError, match="other than 0 and 1"):
        bins.classify_many([("ads", "click")], np.zeros(1, dtype=np.int64), np.full(1, 0.5))
