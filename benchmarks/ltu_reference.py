#!/usr/bin/env python
"""What the synthetic LTU benchmark allows: classical reference models on the same records.

    python benchmarks/ltu_reference.py --logs runs/ltu_quick/main/logs --out benchmarks/results/ltu_reference.md

For the target domain (default ads/ctr), at each number n of target training records:

- ``in-domain``: a logistic regression on one-hot state and action fields plus every user x item
  field pair (the form of the generator's affinity), fitted on the n target records only;
- ``transfer``: the same logistic regression given, besides the target's one-hot fields, the
  predictions of ridge regressions fitted on the CT domains' training records (each CT domain's
  reward, log-scaled, against its user x item field pairs): what "learning" on other domains' logs
  can hand to "using" on the target when the model class is right.

Regularisation strengths are chosen on the validation split; AUC is reported on the test split with
the Bayes ceiling of the same records. The gap between the two rows is the headroom an LTU model can
claim on these logs; the engine's arms are measured against it in the experiment's notes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np



USER = ("user_age", "user_region", "user_device", "user_interest")
ITEM = ("item_category", "item_brand", "item_price_tier")
STRENGTHS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def read(logs: str, split: str, domain: str) -> list[dict]:
    path = os.path.join(logs, split, domain.replace("/", "_") + ".jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f]


def decisions(records: list[dict]) -> list[tuple[dict, dict, float]]:
    """(state, action, reward value) of every decision; episodes give one per step."""
    out = []
    for r in records:
        for step in r.get("steps", [r]):
            (value,) = step["reward"].values()
            out.append((step["state"], step["action"], float(value)))
    return out


def pair_keys(state: dict, action: dict) -> list[str]:
    return [f"{u}={state[u]}|{i}={action[i]}" for u in USER for i in ITEM]


def field_keys(state: dict, action: dict) -> list[str]:
    return [f"{k}={v}" for k, v in {**state, **action}.items() if not isinstance(v, float)]


class OneHot:
    def __init__(self, rows: list[list[str]]):
        self.index = {}
        for keys in rows:
            for k in keys:
                self.index.setdefault(k, len(self.index))

    def __call__(self, rows: list[list[str]]) -> np.ndarray:
        x = np.zeros((len(rows), len(self.index)))
        for n, keys in enumerate(rows):
            for k in keys:
                if k in self.index:
                    x[n, self.index[k]] = 1.0
        return x


def transfer_scores(logs: str, ct_domains: list[str], strength: float):
    """A function (state, action) rows -> one column per CT domain: its ridge fit's prediction."""
    from sklearn.linear_model import Ridge

    models = []
    for domain in ct_domains:
        rows = decisions(read(logs, "train", domain))
        encode = OneHot([pair_keys(s, a) for s, a, _ in rows])
        y = np.array([math.log1p(v) for _, _, v in rows])
        models.append((encode, Ridge(alpha=strength).fit(encode([pair_keys(s, a) for s, a, _ in rows]), y)))

    def scores(rows):
        keys = [pair_keys(s, a) for s, a, _ in rows]
        return np.column_stack([m.predict(encode(keys)) for encode, m in models])
    return scores


def fit_and_score(train, valid, test, features) -> tuple[float, float]:
    """Logistic regression on ``features(rows)``, strength chosen on valid; (valid AUC, test AUC)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    y = {name: np.array([v for _, _, v in rows]) for name, rows in (("train", train), ("valid", valid), ("test", test))}
    scaler = StandardScaler().fit(features(train))
    x = {name: scaler.transform(features(rows)) for name, rows in (("train", train), ("valid", valid), ("test", test))}
    best = None
    for c in STRENGTHS:
        model = LogisticRegression(C=c, max_iter=5000).fit(x["train"], y["train"])
        auc = roc_auc_score(y["valid"], model.predict_proba(x["valid"])[:, 1])
        if best is None or auc > best[0]:
            best = (auc, roc_auc_score(y["test"], model.predict_proba(x["test"])[:, 1]))
    return best


def run(logs: str, target: str, ct_domains: list[str], sizes: list[int]) -> dict:
    from sklearn.metrics import roc_auc_score

    train_all, valid, test = (read(logs, s, target) for s in ("train", "valid", "test"))
    test_rows, valid_rows = decisions(test), decisions(valid)
    truth = [r["meta"]["reward_dist"] for r in test]
    bayes = roc_auc_score([v for _, _, v in test_rows], [next(iter(t.values()))["p"] for t in truth])
    # The ridge strength is chosen once, by the transfer model's validation AUC at the largest size.
    scores_by_strength = {a: transfer_scores(logs, ct_domains, a) for a in (1.0, 10.0, 100.0)}
    rows = []
    for n in sizes:
        train = decisions(train_all[:n])
        fields = OneHot([field_keys(s, a) for s, a, _ in train])
        pairs = OneHot([field_keys(s, a) + pair_keys(s, a) for s, a, _ in train])
        in_domain = fit_and_score(train, valid_rows, test_rows,
                                  lambda rs: pairs([field_keys(s, a) + pair_keys(s, a) for s, a, _ in rs]))
        transfer = max((fit_and_score(train, valid_rows, test_rows,
                                      lambda rs, sc=sc: np.hstack([fields([field_keys(s, a) for s, a, _ in rs]), sc(rs)]))
                        for sc in scores_by_strength.values()), key=lambda r: r[0])
        rows.append({"records": n, "in_domain": {"valid_auc": in_domain[0], "test_auc": in_domain[1]},
                     "transfer": {"valid_auc": transfer[0], "test_auc": transfer[1]}})
    return {"target": target, "ct_domains": ct_domains, "bayes_test_auc": bayes, "test_records": len(test_rows),
            "rows": rows}


def markdown(result: dict, command: str) -> str:
    lines = ["# Reference models on the synthetic LTU logs", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {platform.processor() or platform.machine()}, "
             f"Python {platform.python_version()}", f"- command: `{command}`", "",
             f"Target `{result['target']}`; transfer from the training logs of {', '.join(result['ct_domains'])}. "
             f"Test AUC on {result['test_records']} records (strengths chosen on valid); Bayes ceiling "
             f"{result['bayes_test_auc']:.3f}.", "",
             "| target records | in-domain logistic (pairs) | transfer (CT-domain ridge scores + fields) |", "|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['records']} | {r['in_domain']['test_auc']:.3f} | {r['transfer']['test_auc']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--logs", required=True, help="a make_synthetic_logs.py output folder")
    p.add_argument("--target", default="ads/ctr")
    p.add_argument("--ct-domains", nargs="+", default=["ads/cpc", "ads/impressions", "feed/session"])
    p.add_argument("--sizes", type=int, nargs="+", default=[50, 500, 4000])
    p.add_argument("--out", default=None, help="write the table as markdown here (and .json beside it)")
    args = p.parse_args(argv)
    result = run(args.logs, args.target, args.ct_domains, args.sizes)
    text = markdown(result, " ".join(["python", "benchmarks/ltu_reference.py", *(argv or sys.argv[1:])]))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
