"""Run configuration: paper defaults, overridden by a YAML/JSON file, overridden by flags."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    # model
    model: str = "ViT-B-16"
    pretrained: str | None = "openai"
    cache_dir: str | None = None
    # objective (defaults: the official CaRot code, see objective.md)
    method: str = "carot"                  # carot | flyp | ft
    loss: str = "auto"                     # softmax | sigmoid | auto (sigmoid iff a logit bias)
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
    train_data: str | None = None          # WebDataset tar shards, e.g. "shards/{00000..00099}.tar"
    train_num_samples: int | None = None   # samples per epoch of a --train-data stream
    classnames: str | None = None          # file, one class name a line (CSV training)
    templates: str = "openai"              # openai | short | simple | a file of templates
    id_eval: str | None = None
    ood_eval: list = field(default_factory=list)   # folders, optionally "name=folder"
    workers: int = 4
    data_timeout: float = 600.0            # s a loader worker may take for a batch; 0 = no limit
    max_unreadable: float = 0.5            # stop when more of the last window is unreadable
    unreadable_window: int = 1000          # samples (per rank) over which max_unreadable is taken
    # optimisation
    batch_size: int = 512                  # global batch (split over ranks)
    epochs: int = 10
    steps: int | None = None               # overrides epochs when set
    lr: float = 1e-5
    weight_decay: float = 0.1
    warmup: int = 500
    grad_clip: float | None = None
    precision: str = "auto"                # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    micro_batch_size: int | None = None    # per rank; feature caching below the batch (step.py)
    grad_checkpointing: bool = False       # activation checkpointing in the towers
    seed: int = 0
    device: str | None = None
    # bookkeeping
    out: str = "runs/train"                # each subcommand has its own default (rundir.DEFAULT_OUT)
    eval_every: int = 0                    # steps; 0 = after each epoch
    eval_batch_size: int = 256
    log_every: int = 10
    save_every: int = 0                    # steps; 0 = after each epoch (and always at the end)
    resume: str | None = None
    overwrite: bool = False                # replace a previous run's outputs in `out`
    stop_after: int | None = None          # stop (with a checkpoint) after this many steps
    progress: bool = True

    def validate(self) -> "TrainConfig":
        """Check every setting (types, ranges, the device) before any work starts; ValueError
        naming the setting. Numeric strings (YAML reads `1e-4` as a string) become numbers."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce(f, getattr(self, f.name)))
        if self.method not in ("carot", "flyp", "ft"):
            raise ValueError(f"method: expected carot, flyp or ft, got {self.method!r}")
        from .step import LOSSES
        if self.loss not in LOSSES:
            raise ValueError(f"loss: expected one of {', '.join(LOSSES)}, got {self.loss!r}")
        _at_least(self, 1, "micro_batch_size", "train_num_samples")
        from .step import PRECISIONS
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        given = [k for k in ("train_csv", "train_folder", "train_data") if getattr(self, k)]
        if len(given) > 1:
            raise ValueError(f"{given[1]}: give one training source, got {' and '.join(given)}")
        if self.train_data and not (self.train_num_samples or self.steps):
            raise ValueError("train_num_samples: a --train-data stream has no length; give "
                             "--train-num-samples (samples per epoch) or --steps")
        _at_least(self, 1, "batch_size", "epochs", "steps", "ema_every", "eval_batch_size", "log_every",
                  "stop_after", "unreadable_window")
        _at_least(self, 0, "workers", "data_timeout", "warmup", "eval_every", "save_every", "seed",
                  "weight_decay", "distill_weight", "orth_weight", "cross_weight", "sigma_min_weight")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr: must be a finite number > 0, got {self.lr}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip: must be > 0 (or unset), got {self.grad_clip}")
        if not math.isfinite(self.data_timeout):
            raise ValueError(f"data_timeout: must be a finite number of seconds (0 = no limit), "
                             f"got {self.data_timeout}")
        for name in ("ema_start", "ema_end", "ema_warmup", "max_unreadable"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: must lie in [0, 1], got {getattr(self, name)}")
        from . import templates as templates_mod
        templates_mod.get(self.templates)
        for spec in self.ood_eval:
            if not spec or spec.endswith("="):
                raise ValueError(f"ood_eval: {spec!r} names no folder (use PATH or NAME=PATH)")
        if not self.out:
            raise ValueError("out: must name a folder")
        if self.resume and self.overwrite:
            raise ValueError("overwrite: --overwrite and --resume exclude each other (resuming "
                             "continues the run in --out)")
        self.device = check_device(self.device)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _at_least(cfg, low, *names):
    for name in names:
        value = getattr(cfg, name)
        if value is not None and not value >= low:
            raise ValueError(f"{name}: must be >= {low}, got {value}")


def check_device(device):
    """None (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N" of an existing GPU."""
    if device is None or device == "cpu":
        return device
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if not m:
        raise ValueError(f"device: expected cpu, cuda or cuda:N, got {device!r}")
    import torch
    if not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but no CUDA GPU is available")
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        raise ValueError(f"device: {device!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
    return device


def field_kind(f) -> tuple[type, bool]:
    """(bool | int | float | str | list, whether None is allowed) from a field's annotation."""
    hint = str(f.type)
    for name, typ in (("bool", bool), ("int", int), ("float", float), ("str", str), ("list", list)):
        if hint.startswith(name):
            return typ, "None" in hint
    raise TypeError(f"unsupported config field type {hint}")


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def coerce(f, value):
    """`value` as field `f`'s type: numeric strings for numbers ("1e-4": YAML 1.1 reads it as a
    string), "true"/"false" for booleans, one string for a list; ValueError naming the field
    otherwise."""
    typ, optional = field_kind(f)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{f.name}: must be set (got null)")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
    elif typ in (int, float):
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ValueError(f"{f.name}: expected a number, got {value!r}") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if typ is float:
                return float(value)
            if float(value).is_integer():
                return int(value)
            raise ValueError(f"{f.name}: expected an integer, got {value!r}")
    elif typ is str:
        if isinstance(value, str):
            return value
    elif typ is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ValueError(f"{f.name}: expected a list of strings, got {value!r}")
    raise ValueError(f"{f.name}: expected {typ.__name__}, got {type(value).__name__} {value!r}")


def read_file(path: str) -> dict:
    """A YAML (.yaml/.yml), JSON (.json) or TOML (.toml) config file as a dict; ValueError naming
    the file (and the line, where the parser gives one) for anything unreadable."""
    if not os.path.isfile(path):
        raise ValueError(f"config: no such file {path!r}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".yaml", ".yml", ".json", ".toml"):
        raise ValueError(f"config: {path!r}: unknown format {suffix or '(no extension)'!r}; "
                         "use .yaml, .yml, .json or .toml")
    try:
        if suffix in (".yaml", ".yml"):
            import yaml
            with open(path) as f:
                values = yaml.safe_load(f)
            values = {} if values is None else values
        elif suffix == ".json":
            with open(path) as f:
                values = json.load(f)
        else:
            import tomllib
            with open(path, "rb") as f:
                values = tomllib.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"config: {path!r} is not valid JSON (line {exc.lineno} column {exc.colno}: "
                         f"{exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"config: {path!r} is not text ({exc.reason})") from None
    except Exception as exc:  # noqa: BLE001 - yaml.YAMLError, tomllib.TOMLDecodeError
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
        reason = getattr(exc, "problem", None) or str(exc)
        kind = {".toml": "TOML"}.get(suffix, "YAML")
        raise ValueError(f"config: {path!r} is not valid {kind} ({where}{' '.join(str(reason).split())})") from None
    if not isinstance(values, dict):
        raise ValueError(f"config: {path!r} must hold a mapping of settings, got {type(values).__name__}")
    return values


def merge(cls, file_values: dict, flag_values: dict, source: str | None = None):
    """Defaults < config file < flags that were given (flag values of None mean 'not given').
    File values are coerced to the fields' types; errors name the file (`source`)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    where = f"config {source!r}" if source else "config"
    unknown = set(file_values) - set(fields)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    values = {}
    for key, value in file_values.items():
        try:
            values[key] = coerce(fields[key], value)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    values.update({k: v for k, v in flag_values.items() if v is not None and k in fields})
    return cls(**values)
