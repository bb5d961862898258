"""The embedded distribution-shift benchmark, built from scikit-learn's digits (shipped with the
library, so nothing is downloaded).

- ID: clean digits, a seeded train/test split, rendered at 32x32 RGB.
- OOD: the ID test images under five kinds of shift (rotation, noise, colour inversion, blur,
  edge-only "sketch"), each fixed by the seed.
- A "pretrained" zero-shot model: the tiny architecture trained contrastively by the project's own
  loss on a broad mix of styles (all of those shifts plus random colours) with captions written
  from the OpenAI templates that fit each style, some captions naming the wrong digit (web-like
  noise), so that fine-tuning starts from real but imperfect zero-shot ability."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("calrft.digits")
CLASSNAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
OOD_SHIFTS = ("rotate", "noise", "invert", "blur", "sketch")
SIZE = 32
MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
# Captions for each pretraining style, drawn from the OpenAI ImageNet templates that describe it.
STYLE_TEMPLATES = {
    "clean": ("a photo of a {}.", "a good photo of the {}.", "a close-up photo of a {}.",
              "itap of a {}.", "a photo of the {}.", "a cropped photo of a {}."),
    "rotate": ("a photo of the weird {}.", "a rendition of a {}.", "a photo of a weird {}.",
               "a bad photo of a {}."),
    "noise": ("a jpeg corrupted photo of a {}.", "a pixelated photo of the {}.",
              "a photo of a dirty {}.", "a bad photo of the {}."),
    "invert": ("a dark photo of a {}.", "a black and white photo of the {}.",
               "a dark photo of the {}."),
    "blur": ("a blurry photo of a {}.", "a low resolution photo of the {}.",
             "a photo of the hard to see {}."),
    "sketch": ("a sketch of a {}.", "a drawing of the {}.", "a doodle of a {}.", "art of a {}."),
    "colour": ("a painting of a {}.", "a bright photo of a {}.", "graffiti of the {}.",
               "a cartoon {}.", "a rendering of a {}."),
}
PRETRAIN_VERSION = 2


def load_gray():
    """Digits as [N, 1, 32, 32] floats in [0, 1] and labels [N]."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.tensor(d.target, dtype=torch.long)


def split(n: int, seed: int, test_fraction: float = 0.4):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(n * test_fraction))
    return perm[n_test:], perm[:n_test]


# ---- shifts on gray [N, 1, H, W] in [0, 1] (rgb for colour) ----

def rotate(x, degrees, g):
    n = x.shape[0]
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    lo, hi = degrees
    theta = sign * (lo + (hi - lo) * torch.rand(n, generator=g)) * math.pi / 180
    cos, sin = torch.cos(theta), torch.sin(theta)
    zero = torch.zeros_like(cos)
    mat = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(mat, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def add_noise(x, std, g):
    return (x + std * torch.randn(x.shape, generator=g)).clamp(0, 1)


def invert(x):
    return 1.0 - x


def blur(x, sigma):
    radius = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))


def sketch(x):
    """Edge magnitude (Sobel), rescaled per image: outlines only."""
    sx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]).view(1, 1, 3, 3)
    gx = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), sx)
    gy = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), sx.transpose(2, 3))
    mag = (gx ** 2 + gy ** 2).sqrt()
    return mag / mag.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)


def colourise(x, g):
    """Random foreground and background colours."""
    n = x.shape[0]
    fg, bg = torch.rand(n, 3, 1, 1, generator=g), torch.rand(n, 3, 1, 1, generator=g)
    return x * fg + (1 - x) * bg


def apply_shift(x, name: str, g, strength: float = 1.0):
    """One named shift; `strength` scales its parameters (pretraining draws a range)."""
    if name == "clean":
        return x
    if name == "rotate":
        return rotate(x, (25 * strength, 45 * strength), g)
    if name == "noise":
        return add_noise(x, 0.35 * strength, g)
    if name == "invert":
        return invert(x)
    if name == "blur":
        return blur(x, 1.6 * strength)
    if name == "sketch":
        return sketch(x)
    if name == "colour":
        return x  # colour is applied on the RGB image, see to_model_input
    raise ValueError(f"shift: unknown {name!r}")


def to_model_input(gray, colour=False, g=None):
    rgb = colourise(gray, g) if colour else gray.expand(-1, 3, -1, -1)
    return ((rgb - MEAN) / STD).contiguous()


def build_benchmark(seed: int = 0):
    """{"classnames", "train": (images, labels), "test": {"id": (...), "<shift>": (...)}}."""
    gray, labels = load_gray()
    train_idx, test_idx = split(len(labels), seed)
    test_gray, test_labels = gray[test_idx], labels[test_idx]
    sets = {"id": (to_model_input(test_gray), test_labels)}
    for k, name in enumerate(OOD_SHIFTS):
        g = torch.Generator().manual_seed(seed * 1000 + 17 + k)
        sets[name] = (to_model_input(apply_shift(test_gray, name, g)), test_labels)
    return {"classnames": list(CLASSNAMES), "train": (to_model_input(gray[train_idx]), labels[train_idx]),
            "train_gray": (gray[train_idx], labels[train_idx]), "test": sets}


# ---- pretraining the zero-shot model ----

PRETRAIN_DEFAULTS = dict(steps=800, batch_size=128, lr=2e-3, weight_decay=0.1, warmup=50,
                         caption_noise=0.3, clean_fraction=0.3)
# Per family: the sigmoid family (SigLIP's initialisation, scale 10 and bias -10) pretrained at the
# softmax family's lr 2e-3 to 31% zero-shot ID accuracy; of the rates tried (docs/trainer.md),
# 5e-4 gave the best zero-shot model (74%), judged on zero-shot numbers only.
FAMILY_PRETRAIN = {"softmax": {}, "sigmoid": {"lr": 5e-4}}


class CaptionTable:
    """Every pretraining caption (style template x class) tokenised once; batches index into it."""

    def __init__(self, tokenizer):
        self.offsets, captions = {}, []
        for style, templates in STYLE_TEMPLATES.items():
            self.offsets[style] = len(captions)
            captions += [t.format(c) for t in templates for c in CLASSNAMES]
        self.captions = captions
        self.tokens = tokenizer(captions)

    def index(self, style, template, label):
        return self.offsets[style] + template * len(CLASSNAMES) + label


def pretrain_batch(gray, labels, table, batch_size, caption_noise, clean_fraction, g):
    """A batch of (model input, caption tokens) from a broad mix of styles; a `caption_noise`
    fraction of captions names a random digit."""
    idx = torch.randint(len(labels), (batch_size,), generator=g)
    styles = list(STYLE_TEMPLATES)
    rest = (1 - clean_fraction) / (len(styles) - 1)
    weights = torch.tensor([clean_fraction] + [rest] * (len(styles) - 1))
    style_of = torch.multinomial(weights, batch_size, replacement=True, generator=g)
    caption_label = labels[idx].clone()
    noisy = torch.rand(batch_size, generator=g) < caption_noise
    caption_label[noisy] = torch.randint(len(CLASSNAMES), (int(noisy.sum()),), generator=g)
    template_draw = torch.rand(batch_size, generator=g)
    images = torch.empty(batch_size, 3, SIZE, SIZE)
    rows_caption = torch.empty(batch_size, dtype=torch.long)
    for s, style in enumerate(styles):
        rows = (style_of == s).nonzero().flatten()
        if len(rows) == 0:
            continue
        strength = 0.5 + torch.rand(1, generator=g).item()  # a range around the OOD strength
        x = apply_shift(gray[idx[rows]], style, g, strength)
        images[rows] = to_model_input(x, colour=(style == "colour"), g=g)
        n_templates = len(STYLE_TEMPLATES[style])
        template = (template_draw[rows] * n_templates).long().clamp_max(n_templates - 1)
        rows_caption[rows] = table.offsets[style] + template * len(CLASSNAMES) + caption_label[rows]
    return images, table.tokens[rows_caption]


def cache_dir(explicit=None) -> Path:
    base = explicit or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                    "calrft")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def pretrain_model(family: str = "softmax") -> str:
    """The tiny architecture pretrained for a loss family: calrft-tiny for the softmax family,
    calrft-tiny-sigmoid (with a logit bias) for the sigmoid family."""
    from .models import TINY, TINY_SIGMOID
    if family not in ("softmax", "sigmoid"):
        raise ValueError(f"loss: expected softmax or sigmoid, got {family!r}")
    return TINY if family == "softmax" else TINY_SIGMOID


def pretrained_path(seed: int, cache=None, family: str = "softmax", **overrides) -> Path:
    """The cache file of a pretraining; its key holds the settings and the architecture (which
    differs between the families: the sigmoid family's has the logit bias)."""
    from .models import tiny_config
    architecture = tiny_config(pretrain_model(family))  # checks the family
    cfg = {**PRETRAIN_DEFAULTS, **FAMILY_PRETRAIN[family], **overrides, "seed": seed,
           "version": PRETRAIN_VERSION, "architecture": architecture}
    key = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir(cache) / f"digits-pretrained-s{seed}-{key}.pt"


def pretrain(seed: int = 0, cache=None, progress=True, family: str = "softmax",
             **overrides) -> Path:
    """Train (or reuse from the cache) the zero-shot model with the `family`'s loss
    (contrastive_loss, or sigmoid_loss with the model's logit bias); returns an
    open_clip-loadable file."""
    from . import checkpoint, models
    from .ops import contrastive_loss, sigmoid_loss
    from .step import Features
    from .train import cosine_lr
    path = pretrained_path(seed, cache, family, **overrides)
    if path.exists():
        return path
    cfg = {**PRETRAIN_DEFAULTS, **FAMILY_PRETRAIN[family], **overrides}
    torch.manual_seed(seed)
    model, _, _, tokenizer = models.create(pretrain_model(family))
    bench = build_benchmark(seed)
    gray, labels = bench["train_gray"]
    table = CaptionTable(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    g = torch.Generator().manual_seed(seed + 12345)
    bar = _bar(cfg["steps"], "pretrain", progress)
    start = time.time()
    for step in range(cfg["steps"]):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg["steps"], cfg["lr"], cfg["warmup"])
        images, tokens = pretrain_batch(gray, labels, table, cfg["batch_size"], cfg["caption_noise"],
                                        cfg["clean_fraction"], g)
        f = Features.of(model(images, tokens))
        if family == "sigmoid":
            loss = sigmoid_loss(f.image, f.text, f.scale, f.bias)
        else:
            loss = contrastive_loss(f.image, f.text, f.scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(loss=f"{loss.item():.3f}")
    bar.close()
    state = {k: v.detach().half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    checkpoint.atomic_save({"state_dict": state, "config": {**cfg, "seed": seed, "loss": family},
                            "seconds": time.time() - start}, path)
    log.info("pretrained zero-shot model cached at %s (%.0f s)", path, time.time() - start)
    return path


def _bar(total, desc, enabled):
    from .progress import Progress
    return Progress(total, desc, enabled=enabled, every=max(1, total // 20))
