"""Evaluation: zero-shot heads, per-set metrics, and the Figure 6 quantity (sigma_min of the
covariance of standardised ID image features over the whole ID set)."""
from __future__ import annotations

import logging

import torch

from . import data as data_mod
from . import dist, metrics
from .models import unwrap
from . import step as steps
from .ops import CovarianceAccumulator, smallest_eigenvalue

log = logging.getLogger("calrft.evaluate")


@torch.no_grad()
def zeroshot_head(model, tokenizer, classnames, templates, device="cpu", precision="auto") -> torch.Tensor:
    """[C, d]: per class, the mean of the L2-normalised text embeddings of every template, then
    renormalised (CLIP's prompt ensembling). Multiply by exp(logit_scale) for logits."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    rows = []
    for name in classnames:
        tokens = tokenizer([t.format(name) for t in templates]).to(device)
        with steps.autocast(device, precision):  # the training precision setting
            emb = model.encode_text(tokens, normalize=True).float()
        mean = emb.mean(0)
        rows.append(mean / mean.norm())
    model.train(was_training)
    return torch.stack(rows)


class ZeroShotClassifier:
    """logits = exp(logit_scale) * f @ head^T, the head built with the model's text encoder."""

    def __init__(self, model, tokenizer, classnames, templates, device="cpu", precision="auto"):
        self.head = zeroshot_head(model, tokenizer, classnames, templates, device, precision)
        self.scale = unwrap(model).logit_scale.detach().exp().float()

    def __call__(self, features):
        return self.scale * features.float() @ self.head.T


def standardised_sigma_min(acc) -> float:
    """Smallest eigenvalue of the covariance of standardised features = of the correlation matrix
    built from the accumulated covariance (float64), by the package's eigensolver
    (calrft_kernels.smallest_eigenvalue, its default method)."""
    cov = acc.covariance().to(torch.float64)
    std = cov.diagonal().clamp_min(1e-12).sqrt()
    corr = cov / (std[:, None] * std[None, :])
    value, _ = smallest_eigenvalue(corr, tol=1e-10)
    return value.item()


@torch.no_grad()
def predict(model, classifier, loader, device="cpu", accumulator=None, precision="auto"):
    """(logits over all ID classes, labels, skipped items) of this rank's share of a set."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    all_logits, all_labels, skipped = [], [], []
    for batch in loader:
        skipped += batch["skipped"]
        if batch["labels"].numel() == 0:
            continue
        images = batch["images"].to(device, non_blocking=True)
        with steps.autocast(device, precision):  # the training precision setting
            feats = model.encode_image(images, normalize=True).float()
        if accumulator is not None:
            accumulator.update(feats)
        all_logits.append(classifier(feats).float().cpu())
        all_labels.append(batch["labels"])
    model.train(was_training)
    if not all_logits:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long), skipped
    return torch.cat(all_logits), torch.cat(all_labels), skipped


def restrict(logits, labels, class_indices):
    """Keep the columns of the classes a set covers; labels become positions in that subset."""
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits: expected [N, C] with N = len(labels) = {labels.shape[0]}, got "
                         f"{tuple(logits.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("logits: no predictions (the evaluation set has no readable images)")
    if class_indices is None:
        return logits, labels
    index = torch.tensor(class_indices)
    position = torch.full((logits.shape[1],), -1, dtype=torch.long)
    position[index] = torch.arange(len(index))
    return logits[:, index], position[labels]


def evaluate(model, classifier, eval_sets, device="cpu", batch_size=256, workers=2, n_bins=15,
             feature_dim=None, id_first=True, precision="auto", timeout=0.0):
    """{"id": {...}, "ood": {name: {...}, "avg": {...}}, "sigma_min": float, "unreadable":
    {name: count}, "sigma_min_rank_deficient": bool} plus raw predictions under "_predictions"
    (for plots). With id_first the first set is ID and the rest are OOD; without it every set is
    OOD and "id" and "sigma_min" are None. Unreadable images are skipped, counted and warned
    about; a set with none readable raises ValueError. sigma_min of fewer ID images than feature
    dimensions is exactly 0 (the covariance has rank < dim): it is reported as 0.0 and flagged
    rank-deficient, with a warning, instead of the eigensolver's rounding noise (~1e-15). Each
    rank evaluates a shard; predictions and covariance states are gathered so every rank returns
    the same numbers. `timeout`: seconds a loader worker may take for a batch (0 = no limit)."""
    rank, world = dist.rank(), dist.world_size()
    out = {"id": None, "ood": {}, "_predictions": {}, "skipped": [], "unreadable": {},
           "sigma_min": None, "sigma_min_rank_deficient": False}
    first_ood = 1 if id_first else 0
    for k, es in enumerate(eval_sets):
        shard = list(range(rank, len(es.dataset), world))
        loader = data_mod.eval_loader(es.dataset, batch_size, workers, indices=shard, timeout=timeout)
        acc = None
        if k == 0 and id_first:
            dim = feature_dim or unwrap(model).visual.output_dim
            acc = CovarianceAccumulator(dim, dtype=torch.float64, device=device)
        logits, labels, skipped = predict(model, classifier, loader, device, acc, precision)
        logits, labels = dist.gather_rows(logits), dist.gather_rows(labels)
        skipped = dist.gather_objects([s.path for s in skipped])
        out["skipped"] += skipped
        out["unreadable"][es.name] = len(skipped)
        if skipped and dist.is_main():
            log.warning("evaluation set %r: %d of %d images unreadable and skipped (metrics over the "
                        "other %d)", es.name, len(skipped), len(es.dataset), labels.shape[0])
        if labels.shape[0] == 0:
            raise ValueError(f"{'id_eval' if k < first_ood else 'ood_eval'}: evaluation set {es.name!r} "
                             f"has no readable images ({len(skipped)} unreadable)")
        logits, labels = restrict(logits, labels, es.class_indices)
        result = metrics.all_metrics(logits, labels, n_bins)
        out["_predictions"][es.name] = (logits, labels)
        if k < first_ood:
            out["id"] = result
            acc = dist.merge_accumulators(acc)
            if acc.count <= acc.dim:
                out["sigma_min"], out["sigma_min_rank_deficient"] = 0.0, True
                if dist.is_main():
                    log.warning("sigma_min: the ID set %r has %d images for %d feature dimensions: "
                                "the covariance is rank-deficient and sigma_min is 0; use an ID set "
                                "of more than %d images for a meaningful value", es.name, acc.count,
                                acc.dim, acc.dim)
            else:
                out["sigma_min"] = standardised_sigma_min(acc)
        else:
            out["ood"][es.name] = result
    if out["ood"]:
        out["ood"]["avg"] = metrics.average([v for n, v in out["ood"].items()])
    return out


def public(result: dict) -> dict:
    """The results.json part of an evaluation (no raw predictions)."""
    return {k: v for k, v in result.items() if not k.startswith("_")}
