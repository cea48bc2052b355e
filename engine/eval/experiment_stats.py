"""Statistics of the LTU experiment: means over seeds, paired differences and their 95% intervals.

Two intervals answer two questions, and the report gives both:

- over training seeds (:func:`mean_interval`, :func:`paired_difference`): Student's t interval of
  the mean over seeds, mean +- t(0.975, n - 1) * sd / sqrt(n) with the sample standard deviation.
  Arms are paired by seed (same SFT data order, same base weights), so a difference is taken seed
  by seed first. It measures how much the result depends on the training run's randomness.
- over test records (:func:`paired_bootstrap`): every arm scores the same test records, so the
  records are resampled with replacement once per resample and the same resample is applied to
  both arms and every seed; the statistic is the mean over seeds of the metric's difference. The
  percentile interval measures how much the result depends on which test records were drawn.

Per-record metrics are those of :mod:`engine.eval.metrics` (its vectorised resample forms, which
equal scikit-learn's values).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

from engine.eval.metrics import METRICS, TaskData, resampled_metrics

CONFIDENCE = 0.95


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """``{"mean", "sd", "n", "ci"}`` of ``values`` (NaN and None dropped); ``ci`` is the t interval,
    None with fewer than two values (and [mean, mean] when every value is the same)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(finite)
    if n == 0:
        return {"mean": None, "sd": None, "n": 0, "ci": None}
    mean = float(np.mean(finite))
    if n == 1:
        return {"mean": mean, "sd": None, "n": 1, "ci": None}
    sd = float(np.std(finite, ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "n": n, "ci": [mean - half, mean + half]}


def paired_difference(first: Mapping[int, float], second: Mapping[int, float],
                      confidence: float = CONFIDENCE) -> dict:
    """``first - second`` seed by seed over the seeds both have, then :func:`mean_interval` of the
    differences, with ``per_seed`` (seed -> difference)."""
    seeds = sorted(set(first) & set(second))
    differences = {s: float(first[s]) - float(second[s]) for s in seeds
                   if first[s] is not None and second[s] is not None}
    return {**mean_interval(list(differences.values()), confidence), "per_seed": differences}


def _check_same_records(arms: Sequence[Sequence[Sequence[TaskData]]]) -> None:
    reference = arms[0][0]
    for arm in arms:
        for run in arm:
            if [t.name for t in run] != [t.name for t in reference]:
                raise ValueError("paired bootstrap: runs of different tasks "
                                 f"({[t.name for t in run]} vs {[t.name for t in reference]})")
            for task, ref in zip(run, reference):
                if not np.array_equal(task.labels, ref.labels):
                    raise ValueError(f"paired bootstrap: task {task.name} was scored on other records in one "
                                     "run (labels differ): arms must score the same test records")


def _metric_row(metric: str) -> int:
    if metric == "kl":
        return len(METRICS)
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r} (known: {', '.join(METRICS + ('kl',))})")
    return METRICS.index(metric)


def _resampled(task: TaskData, index: np.ndarray, metric: str) -> np.ndarray:
    """``metric`` of ``task`` on each resample of record indices ``index`` [resamples, n]."""
    if metric == "log_loss":  # per-record terms, clipped as scikit-learn clips them
        eps = np.finfo(np.float64).eps
        nll = -np.log(np.clip(task.probs[np.arange(len(task.labels)), task.labels], eps, 1 - eps))
        return nll[index].mean(axis=1)
    return resampled_metrics(task, index)[_metric_row(metric)]


def paired_bootstrap(first: Sequence[Sequence[TaskData]], second: Sequence[Sequence[TaskData]],
                     metric: str = "auc", resamples: int = 1000, seed: int = 0,
                     confidence: float = CONFIDENCE, cache: dict | None = None) -> dict:
    """Mean over seeds of ``metric(first) - metric(second)`` (macro over each run's tasks) with its
    paired percentile bootstrap interval over test records.

    ``first[s]`` and ``second[s]`` are the tasks of seed ``s``'s run of each arm (same order of
    seeds in both). Every run must hold the same records (checked by their labels); one resample of
    record indices per task is shared by every run. ``cache`` (a dict kept by the caller) reuses a
    run's resampled values across comparisons with the same seed and resamples. Returns
    ``{"mean", "ci", "resamples", "undefined_resamples"}``.
    """
    if len(first) != len(second) or not first:
        raise ValueError(f"paired bootstrap: {len(first)} and {len(second)} runs; need the same number, >= 1")
    _check_same_records([first, second])
    _metric_row(metric)
    rng = np.random.default_rng(seed)
    reference = first[0]
    indices = [rng.integers(0, len(task.labels), size=(resamples, len(task.labels))) for task in reference]
    full = [np.arange(len(task.labels))[None, :] for task in reference]
    cache = {} if cache is None else cache

    def values(task: TaskData, index: np.ndarray, resampled: bool) -> np.ndarray:
        if not resampled:
            return _resampled(task, index, metric)
        key = (id(task), metric, seed, resamples)
        if key not in cache:
            cache[key] = (task, _resampled(task, index, metric))  # the task is kept so its id stays unique
        return cache[key][1]

    def statistic(index_sets, resampled: bool) -> np.ndarray:
        per_seed = []
        for run_a, run_b in zip(first, second):
            a = np.mean([values(t, i, resampled) for t, i in zip(run_a, index_sets)], axis=0)
            b = np.mean([values(t, i, resampled) for t, i in zip(run_b, index_sets)], axis=0)
            per_seed.append(a - b)
        return np.mean(per_seed, axis=0)

    point = float(statistic(full, False)[0])
    distribution = statistic(indices, True)
    finite = distribution[np.isfinite(distribution)]
    tail = (1 - confidence) / 2 * 100
    ci = [float(v) for v in np.percentile(finite, [tail, 100 - tail])] if len(finite) >= 2 else None
    return {"mean": point if math.isfinite(point) else None, "ci": ci, "resamples": resamples,
            "undefined_resamples": int(len(distribution) - len(finite))}


def interval_above_zero(summary: dict | None) -> bool | None:
    """True when the interval lies above 0, False when it does not, None without an interval."""
    if not summary or summary.get("ci") is None:
        return None
    return bool(summary["ci"][0] > 0)
