"""results.json, a Markdown report, and PNG plots (reliability diagrams, method comparison)."""
from __future__ import annotations

import json
from pathlib import Path

from . import metrics
from .checkpoint import atomic_write_text

METRICS = ("acc", "ece", "nll", "brier")


def results_json(methods: dict, config: dict) -> dict:
    """The published schema: {"config", "methods": {name: {"id", "ood", "sigma_min",
    "sigma_min_rank_deficient", "unreadable"}}}. "id" and "sigma_min" are null without an ID set;
    "unreadable" counts the images of each set that could not be read (skipped)."""
    return {"config": config,
            "methods": {name: {"id": r.get("id"), "ood": r.get("ood", {}), "sigma_min": r.get("sigma_min"),
                               "sigma_min_rank_deficient": bool(r.get("sigma_min_rank_deficient")),
                               "unreadable": r.get("unreadable", {})}
                        for name, r in methods.items()}}


def _sigma_cell(r: dict) -> str:
    sm = r.get("sigma_min")
    if sm is None:
        return "-"
    return "0 (rank-deficient)" if r.get("sigma_min_rank_deficient") else f"{sm:.3e}"


def table(methods: dict) -> str:
    """Markdown table: ID and OOD-average metrics and sigma_min per method."""
    lines = ["| method | ID acc | ID ECE | ID NLL | ID Brier | OOD avg acc | OOD avg ECE | "
             "OOD avg NLL | OOD avg Brier | sigma_min |", "|---" * 10 + "|"]
    for name, r in methods.items():
        avg = r.get("ood", {}).get("avg", {})
        idr = r.get("id") or {}
        cells = [f"{idr[m]:.4f}" if m in idr else "-" for m in METRICS] + [
            f"{avg[m]:.4f}" if m in avg else "-" for m in METRICS]
        cells.append(_sigma_cell(r))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_set_table(methods: dict, metric: str) -> str:
    sets = ["id"] + [s for s in next(iter(methods.values())).get("ood", {}) if s != "avg"] + ["avg"]
    lines = [f"| method | " + " | ".join(sets) + " |", "|---" * (len(sets) + 1) + "|"]
    for name, r in methods.items():
        vals = [(r.get("id") or {}).get(metric)] + [r["ood"].get(s, {}).get(metric) for s in sets[1:]]
        lines.append(f"| {name} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in vals) + " |")
    return "\n".join(lines)


FAMILY_NAMES = {"softmax": "CLIP's symmetric InfoNCE", "sigmoid": "SigLIP's pairwise sigmoid loss"}


def markdown(methods: dict, config: dict, extra: str = "") -> str:
    parts = ["# calrft results", ""]
    if config.get("loss_family"):
        parts += [f"Contrastive loss family: **{config['loss_family']}** "
                  f"({FAMILY_NAMES[config['loss_family']]}).", ""]
    parts += ["## Summary", "", table(methods), ""]
    if any(r.get("ood") for r in methods.values()):
        for m in METRICS:
            parts += [f"## {m} per set", "", per_set_table(methods, m), ""]
    parts += ["ECE: 15 equal-width confidence bins over each whole set. sigma_min: smallest eigenvalue "
              "of the covariance of standardised ID image features over the ID evaluation set.", ""]
    notes = []
    for name, r in methods.items():
        if r.get("id") is None:
            notes.append(f"- {name}: no ID evaluation set (--id-eval): ID metrics and sigma_min are not "
                         "computed; every set is OOD.")
        if r.get("sigma_min_rank_deficient"):
            notes.append(f"- {name}: sigma_min is 0 because the ID set has no more images than feature "
                         "dimensions (the covariance is rank-deficient); it says nothing about the model.")
        bad = {k: v for k, v in r.get("unreadable", {}).items() if v}
        if bad:
            notes.append(f"- {name}: unreadable images skipped (metrics exclude them): "
                         + ", ".join(f"{k} {v}" for k, v in bad.items()) + " (paths in log.jsonl).")
    if notes:
        parts += ["## Warnings", ""] + list(dict.fromkeys(notes)) + [""]
    if extra:
        parts += [extra, ""]
    parts += ["## Config", "", "```json", json.dumps(config, indent=2, default=str), "```", ""]
    return "\n".join(parts)


def reliability_plot(predictions: dict, title: str, path, n_bins: int = 15) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(predictions)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        logits, labels = predictions[name]
        count, conf, acc = (t.numpy() for t in metrics.reliability(logits, labels, n_bins))
        centres = (torch_arange(n_bins).numpy() + 0.5) / n_bins
        mask = count > 0
        ax.bar(centres[mask], acc[mask], width=1.0 / n_bins, edgecolor="black", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.scatter(conf[mask], acc[mask], s=8, color="red", zorder=3, label="(conf, acc)")
        ax.set_title(f"{name}  ECE={metrics.ece(logits, labels, n_bins):.3f}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
    axes[0][0].set_ylabel("accuracy")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def torch_arange(n):
    import torch
    return torch.arange(n, dtype=torch.float64)


def comparison_plot(methods: dict, path) -> None:
    """Accuracy and ECE of each method side by side (ID and OOD average)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    names = list(methods)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    x = np.arange(len(names))
    for ax, metric in zip(axes, ("acc", "ece")):
        idv = [(methods[n].get("id") or {}).get(metric, np.nan) for n in names]
        ood = [methods[n].get("ood", {}).get("avg", {}).get(metric, np.nan) for n in names]
        ax.bar(x - 0.2, idv, 0.4, label="ID")
        ax.bar(x + 0.2, ood, 0.4, label="OOD avg")
        ax.set_xticks(x, names, rotation=20)
        ax.set_title(metric)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_all(out, methods: dict, config: dict, extra_markdown: str = "") -> dict:
    """Write results.json, report.md, reliability_<method>.png and (several methods) comparison.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    publishable = {n: {k: v for k, v in r.items() if not k.startswith("_")} for n, r in methods.items()}
    doc = results_json(publishable, config)
    atomic_write_text(out / "results.json", json.dumps(doc, indent=2, default=str))
    atomic_write_text(out / "report.md", markdown(publishable, config, extra_markdown))
    for name, r in methods.items():
        if "_predictions" in r:
            reliability_plot(r["_predictions"], f"reliability: {name}", out / f"reliability_{name}.png")
    if len(methods) > 1:
        comparison_plot(publishable, out / "comparison.png")
    return doc
