"""The Open Bandit Dataset (OBD) as SAR log folders, in the synthetic and MovieLens logs' layout.

Reads every log ``<source>/<policy>/<campaign>/<campaign>.csv`` (with ``item_context.csv`` beside
it) and writes ``<out_dir>/<split>/<domain_slug>.jsonl`` for the train, valid and test splits plus
``<out_dir>/manifest.json``. Each log is one domain, ``obd/<policy>/<campaign>``; each row one
decision, as :mod:`engine.data.obd` defines it (state: user features, slot and affinity summary;
action: the item and its features; reward: ``click``; meta: propensity score, timestamp, row).

Split: by time, within each log. With the log's n timestamps sorted as t[0] <= ... <= t[n-1],
``valid_from = t[floor(n (1 - valid_fraction - test_fraction))]`` and
``test_from = t[floor(n (1 - test_fraction))]``; train holds the rows before ``valid_from``, valid
those from ``valid_from`` to before ``test_from``, test the rest (rows sharing a timestamp stay
together; a fraction of 0 leaves its split empty). Each split's file lists its records in an order
shuffled by ``seed``, so its first n lines are a random sample of n from that period.

The manifest names the files, which domains are in- and out-of-domain (``ood_domains``, held out of
continued pre-training), each log's cut, and per split and domain the records and click rate. Its
``bayes_ceiling`` is empty: the true click probabilities of real logs are unknown.
"""
from __future__ import annotations

import json
import math
import os
import zlib
from dataclasses import asdict, dataclass
from datetime import datetime

import numpy as np

from engine.data.obd import ITEM_CONTEXT, ObdOptions, domain_for, is_obd_log, iter_obd_rows
from engine.fileio import atomic_open, write_json_atomic

SPLITS = ("train", "valid", "test")
DOMAIN_PREFIX = "obd/"
REWARD_FIELD = "click"
SOURCE_NAME = "Open Bandit Dataset"


class ObdLogsError(ValueError):
    """OBD input or settings the log writer cannot use; the message names the file or the setting."""


def domain_name(name: str) -> str:
    """``random/all`` or ``obd/random/all`` as the domain ``obd/random/all``."""
    return name if name.startswith(DOMAIN_PREFIX) else DOMAIN_PREFIX + name


@dataclass(frozen=True)
class ObdLogsConfig:
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    ood_domains: tuple[str, ...] = ("obd/random/all",)   # held out of CT; "policy/campaign" works too
    seed: int = 0                                         # the order of records within each file
    hash_chars: int = 8                                   # see engine.data.obd.ObdOptions
    top_affinities: int = 3

    def __post_init__(self):
        for name in ("valid_fraction", "test_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ObdLogsError(f"{name} must be a number in [0, 1), got {value!r}")
        if self.valid_fraction + self.test_fraction >= 1.0:
            raise ObdLogsError(f"valid_fraction + test_fraction must be below 1 (the rest is the training split), "
                               f"got {self.valid_fraction} + {self.test_fraction}")
        for name in ("seed", "hash_chars", "top_affinities"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ObdLogsError(f"{name} must be an integer >= 0, got {value!r}")
        object.__setattr__(self, "ood_domains", tuple(dict.fromkeys(domain_name(d) for d in self.ood_domains)))

    @property
    def options(self) -> ObdOptions:
        return ObdOptions(hash_chars=self.hash_chars, top_affinities=self.top_affinities)


def find_logs(source: str) -> dict[str, str]:
    """``{domain: path}`` of every OBD log under ``source`` (``<policy>/<campaign>/*.csv``), in
    policy then campaign order."""
    if not os.path.isdir(source):
        raise ObdLogsError(f"{source}: not a folder (expected <policy>/<campaign>/<campaign>.csv under it)")
    found: dict[str, str] = {}
    for policy in sorted(os.listdir(source)):
        policy_dir = os.path.join(source, policy)
        if not os.path.isdir(policy_dir):
            continue
        for campaign in sorted(os.listdir(policy_dir)):
            folder = os.path.join(policy_dir, campaign)
            if not os.path.isdir(folder):
                continue
            logs = [os.path.join(folder, f) for f in sorted(os.listdir(folder))
                    if f.endswith(".csv") and f != ITEM_CONTEXT and is_obd_log(os.path.join(folder, f))]
            if len(logs) > 1:
                raise ObdLogsError(f"{folder}: more than one OBD log ({', '.join(os.path.basename(p) for p in logs)}); "
                                   "one log per policy/campaign folder")
            if logs:
                found[domain_for(logs[0])] = logs[0]
    if not found:
        raise ObdLogsError(f"{source}: no OBD log found (expected <policy>/<campaign>/<campaign>.csv with the "
                           "columns timestamp, item_id, position, click, propensity_score)")
    return found


def read_log(path: str, options: ObdOptions = ObdOptions()) -> list[tuple[datetime, dict]]:
    """``(time, record)`` per row of one log, in file order; the first bad row raises its RecordError."""
    rows = []
    for where, item in iter_obd_rows(path, options):
        if isinstance(item, Exception):
            raise item
        text = item["meta"]["timestamp"]
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise ObdLogsError(f"{where}: column 'timestamp': not an ISO date and time: {text!r}") from None
        rows.append((moment, item))
    if not rows:
        raise ObdLogsError(f"{path}: no rows")
    if len({m.tzinfo is None for m, _ in rows}) > 1:
        raise ObdLogsError(f"{path}: column 'timestamp' mixes times with and without a time zone")
    return rows


def time_cuts(times: list, valid_fraction: float, test_fraction: float) -> tuple:
    """``(valid_from, test_from)`` as the module docstring defines them (None: that split is empty)."""
    ordered = sorted(times)

    def at_quantile(q: float):  # t[floor(n q)], without float noise moving the floor (0.9 - 0.1 ...)
        return ordered[min(len(ordered) - 1, math.floor(len(ordered) * q + 1e-9))]

    test_from = at_quantile(1.0 - test_fraction) if test_fraction > 0 else None
    valid_from = at_quantile(1.0 - valid_fraction - test_fraction) if valid_fraction > 0 else test_from
    return valid_from, test_from


def split_of(moment, valid_from, test_from) -> str:
    if test_from is not None and moment >= test_from:
        return "test"
    if valid_from is not None and moment >= valid_from:
        return "valid"
    return "train"


def split_log(rows: list[tuple[datetime, dict]], domain: str, config: ObdLogsConfig) -> tuple[dict, dict]:
    """One log's records by split (each split shuffled by the seed) and its cut."""
    valid_from, test_from = time_cuts([m for m, _ in rows], config.valid_fraction, config.test_fraction)
    by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for moment, record in rows:
        by_split[split_of(moment, valid_from, test_from)].append(record)
    for index, split in enumerate(SPLITS):
        rng = np.random.default_rng([config.seed, index, zlib.crc32(domain.encode())])
        items = by_split[split]
        by_split[split] = [items[i] for i in rng.permutation(len(items))]
    cut = {"valid_from": None if valid_from is None else valid_from.isoformat(sep=" "),
           "test_from": None if test_from is None else test_from.isoformat(sep=" ")}
    return by_split, cut


def domain_slug(domain: str) -> str:
    return domain.replace("/", "_")


def write_logs(source: str, out_dir: str, config: ObdLogsConfig = ObdLogsConfig()) -> dict:
    """Write every log under ``source`` as ``<out_dir>/<split>/<domain_slug>.jsonl`` (empty files
    included) and ``<out_dir>/manifest.json``; returns the manifest."""
    logs = find_logs(source)
    unknown = [d for d in config.ood_domains if d not in logs]
    if unknown:
        raise ObdLogsError(f"out-of-domain {', '.join(unknown)} is not a log under {source} "
                           f"(domains: {', '.join(logs)})")
    if len(config.ood_domains) == len(logs):
        raise ObdLogsError(f"no in-domain log: every domain ({', '.join(logs)}) is out-of-domain")
    records, cuts, rows = {}, {}, {}
    for domain, path in logs.items():
        read = read_log(path, config.options)
        rows[domain] = len(read)
        records[domain], cuts[domain] = split_log(read, domain, config)
    files: dict[str, dict[str, str]] = {}
    for split in SPLITS:
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
        for domain in logs:
            path = os.path.join(out_dir, split, domain_slug(domain) + ".jsonl")
            with atomic_open(path) as fh:
                for record in records[domain][split]:
                    fh.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
            files.setdefault(split, {})[domain] = os.path.relpath(path, out_dir)
    counts = {s: {d: len(records[d][s]) for d in logs} for s in SPLITS}
    clicks = {s: {d: sum(r["reward"][REWARD_FIELD] for r in records[d][s]) for d in logs} for s in SPLITS}
    rates = {s: {d: clicks[s][d] / counts[s][d] if counts[s][d] else None for d in logs} for s in SPLITS}
    manifest = {
        "source": {"name": SOURCE_NAME, "path": os.path.abspath(source),
                   "logs": {d: os.path.relpath(p, source) for d, p in logs.items()}, "rows": rows},
        "config": asdict(config),
        "split": {"cuts": cuts,
                  "rule": "per log: train: timestamp < valid_from; valid: valid_from <= timestamp < test_from; "
                          "test: timestamp >= test_from"},
        "in_domain": [d for d in logs if d not in config.ood_domains], "out_of_domain": list(config.ood_domains),
        "files": files, "reward_fields": {d: REWARD_FIELD for d in logs},
        "records": counts, "clicks": clicks, "click_rate": rates,
        "bayes_ceiling": {},  # real logs: the true click probabilities are unknown
    }
    write_json_atomic(os.path.join(out_dir, "manifest.json"), manifest)
    return manifest


def format_logs_summary(manifest: dict, out_dir: str) -> str:
    """Records and click rate per split and domain, and each log's cut."""
    domains = list(manifest["reward_fields"])
    width = max(len(d) for d in domains) + len(" (out-of-domain)")
    lines = [f"wrote {SOURCE_NAME} SAR logs to {out_dir}: {out_dir}/<split>/<domain>.jsonl",
             f"  {'records (click rate)':{width}} " + " ".join(f"{s:>16}" for s in SPLITS) + "  test from"]
    for domain in domains:
        name = domain + (" (out-of-domain)" if domain in manifest["out_of_domain"] else "")
        cells = []
        for split in SPLITS:
            rate = manifest["click_rate"][split][domain]
            cells.append(f"{manifest['records'][split][domain]:7d} ({'-' if rate is None else f'{rate:.2%}':>6})")
        lines.append(f"  {name:{width}} " + " ".join(f"{c:>16}" for c in cells) +
                     f"  {manifest['split']['cuts'][domain]['test_from'] or '-'}")
    lines.append(f"manifest (files, cuts, counts, click rates): {os.path.join(out_dir, 'manifest.json')}")
    return "\n".join(lines)
