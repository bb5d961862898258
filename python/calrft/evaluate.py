"""Evaluation: zero-shot heads, per-set metrics, and the Figure 6 quantity (sigma_min of the
covariance of standardised ID image features over the whole ID set)."""
from __future__ import annotations

import contextlib

import torch

from . import data as data_mod
from . import dist, metrics
from .models import unwrap
from .ops import CovarianceAccumulator


def autocast(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def zeroshot_head(model, tokenizer, classnames, templates, device="cpu") -> torch.Tensor:
    """[C, d]: per class, the mean of the L2-normalised text embeddings of every template, then
    renormalised (CLIP's prompt ensembling). Multiply by exp(logit_scale) for logits."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    rows = []
    for name in classnames:
        tokens = tokenizer([t.format(name) for t in templates]).to(device)
        with autocast(device):
            emb = model.encode_text(tokens, normalize=True).float()
        mean = emb.mean(0)
        rows.append(mean / mean.norm())
    model.train(was_training)
    return torch.stack(rows)


class ZeroShotClassifier:
    """logits = exp(logit_scale) * f @ head^T, the head built with the model's text encoder."""

    def __init__(self, model, tokenizer, classnames, templates, device="cpu"):
        self.head = zeroshot_head(model, tokenizer, classnames, templates, device)
        self.scale = unwrap(model).logit_scale.detach().exp().float()

    def __call__(self, features):
        return self.scale * features.float() @ self.head.T


def standardised_sigma_min(acc) -> float:
    """Smallest eigenvalue of the covariance of standardised features = of the correlation matrix
    built from the accumulated covariance (float64)."""
    cov = acc.covariance().to(torch.float64)
    std = cov.diagonal().clamp_min(1e-12).sqrt()
    corr = cov / (std[:, None] * std[None, :])
    return torch.linalg.eigvalsh(corr)[0].item()


@torch.no_grad()
def predict(model, classifier, loader, device="cpu", accumulator=None):
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
        with autocast(device):
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
    if class_indices is None:
        return logits, labels
    index = torch.tensor(class_indices)
    position = torch.full((logits.shape[1],), -1, dtype=torch.long)
    position[index] = torch.arange(len(index))
    return logits[:, index], position[labels]


def evaluate(model, classifier, eval_sets, device="cpu", batch_size=256, workers=2, n_bins=15,
             feature_dim=None):
    """{"id": {...}, "ood": {name: {...}, "avg": {...}}, "sigma_min": float} plus raw predictions
    under "_predictions" (for plots). The first set is ID; the rest are OOD. Each rank evaluates a
    shard; predictions and covariance states are gathered so every rank returns the same numbers."""
    rank, world = dist.rank(), dist.world_size()
    out = {"ood": {}, "_predictions": {}, "skipped": []}
    for k, es in enumerate(eval_sets):
        shard = list(range(rank, len(es.dataset), world))
        loader = data_mod.eval_loader(es.dataset, batch_size, workers, indices=shard)
        acc = None
        if k == 0:
            dim = feature_dim or unwrap(model).visual.output_dim
            acc = CovarianceAccumulator(dim, dtype=torch.float64, device=device)
        logits, labels, skipped = predict(model, classifier, loader, device, acc)
        logits, labels = dist.gather_rows(logits), dist.gather_rows(labels)
        out["skipped"] += [s.path for s in skipped]
        logits, labels = restrict(logits, labels, es.class_indices)
        result = metrics.all_metrics(logits, labels, n_bins)
        out["_predictions"][es.name] = (logits, labels)
        if k == 0:
            out["id"] = result
            out["sigma_min"] = standardised_sigma_min(dist.merge_accumulators(acc))
        else:
            out["ood"][es.name] = result
    if out["ood"]:
        out["ood"]["avg"] = metrics.average([v for n, v in out["ood"].items()])
    return out


def public(result: dict) -> dict:
    """The results.json part of an evaluation (no raw predictions)."""
    return {k: v for k, v in result.items() if not k.startswith("_")}
