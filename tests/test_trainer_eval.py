"""Zero-shot head, class-subset restriction, sigma_min of standardised features, evaluate()."""
import numpy as np
import pytest
import torch

from calrft import evaluate as ev
from calrft import templates
from calrft.ops import CovarianceAccumulator

from _trainer_util import CLASSES, tiny_data, tiny_model


def test_zeroshot_head_is_the_normalised_template_mean():
    model, tok = tiny_model()
    temps = templates.get("short")
    head = ev.zeroshot_head(model, tok, CLASSES, temps)
    with torch.no_grad():
        emb = model.encode_text(tok([t.format("bee") for t in temps])).double()
    emb = emb / emb.norm(dim=1, keepdim=True)
    mean = emb.mean(0)
    torch.testing.assert_close(head[1].double(), mean / mean.norm(), rtol=1e-5, atol=1e-6)
    assert head.shape == (4, 64)
    torch.testing.assert_close(head.norm(dim=1), torch.ones(4))


def test_zeroshot_classifier_multiplies_by_exp_logit_scale():
    model, tok = tiny_model()
    with torch.no_grad():
        model.logit_scale.fill_(1.5)
    clf = ev.ZeroShotClassifier(model, tok, CLASSES, ["a photo of a {}."])
    f = torch.nn.functional.normalize(torch.randn(5, 64), dim=1)
    torch.testing.assert_close(clf(f), np.exp(1.5) * f @ clf.head.T)


def test_restrict_to_subset():
    logits = torch.arange(12.0).view(3, 4)
    labels = torch.tensor([3, 1, 3])
    sub_logits, sub_labels = ev.restrict(logits, labels, [1, 3])
    assert torch.equal(sub_logits, logits[:, [1, 3]])
    assert sub_labels.tolist() == [1, 0, 1]


def test_standardised_sigma_min_matches_float64_correlation():
    z = torch.randn(200, 6, dtype=torch.float64) * torch.tensor([1.0, 5, 0.1, 2, 3, 1]) + 7
    z[:, 5] = z[:, 0] * 0.9 + 0.1 * z[:, 5]  # a nearly collinear pair: small sigma_min
    acc = CovarianceAccumulator(6)
    for chunk in z.split(37):
        acc.update(chunk)
    expected = np.linalg.eigvalsh(np.corrcoef(z.numpy(), rowvar=False))[0]
    assert ev.standardised_sigma_min(acc) == pytest.approx(expected, rel=1e-8)


def test_evaluate_schema_and_subset_metrics():
    model, tok = tiny_model()
    _, eval_sets = tiny_data()
    clf = ev.ZeroShotClassifier(model, tok, CLASSES, ["a photo of a {}."])
    result = ev.evaluate(model, clf, eval_sets, workers=0, batch_size=7)
    assert set(result["id"]) == {"acc", "ece", "nll", "brier"}
    assert set(result["ood"]) == {"shifted", "avg"}
    # 20 ID samples of 64-d features: the covariance is singular, so sigma_min is 0
    assert result["sigma_min"] == pytest.approx(0.0, abs=1e-8)
    logits, labels = result["_predictions"]["shifted"]
    assert logits.shape == (10, 2) and set(labels.tolist()) <= {0, 1}
    # the subset set's NLL uses a softmax over its 2 classes only
    with torch.no_grad():
        full = clf(model.encode_image(eval_sets[1].dataset.images, normalize=True))
    expected = torch.nn.functional.cross_entropy(full[:, [2, 3]].double(), eval_sets[1].dataset.labels - 2)
    assert result["ood"]["shifted"]["nll"] == pytest.approx(expected.item(), rel=1e-5)


# ---- issue 15: ID labelling, unreadable images, rank-deficient sigma_min ----

def test_without_an_id_set_every_set_is_ood():
    model, tok = tiny_model()
    _, eval_sets = tiny_data()
    clf = ev.ZeroShotClassifier(model, tok, CLASSES, ["a photo of a {}."])
    with_id = ev.evaluate(model, clf, eval_sets, workers=0)
    only_ood = ev.evaluate(model, clf, eval_sets, workers=0, id_first=False)
    assert only_ood["id"] is None and only_ood["sigma_min"] is None
    assert set(only_ood["ood"]) == {"id", "shifted", "avg"}
    assert only_ood["ood"]["id"] == pytest.approx(with_id["id"])  # same numbers, right label
    assert only_ood["ood"]["avg"]["acc"] == pytest.approx(
        (with_id["id"]["acc"] + with_id["ood"]["shifted"]["acc"]) / 2)


class _WithUnreadable(torch.utils.data.Dataset):
    """A TensorEval whose items listed in `bad` cannot be read."""

    def __init__(self, base, bad):
        self.base, self.bad = base, set(bad)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        from calrft.data import Skipped
        return Skipped(f"img{i}.png", "OSError: truncated") if i in self.bad else self.base[i]


def test_unreadable_images_are_counted_and_warned(caplog):
    from calrft.data import EvalSet
    model, tok = tiny_model()
    _, eval_sets = tiny_data()
    clf = ev.ZeroShotClassifier(model, tok, CLASSES, ["a photo of a {}."])
    sets = [EvalSet("id", _WithUnreadable(eval_sets[0].dataset, [0, 7])), eval_sets[1]]
    with caplog.at_level("WARNING", logger="calrft"):
        result = ev.evaluate(model, clf, sets, workers=0, batch_size=6)
    assert result["unreadable"] == {"id": 2, "shifted": 0}
    assert "evaluation set 'id': 2 of 20 images unreadable and skipped (metrics over the other 18)" in caplog.text
    assert result["_predictions"]["id"][0].shape[0] == 18
    sets = [EvalSet("id", _WithUnreadable(eval_sets[0].dataset, range(20)))]
    with pytest.raises(ValueError, match="id_eval: evaluation set 'id' has no readable images \\(20 unreadable\\)"):
        ev.evaluate(model, clf, sets, workers=0)


def test_restrict_refuses_empty_predictions():
    with pytest.raises(ValueError, match="no readable images"):
        ev.restrict(torch.empty(0, 0), torch.empty(0, dtype=torch.long), [1])


def test_rank_deficient_sigma_min_is_flagged_and_exactly_zero(caplog):
    model, tok = tiny_model()
    clf = ev.ZeroShotClassifier(model, tok, CLASSES, ["a photo of a {}."])
    from calrft.data import EvalSet, TensorEval
    g = torch.Generator().manual_seed(1)
    for n, deficient in ((64, True), (150, False)):  # the tiny model's features are 64-d
        images = torch.randn(n, 3, 32, 32, generator=g)
        labels = torch.arange(n) % len(CLASSES)
        with caplog.at_level("WARNING", logger="calrft"):
            caplog.clear()
            result = ev.evaluate(model, clf, [EvalSet("id", TensorEval(images, labels))], workers=0)
        assert result["sigma_min_rank_deficient"] is deficient
        if deficient:
            assert result["sigma_min"] == 0.0 and "64 images for 64 feature dimensions" in caplog.text
        else:
            assert result["sigma_min"] > 1e-8 and "rank-deficient" not in caplog.text
