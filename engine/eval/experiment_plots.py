"""Plots of the LTU experiment's report: arms, paired differences, data efficiency, dose-response.

Drawn on matplotlib ``Figure`` objects with the Agg canvas (no pyplot state) and written atomically.
Error bars are the 95% intervals of the report: over seeds where there are two or more, else over
test records.
"""
from __future__ import annotations

import os

from engine.fileio import atomic_open

_TITLES = {"in_domain": "in-domain", "out_of_domain": "out-of-domain", "multi_step": "multi-step"}


def _figure(columns: int, width: float = 4.4, height: float = 3.4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * columns, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure, [figure.add_subplot(1, columns, k + 1) for k in range(columns)]


def _save(figure, path: str) -> str:
    figure.tight_layout()
    with atomic_open(path, "wb") as fh:
        figure.savefig(fh, format="png")
    return path


def _errors(summary: dict | None, fallback: dict | None = None) -> tuple[float, float, float]:
    """(mean, below, above) for an error bar; no bar without an interval."""
    chosen = summary if summary and summary.get("ci") else (fallback or summary)
    if not chosen or chosen.get("mean") is None:
        return float("nan"), 0.0, 0.0
    mean = chosen["mean"]
    if not chosen.get("ci"):
        return mean, 0.0, 0.0
    return mean, max(mean - chosen["ci"][0], 0.0), max(chosen["ci"][1] - mean, 0.0)


def plot_arms(report: dict, path: str) -> str:
    groups = [g for g in _TITLES if g in report["ceilings"]]
    figure, axes = _figure(len(groups))
    labels = list(report["arms"])
    for ax, group in zip(axes, groups):
        values = [_errors(report["arms"][lb]["groups"][group]["auc"]) for lb in labels]
        ax.bar(range(len(labels)), [v[0] for v in values], yerr=[[v[1] for v in values], [v[2] for v in values]],
               color=["#999999" if lb != "B" else "#1f77b4" for lb in labels], capsize=3)
        bayes = report["ceilings"][group]["bayes"]["auc"]
        if bayes is not None:
            ax.axhline(bayes, color="green", linestyle="--", linewidth=1, label="Bayes ceiling")
        ax.axhline(0.5, color="black", linestyle=":", linewidth=1, label="chance")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_ylim(0.45, max(0.9, (bayes or 0) + 0.05))
        ax.set_title(f"{_TITLES[group]} AUC ({', '.join(report['ceilings'][group]['tasks'])})", fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    return _save(figure, path)


def plot_differences(report: dict, path: str) -> str:
    groups = [g for g in ("in_domain", "out_of_domain") if g in report["ceilings"]]
    figure, axes = _figure(len(groups))
    names = list(report["differences"])
    for ax, group in zip(axes, groups):
        for row, name in enumerate(names):
            diff = report["differences"][name][group]["auc"]
            for offset, (kind, color) in enumerate((("seeds", "#1f77b4"), ("records", "#ff7f0e"))):
                mean, below, above = _errors(diff.get(kind))
                ax.errorbar(mean, row + 0.15 * (offset * 2 - 1), xerr=[[below], [above]], fmt="o", color=color,
                            capsize=3, label=f"95% CI over {kind}" if row == 0 else None)
        ax.axvline(0.0, color="black", linewidth=1)
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("AUC difference")
        ax.set_title(f"{_TITLES[group]}: LTU (B) minus each arm", fontsize=9)
        ax.legend(fontsize=7)
    return _save(figure, path)


def plot_curve(report: dict, path: str) -> str:
    figure, axes = _figure(2)
    sizes = [row["records"] for row in report["curve"]]
    for ax, group in zip(axes, ("in_domain", "out_of_domain")):
        for label, color in (("A", "#999999"), ("B", "#1f77b4")):
            points = [_errors(row["groups"][group][label]) for row in report["curve"]]
            ax.errorbar(sizes, [p[0] for p in points], yerr=[[p[1] for p in points], [p[2] for p in points]],
                        marker="o", color=color, capsize=3, label=f"{label}: {report['arms'][label]['name']}")
        bayes = report["ceilings"].get(group, {}).get("bayes", {}).get("auc")
        if bayes is not None:
            ax.axhline(bayes, color="green", linestyle="--", linewidth=1, label="Bayes ceiling")
        ax.set_xscale("log")
        ax.set_xlabel("SFT records (target domain)")
        ax.set_ylabel("AUC")
        ax.set_title(f"data efficiency, {_TITLES[group]}", fontsize=9)
        ax.legend(fontsize=7)
    return _save(figure, path)


def plot_dose(report: dict, path: str) -> str:
    figure, axes = _figure(2)
    levels = [row["shared_structure"] for row in report["dose_response"]]
    for ax, group in zip(axes, ("in_domain", "out_of_domain")):
        points = [_errors(row["groups"][group]["B-A"]["seeds"], row["groups"][group]["B-A"].get("records"))
                  for row in report["dose_response"]]
        ax.errorbar(levels, [p[0] for p in points], yerr=[[p[1] for p in points], [p[2] for p in points]],
                    marker="o", capsize=3, color="#1f77b4")
        ax.axhline(0.0, color="black", linewidth=1)
        ax.set_xlabel("shared structure (correlation of domains' affinities)")
        ax.set_ylabel("AUC gain of LTU over SFT only (B - A)")
        ax.set_title(f"dose-response, {_TITLES[group]}", fontsize=9)
    return _save(figure, path)


def write_plots(report: dict, out: str) -> dict[str, str]:
    """Every plot the report has data for, under ``out``; returns {name: path}."""
    plots = {"arms": plot_arms(report, os.path.join(out, "arms.png")),
             "differences": plot_differences(report, os.path.join(out, "differences.png"))}
    if len(report["curve"]) > 1:
        plots["data efficiency"] = plot_curve(report, os.path.join(out, "data_efficiency.png"))
    if len(report["dose_response"]) > 1:
        plots["dose-response"] = plot_dose(report, os.path.join(out, "dose_response.png"))
    return plots
