"""Shared helpers for the trainer tests: a tiny in-memory captioned dataset and configs."""
import torch

from calrft import data, models
from calrft.config import TrainConfig

CLASSES = ["ant", "bee", "cat", "dog"]


def tiny_model(seed=0, name=models.TINY):
    """calrft-tiny, or calrft-tiny-sigmoid (name=models.TINY_SIGMOID: with a logit bias)."""
    torch.manual_seed(seed)
    model, _, _, tok = models.create(name)
    return model, tok


def tiny_data(n=32, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(CLASSES)
    images = (torch.randn(n, 3, 32, 32, generator=g) + labels.view(-1, 1, 1, 1).float()).to(dtype)
    train = data.TensorCaptions(images, labels, CLASSES, "short", seed=seed)
    ev_images = torch.randn(20, 3, 32, 32, generator=g).to(dtype)
    ev_labels = torch.arange(20) % len(CLASSES)
    sub = ev_labels[ev_labels >= 2]
    eval_sets = [data.EvalSet("id", data.TensorEval(ev_images, ev_labels)),
                 data.EvalSet("shifted", data.TensorEval(ev_images[ev_labels >= 2] * 2, sub), [2, 3])]
    return train, eval_sets


def tiny_config(tmp_path, **kw):
    base = dict(model=models.TINY, pretrained=None, method="carot", batch_size=8, steps=6, lr=1e-4,
                warmup=2, ema_every=2, templates="short", workers=0, seed=0, device="cpu",
                out=str(tmp_path), eval_every=10**6, save_every=10**6, log_every=1, progress=False)
    base.update(kw)
    return TrainConfig(**base)
