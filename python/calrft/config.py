"""Run configuration: paper defaults, overridden by a YAML/JSON file, overridden by flags."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    # model
    model: str = "ViT-B-16"
    pretrained: str | None = "openai"
    cache_dir: str | None = None
    # objective (defaults: the official CaRot code, see objective.md)
    method: str = "carot"                  # carot | flyp | ft
    distill_weight: float = 1.5
    orth_weight: float = 0.2
    cross_weight: float = 0.05
    sigma_min_weight: float = 0.0          # the direct regulariser (off in the paper)
    supervised_targets: bool = False       # same-label soft targets instead of the diagonal
    ema_start: float = 0.05
    ema_end: float = 0.9
    ema_warmup: float = 0.2                # fraction of all steps over which m rises
    ema_every: int = 500
    # data
    train_csv: str | None = None
    csv_image_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_label_key: str | None = None
    train_folder: str | None = None
    classnames: str | None = None          # file, one class name a line (CSV training)
    templates: str = "openai"              # openai | short | simple
    id_eval: str | None = None
    ood_eval: list = field(default_factory=list)   # folders, optionally "name=folder"
    workers: int = 4
    # optimisation
    batch_size: int = 512                  # global batch (split over ranks)
    epochs: int = 10
    steps: int | None = None               # overrides epochs when set
    lr: float = 1e-5
    weight_decay: float = 0.1
    warmup: int = 500
    grad_clip: float | None = None
    precision: str = "bf16"                # autocast dtype on GPU; CPU runs fp32
    seed: int = 0
    device: str | None = None
    # bookkeeping
    out: str = "runs/calrft"
    eval_every: int = 0                    # steps; 0 = after each epoch
    eval_batch_size: int = 256
    log_every: int = 10
    save_every: int = 0                    # steps; 0 = after each epoch (and always at the end)
    resume: str | None = None
    stop_after: int | None = None          # stop (with a checkpoint) after this many steps
    progress: bool = True

    def validate(self) -> "TrainConfig":
        if self.method not in ("carot", "flyp", "ft"):
            raise ValueError(f"method: expected carot, flyp or ft, got {self.method!r}")
        if self.batch_size < 1:
            raise ValueError("batch_size: must be >= 1")
        if self.lr <= 0:
            raise ValueError("lr: must be > 0")
        if self.steps is not None and self.steps < 1:
            raise ValueError("steps: must be >= 1")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_file(path: str) -> dict:
    """A YAML (.yaml/.yml) or JSON config file as a dict."""
    if not os.path.isfile(path):
        raise ValueError(f"config: no such file {path!r}")
    with open(path) as f:
        if path.endswith((".yaml", ".yml")):
            import yaml
            values = yaml.safe_load(f) or {}
        else:
            values = json.load(f)
    if not isinstance(values, dict):
        raise ValueError(f"config: {path!r} must hold a mapping")
    return values


def merge(cls, file_values: dict, flag_values: dict):
    """Defaults < config file < flags that were given (flag values of None mean 'not given')."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(file_values) - names
    if unknown:
        raise ValueError(f"config: unknown keys {sorted(unknown)}")
    values = dict(file_values)
    values.update({k: v for k, v in flag_values.items() if v is not None and k in names})
    return cls(**values)
