"""WiSE-FT: interpolate the weights of the zero-shot and fine-tuned models, evaluate each mix."""
from __future__ import annotations

import torch


def check_compatible(zeroshot: dict, finetuned: dict) -> None:
    """ValueError unless the two state dicts hold the same keys with the same shapes."""
    missing = sorted(set(zeroshot) - set(finetuned))
    extra = sorted(set(finetuned) - set(zeroshot))
    shapes = sorted(k for k in set(zeroshot) & set(finetuned)
                    if tuple(zeroshot[k].shape) != tuple(finetuned[k].shape))
    if missing or extra or shapes:
        parts = [f"{label} {names[:3]}{' ...' if len(names) > 3 else ''}"
                 for label, names in (("missing", missing), ("unexpected", extra), ("other shapes for", shapes))
                 if names]
        raise ValueError("finetuned: its weights do not fit the zero-shot model (" + "; ".join(parts) +
                         "): use a checkpoint of the same --model")


def interpolate(zeroshot: dict, finetuned: dict, alpha: float) -> dict:
    """theta(alpha) = (1 - alpha) * theta_zeroshot + alpha * theta_finetuned (floating entries)."""
    check_compatible(zeroshot, finetuned)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: must lie in [0, 1], got {alpha}")
    mixed = {}
    for k, z in zeroshot.items():
        f = finetuned[k]
        if z.is_floating_point():
            mixed[k] = ((1 - alpha) * z.double() + alpha * f.double()).to(z.dtype)
        else:
            mixed[k] = f.clone()
    return mixed


def sweep(model, zeroshot: dict, finetuned: dict, alphas, evaluate_fn) -> list[dict]:
    """Load each mix into `model` and evaluate it: [{"alpha", **evaluation}]."""
    results = []
    for alpha in alphas:
        model.load_state_dict(interpolate(zeroshot, finetuned, float(alpha)))
        results.append({"alpha": float(alpha), **evaluate_fn(model)})
    return results


def plot(sweeps: dict, path) -> None:
    """ID vs OOD-average accuracy (left) and ECE (right) along each sweep, alpha annotated."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for name, rows in sweeps.items():
        for ax, metric in zip(axes, ("acc", "ece")):
            x = [r["id"][metric] for r in rows]
            y = [r["ood"]["avg"][metric] for r in rows]
            ax.plot(x, y, "o-", label=name)
            for r, xi, yi in zip(rows, x, y):
                ax.annotate(f"{r['alpha']:.2g}", (xi, yi), fontsize=7)
    for ax, metric in zip(axes, ("acc", "ece")):
        ax.set_xlabel(f"ID {metric}")
        ax.set_ylabel(f"OOD avg {metric}")
        ax.legend(fontsize=8)
    fig.suptitle("WiSE-FT sweep (alpha = weight of the fine-tuned model)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(sweeps: dict) -> str:
    lines = ["| model | alpha | ID acc | ID ECE | OOD avg acc | OOD avg ECE |", "|---|---|---|---|---|---|"]
    for name, rows in sweeps.items():
        for r in rows:
            lines.append(f"| {name} | {r['alpha']:.2f} | {r['id']['acc']:.4f} | {r['id']['ece']:.4f} | "
                         f"{r['ood']['avg']['acc']:.4f} | {r['ood']['avg']['ece']:.4f} |")
    return "\n".join(lines)


@torch.no_grad()
def state_of(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
