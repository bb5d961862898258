"""Classification and calibration metrics, computed in float64 over a whole evaluation set.

All functions take logits [N, C] and integer labels [N]. ECE is binned over the whole set (the
official CaRot code averaged per-batch ECEs, which is biased)."""
from __future__ import annotations

import torch
from torch import Tensor


def _check(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    if logits.ndim != 2:
        raise ValueError(f"logits: expected [N, C], got shape {tuple(logits.shape)}")
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels: expected [{logits.shape[0]}], got shape {tuple(labels.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("logits: empty evaluation set")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError("labels: values must lie in [0, C)")
    return logits.detach().to(torch.float64).cpu(), labels.detach().long().cpu()


def accuracy(logits: Tensor, labels: Tensor) -> float:
    logits, labels = _check(logits, labels)
    return (logits.argmax(1) == labels).double().mean().item()


def nll(logits: Tensor, labels: Tensor) -> float:
    logits, labels = _check(logits, labels)
    return torch.nn.functional.cross_entropy(logits, labels).item()


def brier(logits: Tensor, labels: Tensor) -> float:
    """Mean over samples of sum_k (p_k - y_k)^2 (the multi-class Brier score, range [0, 2])."""
    logits, labels = _check(logits, labels)
    p = logits.softmax(1)
    onehot = torch.nn.functional.one_hot(labels, logits.shape[1]).double()
    return (p - onehot).pow(2).sum(1).mean().item()


def reliability(logits: Tensor, labels: Tensor, n_bins: int = 15):
    """Per equal-width confidence bin over (0, 1]: (count, mean confidence, accuracy)."""
    logits, labels = _check(logits, labels)
    if n_bins < 1:
        raise ValueError("n_bins: must be >= 1")
    conf, pred = logits.softmax(1).max(1)
    correct = (pred == labels).double()
    # bin b holds confidences in (b/n, (b+1)/n]; confidence is always > 0.
    bins = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    count = torch.bincount(bins, minlength=n_bins).double()
    conf_sum = torch.bincount(bins, weights=conf, minlength=n_bins)
    acc_sum = torch.bincount(bins, weights=correct, minlength=n_bins)
    safe = count.clamp_min(1)
    return count, conf_sum / safe, acc_sum / safe


def ece(logits: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error: sum_b |B_b|/N * |acc(B_b) - conf(B_b)|."""
    count, conf, acc = reliability(logits, labels, n_bins)
    return ((count / count.sum()) * (acc - conf).abs()).sum().item()


def all_metrics(logits: Tensor, labels: Tensor, n_bins: int = 15) -> dict:
    return {"acc": accuracy(logits, labels), "ece": ece(logits, labels, n_bins),
            "nll": nll(logits, labels), "brier": brier(logits, labels)}


def average(results: list[dict]) -> dict:
    """Mean of each metric over several datasets (the OOD average)."""
    if not results:
        return {}
    return {k: sum(r[k] for r in results) / len(results) for k in results[0]}
