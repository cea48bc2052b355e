"""The LTU experiment's results: read every evaluation, compare the arms, write report.json/.md and plots.

Cells are keyed by (world, label, SFT records, seed); a label is an arm (A, B, C, D) or one text
share of arm F (F25, F50). Task groups: ``in_domain`` (the target's tasks), ``out_of_domain``
(the held-out domain's), ``multi_step`` (the episodic domain's, when CT reads it) and
``ct_domains`` (the other CT domains', scored on CT checkpoints before SFT), each the mean over
its tasks, so one evaluation run may score several. SFT records 0 marks a CT checkpoint scored
before any SFT.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections import defaultdict
from types import SimpleNamespace

from engine.eval.experiment import ARM_NAMES, REPO, ExperimentConfig, Job, build_plan
from engine.eval.experiment_runner import JobResult, Runner, _abs
from engine.eval.experiment_stats import interval_above_zero, mean_interval, paired_bootstrap, paired_difference
from engine.eval.metrics import group_tasks
from engine.fileio import write_json_atomic, write_text_atomic

GROUPS = ("in_domain", "out_of_domain", "multi_step", "ct_domains")
GROUP_TITLES = {"in_domain": "in-domain", "out_of_domain": "out-of-domain", "multi_step": "multi-step",
                "ct_domains": "CT domains"}
METRICS_REPORTED = ("auc", "accuracy", "log_loss", "brier", "ece", "kl")
BOOTSTRAP_METRICS = ("auc", "log_loss")
MUST_BEAT = ("A", "C", "D")
FORMAT = "ltu-experiment"


def _task_group(domain: str, cfg: ExperimentConfig) -> str | None:
    if domain == cfg.target:
        return "in_domain"
    if domain == cfg.ood:
        return "out_of_domain"
    if domain == "feed/session":
        return "multi_step"
    return "ct_domains" if domain in cfg.ct_domains else None


def read_cell(eval_dir: str, cfg: ExperimentConfig) -> dict:
    """One evaluation: per group its metrics (mean over the group's tasks), Bayes ceiling and prior
    chance level, and the per-record predictions (TaskData) for paired bootstraps."""
    with open(os.path.join(eval_dir, "eval.json"), encoding="utf-8") as fh:
        report = json.load(fh)
    with open(os.path.join(eval_dir, "predictions.jsonl"), encoding="utf-8") as fh:
        # Predictions of real logs carry no true_probs: their true reward distributions are unknown.
        predictions = [SimpleNamespace(**{"true_probs": None, **json.loads(line)}) for line in fh if line.strip()]
    tasks = group_tasks(predictions)
    cell = {"groups": {}, "tasks": defaultdict(list), "records_per_s": report.get("records_per_s")}
    for task in tasks:
        group = _task_group(task.domain, cfg)
        if group is not None:
            cell["tasks"][group].append(task)
    for group, members in cell["tasks"].items():
        entries = [report["tasks"][t.name] for t in members]

        def mean_of(section: str, metric: str, chance: str | None = None) -> float | None:
            values = []
            for entry in entries:
                table = entry.get(section) or {}
                if chance:
                    table = table.get(chance) or {}
                value = table.get(metric)
                values.append(value["value"] if isinstance(value, dict) else value)
            return None if any(v is None for v in values) else sum(values) / len(values)

        cell["groups"][group] = {
            "tasks": [t.name for t in members], "n": sum(e["n"] for e in entries),
            "metrics": {m: mean_of("metrics", m) for m in METRICS_REPORTED},
            "bayes": {m: mean_of("bayes", m) for m in ("auc", "accuracy", "log_loss")},
            "prior": {m: mean_of("chance", m, chance="prior") for m in ("auc", "accuracy", "log_loss")}}
    return cell


def collect_cells(jobs: dict[str, Job], cfg: ExperimentConfig) -> dict[tuple, dict]:
    cells = {}
    for job in jobs.values():
        if job.info.get("kind") == "eval":
            key = (job.info["level"], job.info["label"], job.info["records"], job.info["seed"])
            cells[key] = read_cell(_abs(job.out_dir), cfg)
            cells[key]["eval_dir"] = job.out_dir
    return cells


def _series(cells: dict, level: float, label: str, records: int, group: str, metric: str) -> dict[int, float]:
    out = {}
    for (lv, lb, n, seed), cell in cells.items():
        if (lv, lb, n) == (level, label, records) and group in cell["groups"]:
            out[seed] = cell["groups"][group]["metrics"][metric]
    return out


def _runs(cells: dict, level: float, label: str, records: int, group: str, seeds: list[int]) -> list:
    return [cells[(level, label, records, s)]["tasks"][group] for s in seeds]


def compare(cells: dict, level: float, first: tuple[str, int], second: tuple[str, int], group: str, metrics,
            cfg: ExperimentConfig, cache: dict | None = None) -> dict:
    """``first - second`` per metric, each a (label, SFT records) cell: over seeds (t interval) and
    over test records (paired bootstrap; ``cache`` shares resampled values between comparisons)."""
    out = {}
    for metric in metrics:
        a = _series(cells, level, *first, group, metric)
        b = _series(cells, level, *second, group, metric)
        entry = {"seeds": paired_difference(a, b)}
        seeds = sorted(set(a) & set(b))
        if metric in BOOTSTRAP_METRICS and seeds:
            entry["records"] = paired_bootstrap(_runs(cells, level, *first, group, seeds),
                                                _runs(cells, level, *second, group, seeds), metric,
                                                cfg.bootstrap, seed=0, cache=cache)
        out[metric] = entry
    return out


def _holds(difference: dict, seeds: int) -> bool | None:
    """The paired difference is above 0: its record-bootstrap interval, and with two or more seeds
    its seed interval too, lie above 0."""
    checks = [interval_above_zero(difference.get("records"))]
    if seeds >= 2:
        checks.append(interval_above_zero(difference["seeds"]))
    if any(c is None for c in checks):
        return None
    return all(checks)


def summarize(cfg: ExperimentConfig, jobs: dict[str, Job], results: dict[str, JobResult], began: float,
              command: str) -> dict:
    """report.json: settings, per-arm metrics, differences, verdicts, curve, dose-response, costs, runs."""
    cells = collect_cells(jobs, cfg)
    cache: dict = {}  # resampled metric values of each run, shared by every comparison
    level, n = cfg.shared_structure, cfg.sft_records
    main = {k: c for k, c in cells.items() if k[0] == level and k[2] == n}
    labels = ["A", "B"] + sorted({k[1] for k in main} - {"A", "B"})
    groups_present = [g for g in GROUPS if any(g in c["groups"] for c in main.values())]
    arms = {}
    for label in labels:
        entry = {"name": ARM_NAMES[label[0]] + (f" ({label[1:]}% general text)" if label[0] == "F" else ""),
                 "groups": {}}
        for group in groups_present:
            entry["groups"][group] = {m: mean_interval(list(_series(cells, level, label, n, group, m).values()))
                                      for m in METRICS_REPORTED}
        arms[label] = entry
    reference = next(c for k, c in cells.items() if k[0] == level and k[2] > 0)
    ceilings = {g: {"bayes": reference["groups"][g]["bayes"], "prior": reference["groups"][g]["prior"],
                    "n": reference["groups"][g]["n"], "tasks": reference["groups"][g]["tasks"]}
                for g in groups_present if g in reference["groups"]}
    differences, verdicts = {}, []
    for other in [lb for lb in labels if lb != "B"]:
        differences[f"B-{other}"] = {g: compare(cells, level, ("B", n), (other, n), g, METRICS_REPORTED, cfg, cache)
                                     for g in groups_present}
    for other in [lb for lb in MUST_BEAT if lb in labels]:
        for group in ("in_domain", "out_of_domain"):
            d = differences[f"B-{other}"][group]["auc"]
            verdicts.append({"comparison": f"B-{other}", "group": group, "metric": "auc",
                             "mean": d["seeds"]["mean"], "seed_ci": d["seeds"]["ci"],
                             "record_ci": d.get("records", {}).get("ci"), "holds": _holds(d, len(cfg.seeds))})
    before_sft = before_sft_summary(cells, cfg, cache)
    curve = []
    for records in sorted({k[2] for k in cells if k[0] == level and k[1] in ("A", "B") and k[2] > 0}):
        seeds = sorted(set(_series(cells, level, "A", records, "in_domain", "auc"))
                       & set(_series(cells, level, "B", records, "in_domain", "auc")))
        row = {"records": records, "seeds": seeds, "groups": {}}
        for group in ("in_domain", "out_of_domain"):
            row["groups"][group] = {
                label: mean_interval([_series(cells, level, label, records, group, "auc")[s] for s in seeds])
                for label in ("A", "B")}
            row["groups"][group]["B-A"] = compare(cells, level, ("B", records), ("A", records), group, ["auc"],
                                                  cfg, cache)["auc"]
        curve.append(row)
    dose = []
    for lv in sorted({k[0] for k in cells}) if cfg.logs is None else ():  # a log folder has one world
        row = {"shared_structure": lv, "groups": {}}
        for group in ("in_domain", "out_of_domain"):
            diff = compare(cells, lv, ("B", n), ("A", n), group, ["auc"], cfg, cache)["auc"]
            row["groups"][group] = {"B-A": diff, **{label: mean_interval(list(
                _series(cells, lv, label, n, group, "auc").values())) for label in ("A", "B")}}
        dose.append(row)
    return {"format": FORMAT, "version": 1, "command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": machine_info(), "git_commit": _git_commit(), "wall_s": time.time() - began,
            "settings": cfg.to_dict(), "arms": arms, "ceilings": ceilings, "differences": differences,
            "verdicts": verdicts, "before_sft": before_sft, "curve": curve, "dose_response": dose,
            "logs": logs_summary(cfg),
            "truth": any(c["bayes"]["auc"] is not None for c in ceilings.values()),
            "costs": costs(cfg, jobs, results), "runs": run_list(jobs, results),
            "eval_records_per_s": mean_interval([c["records_per_s"] for c in cells.values()
                                                 if c.get("records_per_s")])}


def logs_summary(cfg: ExperimentConfig) -> dict | None:
    """Where the logs came from and what they hold, for the experiment's domains (None: synthetic logs
    the experiment wrote itself)."""
    folder = cfg.log_folder()
    if folder is None:
        return None
    manifest = folder.manifest
    domains = list(dict.fromkeys([cfg.target, cfg.ood, *cfg.ct_domains]))
    splits = ("train", "valid", "test")
    rates = next((manifest[k] for k in ("like_rate", "click_rate") if isinstance(manifest.get(k), dict)), None)
    return {"path": folder.path, "source": manifest.get("source"), "split": manifest.get("split"),
            "has_truth": folder.has_truth,
            "records": {s: {d: folder.records(s, d) for d in domains if d in folder.files.get(s, {})} for s in splits},
            "positive_rate": None if not rates else {s: {d: rates[s].get(d) for d in domains}
                                                     for s in splits if s in rates}}


def before_sft_summary(cells: dict, cfg: ExperimentConfig, cache: dict | None = None) -> dict:
    """Each CT checkpoint scored as it is (AUC and log-loss per group, over seeds), and what SFT then
    changed: the paired difference after SFT minus before, per group."""
    level, n = cfg.shared_structure, cfg.sft_records
    out = {}
    for label in sorted({k[1] for k in cells if k[0] == level and k[2] == 0}):
        groups = [g for g in GROUPS if any(g in c["groups"] for k, c in cells.items()
                                           if k[:3] == (level, label, 0))]
        entry = {"groups": {g: {m: mean_interval(list(_series(cells, level, label, 0, g, m).values()))
                                for m in ("auc", "log_loss")} for g in groups},
                 "prior_log_loss": {}, "bayes_log_loss": {}, "sft_effect": {}}
        first = next(c for k, c in cells.items() if k[:3] == (level, label, 0))
        for g in groups:
            entry["prior_log_loss"][g] = first["groups"][g]["prior"]["log_loss"]
            entry["bayes_log_loss"][g] = first["groups"][g]["bayes"]["log_loss"]
            if any(g in c["groups"] for k, c in cells.items() if k[:3] == (level, label, n)):
                entry["sft_effect"][g] = compare(cells, level, (label, n), (label, 0), g, ["auc"], cfg, cache)["auc"]
        out[label] = entry
    return out


def _main_setting_runs(cfg: ExperimentConfig, jobs: dict[str, Job]):
    """(job, arm label) of each CT run and each SFT and evaluation run of the main SFT set, at the
    main shared structure."""
    for job in jobs.values():
        info = job.info
        if info.get("level") == cfg.shared_structure and (
                info.get("stage") == "ct" or
                (info.get("stage") in ("sft", "eval") and info.get("records") == cfg.sft_records)):
            yield job, info["label"]


def planned_work(cfg: ExperimentConfig, jobs: dict[str, Job]) -> dict[str, dict]:
    """Per arm at the main setting, from the plan alone: optimizer steps and tokens of its CT and
    SFT, and their sums."""
    out = defaultdict(dict)
    for job, label in _main_setting_runs(cfg, jobs):
        stage = job.info["stage"]
        if stage in ("ct", "sft"):
            out[label].update({f"{stage}_steps": job.info["iters"], f"{stage}_tokens": job.info["tokens"]})
    for row in out.values():
        row["steps"] = row.get("ct_steps", 0) + row.get("sft_steps", 0)
        row["tokens"] = row.get("ct_tokens", 0) + row.get("sft_tokens", 0)
    return dict(out)


def costs(cfg: ExperimentConfig, jobs: dict[str, Job], results: dict[str, JobResult]) -> dict:
    """Per arm at the main setting: mean seconds of its CT, SFT and evaluation runs over seeds, and
    its optimizer steps and tokens."""
    per = defaultdict(lambda: defaultdict(list))
    for job, label in _main_setting_runs(cfg, jobs):
        if job.name in results:
            per[label][f"{job.info['stage']}_s"].append(results[job.name].seconds)
    work = planned_work(cfg, jobs)
    out = {}
    for label, values in per.items():
        row = {k: sum(v) / len(v) for k, v in values.items()}
        row.update(work[label])
        row["seconds"] = row.get("ct_s", 0) + row.get("sft_s", 0) + row.get("eval_s", 0)
        out[label] = row
    out["all_runs_s"] = sum(r.seconds for r in results.values())
    out["runs_executed"] = sum(not r.reused for r in results.values())
    out["runs_reused"] = sum(r.reused for r in results.values())
    return out


def run_list(jobs: dict[str, Job], results: dict[str, JobResult]) -> list[dict]:
    return [{"name": j.name, "out_dir": j.out_dir, "command": j.command(),
             "seconds": results[j.name].seconds if j.name in results else None,
             "reused": results[j.name].reused if j.name in results else None} for j in jobs.values()]


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    return info


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------------------------ markdown
def _f(value, digits: int = 3, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _ci(summary: dict | None, digits: int = 3, signed: bool = False) -> str:
    if not summary or summary.get("mean") is None:
        return "-"
    text = _f(summary["mean"], digits, signed)
    if summary.get("ci"):
        text += f" [{_f(summary['ci'][0], digits, signed)}, {_f(summary['ci'][1], digits, signed)}]"
    return text


def _verdict_word(holds: bool | None) -> str:
    return {True: "holds", False: "does not hold", None: "undecided (no interval)"}[holds]


def _data_sentence(report: dict) -> str:
    """Which logs the experiment ran on and how much of them."""
    s, logs = report["settings"], report.get("logs")
    if logs is None:
        return (f"Synthetic logs (`engine/data/synthetic.py`, seed {s['logs_seed']}, shared structure "
                f"{s['shared_structure']:g}): {s['records_per_domain']} training, {s['valid_per_domain']} validation "
                f"and {s['test_per_domain']} test records per domain.")
    source = logs.get("source") or {}
    rates = logs.get("positive_rate") or {}

    def counts(domain: str) -> str:
        parts = []
        for split in ("train", "valid", "test"):
            n = logs["records"].get(split, {}).get(domain)
            rate = rates.get(split, {}).get(domain)
            parts.append(f"{'-' if n is None else n}" + ("" if rate is None else f" ({rate:.1%} positive)"))
        return " / ".join(parts)

    domains = list(dict.fromkeys([s["target"], s["ood"], *s["ct_domains"]]))
    rule = (logs.get("split") or {}).get("rule")
    text = (f"Logs read from `{logs['path']}`" + (f" ({source['name']})" if source.get("name") else "") +
            (f"; split by time ({rule})" if rule else "") + ". Records train / valid / test: " +
            "; ".join(f"`{d}` {counts(d)}" for d in domains) + ".")
    if not report.get("truth"):
        text += (" These are real logs: their true reward distributions are unknown, so this report has no Bayes "
                 "ceiling and no KL to the truth; chance is predicting the label frequencies.")
    return text


def render_markdown(report: dict, plots: dict[str, str]) -> str:
    s, m = report["settings"], report["machine"]
    groups = [g for g in GROUPS if g in report["ceilings"]]
    costs = report["costs"]
    base = f"given: {s['base']}" if s["base"] else \
        f"a fresh model {json.dumps(s['model'])}, initialised once with seed {s['base_seed']}"
    logs = report.get("logs")
    title = "" if logs is None else f" on {(logs.get('source') or {}).get('name') or logs['path']}"
    lines = [f"# LTU experiment{title} ({s['setting']} setting)", "",
             f"- date: {report['date']}; wall time {report['wall_s'] / 60:.1f} min for {costs['runs_executed']} runs "
             f"({s['jobs']} at a time" + (f"; {costs['runs_reused']} more reused from an earlier invocation"
                                          if costs["runs_reused"] else "") +
             f"); the runs' own times sum to {costs['all_runs_s'] / 60:.1f} min",
             f"- machine: {m['cpu']} ({m['cpu_count']} CPUs visible), {m['platform']}, Python {m['python']}, "
             f"torch {m['torch']}, GPU {m['cuda'] or 'none'}; load average at the end "
             f"{m.get('load_average', '-')}",
             f"- command: `{report['command']}`", f"- commit: {report['git_commit'] or 'unknown'}", "",
             "## Setup", "", _data_sentence(report),
             f"Target `{s['target']}`; held-out domain `{s['ood']}` "
             f"(never trained on); CT reads the training logs of {', '.join(f'`{d}`' for d in s['ct_domains'])}"
             + (" and the target's" if s["ct_includes_target"] else
                " but not the target's: B's gain is transfer from other domains, and the SFT set is the only "
                "target data any arm sees") + ".",
             f"Every arm starts from one base checkpoint ({base}); "
             f"seeds {', '.join(map(str, s['seeds']))} set the CT and SFT data order, the same for every arm.",
             f"CT: {s['ct']['iters']} steps x {s['ct']['global_batch_size']} x {s['ct']['seq_length']} tokens, lr "
             f"{s['ct']['lr']:g} cosine to {s['ct']['min_lr']:g}. SFT (every arm): {s['sft']['iters']} steps x "
             f"{s['sft']['global_batch_size']} records of the target's first {s['sft_records']} training records, "
             f"lr {s['sft']['lr']:g} to {s['sft']['min_lr']:g}; D runs {s['ct']['iters']} + {s['sft']['iters']} SFT "
             f"steps. Metrics on the {s['eval_split']} split.", "",
             "Intervals: `seeds` is the 95% t interval over training seeds (differences taken seed by seed); "
             "`records` the 95% paired bootstrap over test records (the same resample for both arms and every "
             "seed).", ""]
    if report.get("notes"):
        lines += ["## What the numbers show", "", report["notes"], ""]
    lines += ["## Arms", ""]
    head = "| arm | " + " | ".join(f"{GROUP_TITLES[g]} AUC" for g in groups) + \
        " | in-domain log-loss | in-domain accuracy |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for label, arm in report["arms"].items():
        cells = [_ci(arm["groups"][g]["auc"]) for g in groups]
        lines.append(f"| {label}: {arm['name']} | " + " | ".join(cells) + f" | "
                     f"{_ci(arm['groups']['in_domain']['log_loss'])} | {_ci(arm['groups']['in_domain']['accuracy'])} |")
    if report.get("truth", True):
        lines.append("| Bayes ceiling (true probabilities) | " + " | ".join(
            _f(report["ceilings"][g]["bayes"]["auc"]) for g in groups) +
            f" | {_f(report['ceilings']['in_domain']['bayes']['log_loss'])} | "
            f"{_f(report['ceilings']['in_domain']['bayes']['accuracy'])} |")
    lines.append("| chance (label frequencies) | " + " | ".join("0.500" for _ in groups) +
                 f" | {_f(report['ceilings']['in_domain']['prior']['log_loss'])} | "
                 f"{_f(report['ceilings']['in_domain']['prior']['accuracy'])} |")
    lines += ["", "## Paired differences (AUC)", "",
              "| difference | " + " | ".join(f"{GROUP_TITLES[g]}: seeds / records" for g in groups) + " |",
              "|---|" + "---|" * len(groups)]
    for name, diff in report["differences"].items():
        lines.append(f"| {name} | " + " | ".join(
            f"{_ci(diff[g]['auc']['seeds'], signed=True)} / "
            f"{_ci(diff[g]['auc'].get('records'), signed=True)}" for g in groups) + " |")
    lines += ["", "## What must hold", "",
              ("" if report.get("logs") is None else "The synthetic benchmark's test, here on these logs: ") +
              "LTU (B) beats SFT only (A), the shuffled-reward control (C) and compute-matched SFT (D) in AUC, "
              "in-domain and out-of-domain: the paired difference's interval over test records, and with two or "
              "more seeds its interval over seeds, lie above 0.", ""]
    for v in report["verdicts"]:
        lines.append(f"- {v['comparison']} {GROUP_TITLES[v['group']]}: {_f(v['mean'], signed=True)} "
                     f"(seeds {_ci({'mean': v['mean'], 'ci': v['seed_ci']}, signed=True)}, records "
                     f"{_ci({'mean': v['mean'], 'ci': v['record_ci']}, signed=True)}): **{_verdict_word(v['holds'])}**")
    if report.get("before_sft"):
        truth = report.get("truth", True)
        zero_shot = [g for g in ("in_domain", "out_of_domain", "multi_step")
                     if any(g in entry["groups"] for entry in report["before_sft"].values())]
        lines += ["", "## What CT alone learned (CT checkpoints scored before SFT)", "",
                  "AUC on the evaluation domains (zero-shot for the target and the held-out domain), log-loss on "
                  f"the CT domains' own {s['eval_split']} records against predicting the label frequencies (prior)"
                  + (" and the Bayes ceiling" if truth else "") + "; then what SFT changed (after minus before, "
                  "paired).", "",
                  "| CT of | " + " | ".join(f"{GROUP_TITLES[g]} AUC" for g in zero_shot) + " | CT-domain log-loss "
                  + ("(prior / Bayes)" if truth else "(prior)") +
                  " | SFT effect, in-domain AUC | SFT effect, out-of-domain AUC |", "|" + "---|" * (len(zero_shot) + 4)]
        for label, entry in report["before_sft"].items():
            g = entry["groups"]
            effect = entry["sft_effect"]
            ct_loss = g.get("ct_domains", {}).get("log_loss")
            auc = [_ci(g.get(group, {}).get("auc")) for group in zero_shot]
            prior, bayes = entry["prior_log_loss"].get("ct_domains"), entry["bayes_log_loss"].get("ct_domains")
            lines.append(
                f"| {label} | {' | '.join(auc)} | {_ci(ct_loss)} ({_f(prior)}" + (f" / {_f(bayes)}" if truth else "") +
                ") | "
                f"{_ci(effect.get('in_domain', {}).get('seeds'), signed=True)} | "
                f"{_ci(effect.get('out_of_domain', {}).get('seeds'), signed=True)} |")
    if report["curve"]:
        lines += ["", "## Data efficiency (AUC vs SFT records)", "",
                  "| SFT records | seeds | in-domain A | in-domain B | B-A (records) | out-of-domain A | "
                  "out-of-domain B | B-A (records) |", "|---|---|---|---|---|---|---|---|"]
        for row in report["curve"]:
            g_in, g_out = row["groups"]["in_domain"], row["groups"]["out_of_domain"]
            lines.append(f"| {row['records']} | {len(row['seeds'])} | {_ci(g_in['A'])} | {_ci(g_in['B'])} | "
                         f"{_ci(g_in['B-A'].get('records'), signed=True)} | {_ci(g_out['A'])} | {_ci(g_out['B'])} | "
                         f"{_ci(g_out['B-A'].get('records'), signed=True)} |")
    if len(report["dose_response"]) > 1:
        lines += ["", "## Dose-response: LTU's gain vs shared structure", "",
                  "Shared structure s: any two domains' user-item affinities have correlation s.", "",
                  "| shared structure | in-domain B-A: seeds / records | out-of-domain B-A: seeds / records |",
                  "|---|---|---|"]
        for row in report["dose_response"]:
            cells = [f"{_ci(row['groups'][g]['B-A']['seeds'], signed=True)} / "
                     f"{_ci(row['groups'][g]['B-A'].get('records'), signed=True)}"
                     for g in ("in_domain", "out_of_domain")]
            lines.append(f"| {row['shared_structure']:g} | " + " | ".join(cells) + " |")
    lines += ["", "## Cost per arm (mean over seeds)", "",
              "| arm | CT steps | SFT steps | tokens (CT + SFT) | CT s | SFT s | evaluation s |",
              "|---|---|---|---|---|---|---|"]
    for label, row in report["costs"].items():
        if label in ("all_runs_s", "runs_executed", "runs_reused"):
            continue
        lines.append(f"| {label} | {row.get('ct_steps', 0)} | {row.get('sft_steps', 0)} | {row['tokens']:,} | "
                     f"{_f(row.get('ct_s'), 1)} | {_f(row.get('sft_s'), 1)} | {_f(row.get('eval_s'), 1)} |")
    rate = report.get("eval_records_per_s") or {}
    lines += ["", f"Evaluation throughput: {_ci(rate, 1)} records/s per process (mean over runs, "
              "its 95% t interval)."]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({os.path.basename(path)})" for name, path in plots.items()]
    lines += ["", "## Runs", "", "Every run, from the repository root (output directory, then command):", ""]
    for run in report["runs"]:
        lines.append(f"- `{run['name']}` -> `{run['out_dir']}` ({_f(run['seconds'], 1)} s"
                     f"{', reused' if run['reused'] else ''}): `{run['command']}`")
    return "\n".join(lines) + "\n"


def write_report(out: str, report: dict) -> dict[str, str]:
    """report.json, report.md and the plots under ``out``; returns the written paths by kind."""
    from engine.eval.experiment_plots import write_plots

    os.makedirs(out, exist_ok=True)
    plots = write_plots(report, out)
    report = {**report, "plots": {k: os.path.basename(v) for k, v in plots.items()}}
    write_json_atomic(os.path.join(out, "report.json"), report)
    write_text_atomic(os.path.join(out, "report.md"), render_markdown(report, plots))
    return {"report.json": os.path.join(out, "report.json"), "report.md": os.path.join(out, "report.md"), **plots}


def run_experiment(cfg: ExperimentConfig, command: str, log=print, notes: str | None = None) -> dict:
    """Plan, run (reusing completed runs), summarize and write the report; returns report.json's dict
    with the written paths under ``"written"``; ``notes`` (Markdown) is shown under "What the numbers show"."""
    began = time.time()
    jobs = build_plan(cfg)
    log(f"ltu experiment ({cfg.setting}): {len(jobs)} runs, {cfg.jobs} at a time; runs under {cfg.work}, "
        f"report under {cfg.out}")
    results = Runner(jobs, cfg.work, cfg.jobs, cfg.threads_per_job, log).run()
    report = summarize(cfg, jobs, results, began, command)
    if notes is not None:
        report["notes"] = notes.strip()
    written = write_report(cfg.out, report)
    return {**report, "written": written}
