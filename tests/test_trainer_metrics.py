"""Metrics against hand-computed values and float64 NumPy references."""
import math

import numpy as np
import pytest
import torch

from calrft import metrics


def _np_reference(logits, labels, n_bins=15):
    x = logits.astype(np.float64)
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    n = len(labels)
    nll = -np.mean(np.log(p[np.arange(n), labels]))
    onehot = np.eye(x.shape[1])[labels]
    brier = np.mean(((p - onehot) ** 2).sum(1))
    conf, pred = p.max(1), p.argmax(1)
    ece = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs((pred[inside] == labels[inside]).mean() - conf[inside].mean())
    return {"acc": float(np.mean(pred == labels)), "ece": ece, "nll": nll, "brier": brier}


@pytest.mark.parametrize("n,c", [(1, 2), (7, 3), (131, 10), (257, 13)])
def test_metrics_match_float64_reference(n, c):
    logits = torch.randn(n, c) * 3
    labels = torch.randint(c, (n,))
    got = metrics.all_metrics(logits, labels)
    ref = _np_reference(logits.numpy(), labels.numpy())
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-9, abs=1e-12), k


def test_ece_by_hand():
    # Two classes; confidences 0.9 (correct), 0.9 (wrong), 0.6 (correct), 0.6 (correct).
    p = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1])
    logits = p.log()
    # bins (15): 0.9 -> bin 13 (0.8667, 0.9333]; 0.6 -> bin 8 (0.5333, 0.6]
    # bin 13: acc 0.5, conf 0.9 -> 0.4 * 2/4; bin 8: acc 1, conf 0.6 -> 0.4 * 2/4
    assert metrics.ece(logits, labels) == pytest.approx(0.4)
    assert metrics.accuracy(logits, labels) == pytest.approx(0.75)
    assert metrics.nll(logits, labels) == pytest.approx(-(math.log(0.9) + math.log(0.1) + 2 * math.log(0.6)) / 4)
    assert metrics.brier(logits, labels) == pytest.approx((0.02 + 1.62 + 0.32 + 0.32) / 4)


def test_ece_is_over_the_whole_set_not_per_batch():
    logits = torch.randn(300, 5) * 2
    labels = torch.randint(5, (300,))
    whole = metrics.ece(logits, labels)
    per_batch = np.mean([metrics.ece(logits[i:i + 50], labels[i:i + 50]) for i in range(0, 300, 50)])
    assert whole == pytest.approx(_np_reference(logits.numpy(), labels.numpy())["ece"])
    assert whole != pytest.approx(per_batch)


def test_confidence_exactly_on_bin_edge_goes_to_lower_bin():
    # confidence exactly 0.6 = 9/15 belongs to bin 8 = (8/15, 9/15]
    logits = torch.tensor([[math.log(0.6), math.log(0.4)]], dtype=torch.float64)
    count, _, _ = metrics.reliability(logits, torch.tensor([0]))
    assert count[8] == 1


def test_average():
    assert metrics.average([{"acc": 0.5}, {"acc": 1.0}]) == {"acc": 0.75}


@pytest.mark.parametrize("logits,labels,match", [
    (torch.randn(3), torch.zeros(3, dtype=torch.long), "logits"),
    (torch.randn(3, 2), torch.zeros(4, dtype=torch.long), "labels"),
    (torch.randn(3, 2), torch.tensor([0, 1, 2]), "labels"),
    (torch.randn(0, 2), torch.zeros(0, dtype=torch.long), "logits"),
])
def test_bad_input_names_the_argument(logits, labels, match):
    with pytest.raises(ValueError, match=match):
        metrics.all_metrics(logits, labels)
