"""Decision metrics of reward-class predictions, per task and over in-domain / out-of-domain tasks.

A task is one reward field of one domain (``domain/field``); each has its own classes. Per task,
from the observed classes ``y`` and the predicted probabilities ``P`` [n, K]:

- ``auc``: ROC AUC (scikit-learn ``roc_auc_score``); with more than two classes the one-vs-rest
  macro average over the classes present in ``y`` (scikit-learn's ``multi_class="ovr"`` when
  every class is present; a class absent from the labels has no AUC and is left out).
- ``accuracy``, ``balanced_accuracy``: of the most probable class (scikit-learn; balanced: the
  mean recall over the classes present in ``y``).
- ``log_loss``: mean -log P[y] (scikit-learn ``log_loss``).
- ``brier``: mean of half the squared error summed over classes (scikit-learn ``brier_score_loss``
  with ``scale_by_half=True``: for two classes the usual mean (P[1] - y)^2).
- ``ece``: expected calibration error of the top class over ``ECE_BINS`` equal-width confidence
  bins (b/B, (b+1)/B]: sum over bins of (bin size / n) |accuracy in bin - mean confidence in bin|.
- ``kl``: where the logs carry the true distribution T (synthetic), mean KL(T || P) (scipy
  ``rel_entr``); and ``bayes``: every metric above computed on T itself, the ceiling of any model.

Beside them the chance levels: ``prior``, predicting the task's label frequencies for every record
(its accuracy is the majority class's frequency, its balanced accuracy 1 / classes present, its AUC
0.5), and ``uniform``, probability 1/K for each class (accuracy 1/K: a uniformly random guess).

Groups (``in_domain``, ``out_of_domain``, ``all``) are the macro average of their tasks' values.

Every value comes with a seeded bootstrap 95% interval (``scipy.stats.bootstrap``, percentile
method): records are resampled with replacement within each task, independently per task for a
group. The resamples are evaluated by the vectorised forms in :func:`resampled_metrics`, which give
scikit-learn's values on the same data (tested) thousands of times faster. A resample where a value
is undefined (an AUC with one class) is left out of its interval and counted.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats
from scipy.special import rel_entr
from sklearn.metrics import accuracy_score, balanced_accuracy_score, brier_score_loss, log_loss, roc_auc_score

METRICS = ("auc", "accuracy", "balanced_accuracy", "log_loss", "brier", "ece")
ECE_BINS = 10
CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 1000
_BOOTSTRAP_BATCH = 200          # resamples evaluated at once (memory: batch x n x K floats)
_SUM_TOLERANCE = 1e-6


@dataclass
class TaskData:
    """The predictions of one task: observed classes, predicted and (when known) true probabilities."""

    name: str                      # domain/field
    domain: str
    field: str
    labels: np.ndarray             # int64 [n]
    probs: np.ndarray              # float64 [n, K]
    true_probs: np.ndarray | None  # float64 [n, K] when every prediction carries the truth

    @property
    def num_classes(self) -> int:
        return self.probs.shape[1]


def check_predictions(labels, probs, what: str = "predictions") -> tuple[np.ndarray, np.ndarray]:
    """``labels`` as int64 [n] and ``probs`` as float64 [n, K], refusing what metrics cannot use."""
    y = np.asarray(labels)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or y.shape != p.shape[:1] or len(y) == 0:
        raise ValueError(f"{what}: expected labels [n] and probabilities [n, classes] with n >= 1, got "
                         f"{y.shape} and {p.shape}")
    if p.shape[1] < 2:
        raise ValueError(f"{what}: {p.shape[1]} class(es); metrics need at least 2")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"{what}: labels must be class indices in 0..{p.shape[1] - 1}")
    if not np.isfinite(p).all() or (p < 0).any() or np.abs(p.sum(axis=1) - 1).max() > _SUM_TOLERANCE:
        raise ValueError(f"{what}: probabilities must be finite, non-negative and sum to 1 per row")
    return y.astype(np.int64), p


# ------------------------------------------------------------------------------ point estimates
def auc(labels, probs) -> float:
    """ROC AUC (binary) or one-vs-rest macro AUC over the classes present; NaN with one class."""
    y, p = check_predictions(labels, probs)
    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    if p.shape[1] == 2:
        return float(roc_auc_score(y, p[:, 1]))
    return float(np.mean([roc_auc_score(y == k, p[:, k]) for k in present]))


def confidence_bins(confidence: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """Bin b of each confidence, for the intervals (b/bins, (b+1)/bins] (0 falls in bin 0)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    return np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)


def expected_calibration_error(labels, probs, bins: int = ECE_BINS) -> float:
    """Top-class ECE over ``bins`` equal-width confidence bins."""
    y, p = check_predictions(labels, probs)
    confidence, correct = p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)
    which = confidence_bins(confidence, bins)
    gap = np.bincount(which, weights=correct - confidence, minlength=bins)
    return float(np.abs(gap).sum() / len(y))


def kl_divergence(true_probs, probs) -> float:
    """Mean KL(true || predicted) over the records, in nats."""
    t, p = np.asarray(true_probs, dtype=np.float64), np.asarray(probs, dtype=np.float64)
    if t.shape != p.shape:
        raise ValueError(f"true probabilities {t.shape} and predictions {p.shape} differ in shape")
    return float(rel_entr(t, p).sum(axis=1).mean())


def classification_metrics(labels, probs) -> dict[str, float]:
    """Every metric of :data:`METRICS` (scikit-learn's where it has one)."""
    y, p = check_predictions(labels, probs)
    classes = list(range(p.shape[1]))
    predicted = p.argmax(axis=1)
    with warnings.catch_warnings():  # balanced accuracy warns about predicted classes absent from y
        warnings.simplefilter("ignore")
        balanced = float(balanced_accuracy_score(y, predicted))
    return {"auc": auc(y, p), "accuracy": float(accuracy_score(y, predicted)), "balanced_accuracy": balanced,
            "log_loss": float(log_loss(y, p, labels=classes)),
            "brier": float(brier_score_loss(y, p if p.shape[1] > 2 else p[:, 1], labels=classes,
                                            scale_by_half=True)),
            "ece": expected_calibration_error(y, p)}


def chance_levels(labels, num_classes: int) -> dict[str, dict[str, float]]:
    """The metrics of the ``prior`` predictor (the label frequencies for every record) and of the
    ``uniform`` one (1/K per class; accuracy 1/K, a uniformly random guess)."""
    y = np.asarray(labels, dtype=np.int64)
    freq = np.bincount(y, minlength=num_classes) / len(y)
    prior = classification_metrics(y, np.tile(freq, (len(y), 1)))
    uniform = classification_metrics(y, np.full((len(y), num_classes), 1.0 / num_classes))
    uniform["accuracy"] = uniform["balanced_accuracy"] = 1.0 / num_classes
    return {"prior": prior, "uniform": uniform}


# ----------------------------------------------------------------------------------- resamples
class _Resampler:
    """One task's arrays for evaluating many resamples at once (:func:`resampled_metrics`)."""

    def __init__(self, task: TaskData):
        y, p = task.labels, task.probs
        self.labels, self.probs, self.num_classes = y, p, p.shape[1]
        self.correct = p.argmax(axis=1) == y
        confidence = p.max(axis=1)
        self.confidence, self.bin = confidence, confidence_bins(confidence)
        eps = np.finfo(np.float64).eps  # scikit-learn's clipping in log_loss
        self.nll = -np.log(np.clip(p[np.arange(len(y)), y], eps, 1 - eps))
        self.brier = 0.5 * ((p - np.eye(self.num_classes)[y]) ** 2).sum(axis=1)
        self.kl = None if task.true_probs is None else rel_entr(task.true_probs, p).sum(axis=1)

    def __call__(self, index: np.ndarray) -> np.ndarray:
        """[metrics (+ kl), resamples] for resampled record indices [resamples, n]."""
        index = np.atleast_2d(index)
        batch, n = index.shape
        y = self.labels[index]
        onehot = y[..., None] == np.arange(self.num_classes)
        counts = onehot.sum(axis=1)
        hits = (onehot & self.correct[index][..., None]).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = np.where(counts > 0, hits / counts, np.nan)
        flat = self.bin[index] + ECE_BINS * np.arange(batch)[:, None]
        gap = np.bincount(flat.ravel(), weights=(self.correct[index] - self.confidence[index]).ravel(),
                          minlength=batch * ECE_BINS).reshape(batch, ECE_BINS)
        rows = [self._auc(index, onehot, counts), self.correct[index].mean(axis=1), _nanmean(recall),
                self.nll[index].mean(axis=1), self.brier[index].mean(axis=1), np.abs(gap).sum(axis=1) / n]
        if self.kl is not None:
            rows.append(self.kl[index].mean(axis=1))
        return np.stack(rows)

    def _auc(self, index, onehot, counts) -> np.ndarray:
        """Mann-Whitney AUC per class (ties counted half), one-vs-rest macro over present classes."""
        n = index.shape[1]
        columns = [1] if self.num_classes == 2 else range(self.num_classes)
        per_class = []
        for k in columns:
            ranks = stats.rankdata(self.probs[index, k], axis=1)
            positives = counts[:, k].astype(np.float64)
            negatives = n - positives
            with np.errstate(invalid="ignore", divide="ignore"):
                value = ((ranks * onehot[..., k]).sum(axis=1) - positives * (positives + 1) / 2) \
                    / (positives * negatives)
            per_class.append(np.where((positives > 0) & (negatives > 0), value, np.nan))
        if self.num_classes == 2:
            return per_class[0]
        stacked = np.stack(per_class, axis=1)
        present = (counts > 0).sum(axis=1)
        return np.where(present >= 2, _nanmean(stacked), np.nan)


def _nanmean(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis ignoring NaN; NaN where every value is NaN (without a warning)."""
    finite = ~np.isnan(values)
    count = finite.sum(axis=-1)
    total = np.where(finite, values, 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def resampled_metrics(task: TaskData, index: np.ndarray) -> np.ndarray:
    """The metrics of :data:`METRICS` (then ``kl`` when the task has the truth) of each resample of
    ``task``'s records (``index`` [resamples, n]), as an array [metrics, resamples]."""
    return _Resampler(task)(index)


def bootstrap_intervals(tasks: Sequence[TaskData], resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                        confidence: float = CONFIDENCE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(low, high, undefined resamples) per metric of the macro average over ``tasks`` (one task:
    its own metrics), records resampled within each task. Rows follow :data:`METRICS` (then ``kl``
    when every task has the truth); NaN where an interval cannot be formed."""
    resamplers = [_Resampler(t) for t in tasks]
    with_kl = all(r.kl is not None for r in resamplers)
    rows = len(METRICS) + with_kl
    if any(len(t.labels) < 2 for t in tasks) or resamples < 2:
        nan = np.full(rows, np.nan)
        return nan, nan.copy(), np.zeros(rows, dtype=np.int64)

    def statistic(*indices, axis=-1):
        # scipy passes resamples as [..., n] (and may pass the data itself, [n]).
        moved = [np.moveaxis(np.asarray(i), axis, -1) for i in indices]
        values = [r(i.reshape(-1, i.shape[-1]))[:rows] for r, i in zip(resamplers, moved)]
        return np.mean(values, axis=0).reshape((rows,) + moved[0].shape[:-1])

    data = tuple(np.arange(len(t.labels)) for t in tasks)
    with warnings.catch_warnings():  # scipy warns when some resample is undefined; counted below
        warnings.simplefilter("ignore")
        result = stats.bootstrap(data, statistic, n_resamples=resamples, vectorized=True, paired=False,
                                 confidence_level=confidence, method="percentile",
                                 batch=_BOOTSTRAP_BATCH, rng=np.random.default_rng(seed))
    distribution = np.asarray(result.bootstrap_distribution).reshape(rows, -1)
    undefined = np.isnan(distribution).sum(axis=1)
    low = np.asarray(result.confidence_interval.low, dtype=np.float64).reshape(rows)
    high = np.asarray(result.confidence_interval.high, dtype=np.float64).reshape(rows)
    tail = (1 - confidence) / 2 * 100
    for m in np.flatnonzero(undefined):
        finite = distribution[m][~np.isnan(distribution[m])]
        if len(finite) >= 2:
            low[m], high[m] = np.percentile(finite, [tail, 100 - tail])
    return low, high, undefined


# ------------------------------------------------------------------------------------- reports
def group_tasks(predictions: Iterable) -> list[TaskData]:
    """Predictions (objects with ``domain``, ``field``, ``label``, ``probs``, ``true_probs``) gathered
    by task, in order of first appearance. A task whose predictions differ in class count is refused."""
    grouped: dict[str, list] = {}
    for p in predictions:
        grouped.setdefault(f"{p.domain}/{p.field}", []).append(p)
    tasks = []
    for name, items in grouped.items():
        sizes = {len(p.probs) for p in items}
        if len(sizes) != 1:
            raise ValueError(f"task {name}: predictions with different numbers of classes {sorted(sizes)}")
        labels, probs = check_predictions([p.label for p in items], np.stack([p.probs for p in items]), name)
        truth = None
        if all(p.true_probs is not None for p in items):
            truth = np.stack([p.true_probs for p in items]).astype(np.float64)
        tasks.append(TaskData(name, items[0].domain, items[0].field, labels, probs, truth))
    return tasks


def _value(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _summary(tasks: Sequence[TaskData], points: dict[str, float], resamples: int, seed: int) -> dict:
    low, high, undefined = bootstrap_intervals(tasks, resamples, seed)
    out = {}
    for m, name in enumerate(list(points)):
        out[name] = {"value": _value(points[name]),
                     "ci": None if np.isnan(low[m]) else [float(low[m]), float(high[m])]}
        if undefined[m]:
            out[name]["undefined_resamples"] = int(undefined[m])
    return out


def _task_points(task: TaskData) -> dict[str, float]:
    points = classification_metrics(task.labels, task.probs)
    if task.true_probs is not None:
        points["kl"] = kl_divergence(task.true_probs, task.probs)
    return points


def _mean_dicts(dicts: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([d[k] for d in dicts])) for k in dicts[0]}


def evaluate_predictions(predictions: Iterable, in_domain: Iterable[str] | None = None,
                         resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """The report of ``eval.json``: per task its size, classes, metrics with intervals, chance levels
    and (synthetic logs) Bayes ceiling; then the ``in_domain``, ``out_of_domain`` and ``all`` groups
    (macro averages; a group without tasks is None; both domain groups are None when ``in_domain``
    is not known)."""
    tasks = group_tasks(predictions)
    if not tasks:
        raise ValueError("no predictions to evaluate")
    domains_in = None if in_domain is None else set(in_domain)
    report: dict = {"tasks": {}, "groups": {},
                    "bootstrap": {"resamples": resamples, "seed": seed, "confidence": CONFIDENCE,
                                  "method": "percentile, records resampled within each task"},
                    "ece_bins": ECE_BINS}
    points, chances, ceilings = {}, {}, {}
    for task in tasks:
        points[task.name] = _task_points(task)
        chances[task.name] = chance_levels(task.labels, task.num_classes)
        ceilings[task.name] = None if task.true_probs is None else \
            classification_metrics(task.labels, task.true_probs)
        report["tasks"][task.name] = {
            "domain": task.domain, "field": task.field,
            "in_domain": None if domains_in is None else task.domain in domains_in,
            "n": len(task.labels), "num_classes": task.num_classes,
            "class_counts": np.bincount(task.labels, minlength=task.num_classes).tolist(),
            "metrics": _summary([task], points[task.name], resamples, seed),
            "chance": {k: {m: _value(v) for m, v in c.items()} for k, c in chances[task.name].items()},
            "bayes": None if ceilings[task.name] is None else {m: _value(v) for m, v in ceilings[task.name].items()}}
    members: dict[str, list[TaskData] | None] = {"in_domain": None, "out_of_domain": None}
    if domains_in is not None:
        members["in_domain"] = [t for t in tasks if t.domain in domains_in]
        members["out_of_domain"] = [t for t in tasks if t.domain not in domains_in]
    members["all"] = tasks
    for group, chosen in members.items():
        if not chosen:  # unknown, or no task
            report["groups"][group] = None
            continue
        names = [t.name for t in chosen]
        common = set.intersection(*(set(points[n]) for n in names))
        mean_points = _mean_dicts([{k: points[n][k] for k in points[names[0]] if k in common} for n in names])
        bayes = None
        if all(ceilings[n] is not None for n in names):
            bayes = {m: _value(v) for m, v in _mean_dicts([ceilings[n] for n in names]).items()}
        report["groups"][group] = {
            "tasks": names, "n": int(sum(len(t.labels) for t in chosen)),
            "metrics": _summary(chosen, mean_points, resamples, seed),
            "chance": {k: {m: _value(v) for m, v in _mean_dicts([chances[n][k] for n in names]).items()}
                       for k in ("prior", "uniform")},
            "bayes": bayes}
    report["in_domain"] = None if domains_in is None else sorted(domains_in)
    return report


# --------------------------------------------------------------------------------------- table
def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_table(report: dict) -> str:
    """The report as a terminal table: one row per task, then the groups."""
    head = (f"{'task':<28} {'n':>6} {'K':>2}  {'AUC [95% CI]':<21} {'acc (maj/unif)':<20} "
            f"{'bal.acc':>7} {'logloss':>7} {'prior':>6} {'Brier':>6} {'ECE':>6} {'KL':>6} "
            f"{'Bayes AUC':>9} {'Bayes acc':>9}")
    lines = [head, "-" * len(head)]

    def row(name: str, entry: dict, k: str) -> str:
        m, chance, bayes = entry["metrics"], entry["chance"], entry.get("bayes") or {}
        ci = m["auc"]["ci"]
        auc_text = f"{_fmt(m['auc']['value'])} [{_fmt(ci[0], 2)},{_fmt(ci[1], 2)}]" if ci else _fmt(m["auc"]["value"])
        acc = f"{_fmt(m['accuracy']['value'])} ({_fmt(chance['prior']['accuracy'])}/" \
              f"{_fmt(chance['uniform']['accuracy'])})"
        kl = m.get("kl", {}).get("value")
        return (f"{name:<28} {entry['n']:>6} {k:>2}  {auc_text:<21} {acc:<20} "
                f"{_fmt(m['balanced_accuracy']['value']):>7} {_fmt(m['log_loss']['value']):>7} "
                f"{_fmt(chance['prior']['log_loss']):>6} {_fmt(m['brier']['value']):>6} "
                f"{_fmt(m['ece']['value']):>6} {_fmt(kl):>6} {_fmt(bayes.get('auc')):>9} "
                f"{_fmt(bayes.get('accuracy')):>9}")

    for name, entry in report["tasks"].items():
        lines.append(row(name, entry, str(entry["num_classes"])))
    labels = {"in_domain": "in-domain (macro)", "out_of_domain": "out-of-domain (macro)", "all": "all tasks (macro)"}
    groups = [(g, e) for g, e in report["groups"].items() if e is not None]
    if groups:
        lines.append("-" * len(head))
    for group, entry in groups:
        lines.append(row(labels[group], entry, ""))
    lines.append("acc (maj/unif): accuracy, then the chance levels of the majority class and of a uniform "
                 "guess; prior: log-loss of predicting the label frequencies; Bayes: the true "
                 "distributions' own metrics (synthetic logs)")
    return "\n".join(lines)
