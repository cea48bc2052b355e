"""Weighted blending: C++ against a plain-Python version of the rule, weight accuracy, determinism,
BlendedDataset lookups, its cache key, and bad weights."""
import random

import numpy as np
import pytest

from engine import _C
from engine.data import samples
from engine.data.samples import BlendedDataset, blended_sample_counts


def ref_blend(weights, size):
    """The rule of engine/data/samples.py, in plain Python floats."""
    total = 0.0
    for w in weights:
        total += float(w)
    w = [float(x) / total for x in weights]
    m = max(2, sum(1 for x in w if x > 0))
    floor = 1.0 / (2 * m - 2)
    sigma = 1.0 - floor
    counts = [0] * len(w)
    dataset_index, sample_index = [], []
    for i in range(size):
        t = float(i + 1)
        due = [d for d in range(len(w)) if w[d] * t - counts[d] >= floor]
        if due:
            best = min(due, key=lambda d: ((counts[d] + sigma) / w[d], d))
        else:
            best = max(range(len(w)), key=lambda d: (w[d] * t - counts[d], -d))
        dataset_index.append(best)
        sample_index.append(counts[best])
        counts[best] += 1
    return dataset_index, sample_index


def random_weights(rng, n):
    kind = rng.random()
    if kind < 0.2:
        return [1.0] * n  # exact ties everywhere
    if kind < 0.35:
        w = [rng.random() for _ in range(n)]
        w[rng.randrange(n)] = 0.0  # a dataset that is never drawn
        return w
    if kind < 0.5:
        return [rng.randint(1, 5) for _ in range(n)]  # integer ratios, many ties
    return [rng.random() * 10 ** rng.uniform(-3, 3) for _ in range(n)]


def test_blend_equals_plain_python_rule():
    rng = random.Random(0)
    for case in range(150):
        weights = random_weights(rng, rng.randint(1, 6))
        if sum(weights) == 0:
            continue
        size = rng.randint(0, 400)
        got_d, got_i = _C.blending_indices(np.array(weights, dtype=np.float64), size)
        want_d, want_i = ref_blend(weights, size)
        assert got_d.dtype == np.int64 and got_i.dtype == np.int64
        assert got_d.tolist() == want_d, (case, weights)
        assert got_i.tolist() == want_i, (case, weights)


def test_blend_hits_weights_within_one_sample_at_every_prefix():
    rng = random.Random(1)
    for case in range(100):
        weights = random_weights(rng, rng.randint(1, 8))
        if sum(weights) == 0:
            continue
        size = rng.randint(1, 3000)
        dataset_index, sample_index = _C.blending_indices(np.array(weights), size)
        w = np.array(weights) / sum(weights)
        m = max(2, int(np.count_nonzero(w)))
        onehot = np.zeros((size, len(w)))
        onehot[np.arange(size), dataset_index] = 1
        counts = np.cumsum(onehot, axis=0)
        expected = np.outer(np.arange(1, size + 1), w)
        # Tijdeman's bound, below one sample for any number of datasets.
        assert np.abs(counts - expected).max() <= 1 - 1 / (2 * m - 2) + 1e-9, (case, weights)
        # Each dataset's samples are taken in order 0, 1, 2, ...
        for d in range(len(w)):
            assert sample_index[dataset_index == d].tolist() == list(range(int(counts[-1, d])))
        assert np.array_equal(blended_sample_counts(weights, size), counts[-1].astype(np.int64))


def test_blend_is_deterministic_and_ties_go_to_lowest_id():
    a = _C.blending_indices(np.array([0.2, 0.3, 0.5]), 10_000)
    b = _C.blending_indices(np.array([0.2, 0.3, 0.5]), 10_000)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert _C.blending_indices(np.array([1.0, 1.0, 1.0]), 6)[0].tolist() == [0, 1, 2, 0, 1, 2]
    # Only the ratios matter.
    assert np.array_equal(_C.blending_indices(np.array([2.0, 6.0]), 100)[0],
                          _C.blending_indices(np.array([0.25, 0.75]), 100)[0])


@pytest.mark.parametrize("weights, message", [
    ([0.5, -0.1], r"weights\[1\] is negative"),
    ([0.0, 0.0], "positive finite sum"),
    ([float("nan"), 1.0], r"weights\[0\] is not finite"),
    ([float("inf"), 1.0], r"weights\[0\] is not finite"),
    ([], "non-empty"),
])
def test_bad_weights_raise(weights, message):
    with pytest.raises(ValueError, match=message):
        _C.blending_indices(np.array(weights, dtype=np.float64), 10)


class ListDataset:
    def __init__(self, tag, n, cache_key=None):
        self.items = [np.array([tag, i], dtype=np.int64) for i in range(n)]
        if cache_key is not None:
            self.cache_key = cache_key

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_blended_dataset_returns_member_samples():
    members = [ListDataset(0, 30), ListDataset(1, 80), ListDataset(2, 5)]
    blend = BlendedDataset(members, [3, 7, 0.5], 100)
    want_d, want_i = ref_blend([3, 7, 0.5], 100)
    assert len(blend) == 100
    for i in range(100):
        assert blend[i].tolist() == [want_d[i], want_i[i]]
        assert blend.sample_source(i) == (want_d[i], want_i[i])
    assert blend[-1].tolist() == blend[99].tolist()
    with pytest.raises(IndexError):
        blend[100]


def test_blended_dataset_refuses_members_that_are_too_small():
    with pytest.raises(ValueError, match=r"takes 50 samples from dataset 1 .* has 49"):
        BlendedDataset([ListDataset(0, 50), ListDataset(1, 49)], [1, 1], 100)
    with pytest.raises(ValueError, match="one weight per dataset"):
        BlendedDataset([ListDataset(0, 50)], [1, 1], 10)
    with pytest.raises(ValueError, match="size"):
        BlendedDataset([ListDataset(0, 50)], [1], 0)


def test_blend_cache_key_and_reload(tmp_path, monkeypatch):
    members = [ListDataset(0, 100, "a"), ListDataset(1, 100, "b")]
    first = BlendedDataset(members, [0.3, 0.7], 120, cache_dir=str(tmp_path))
    assert not first.loaded_from_cache
    keys = {
        BlendedDataset(members, [0.3, 0.7], 120).cache_key,
        BlendedDataset(members, [0.31, 0.7], 120).cache_key,
        BlendedDataset(members, [0.3, 0.7], 121).cache_key,
        BlendedDataset([ListDataset(0, 100, "a"), ListDataset(1, 100, "c")], [0.3, 0.7], 120).cache_key,
    }
    assert len(keys) == 4 and first.cache_key in keys

    def no_build(*args, **kwargs):
        raise AssertionError("blend rebuilt although it is cached")

    monkeypatch.setattr(samples._C, "blending_indices", no_build)
    second = BlendedDataset(members, [0.3, 0.7], 120, cache_dir=str(tmp_path))
    assert second.loaded_from_cache
    assert np.array_equal(second.dataset_index, first.dataset_index)
    assert np.array_equal(second.dataset_sample_index, first.dataset_sample_index)
