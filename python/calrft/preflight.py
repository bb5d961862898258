"""Pre-flight checks: every argument of a command is checked before any work starts, so a run
never fails after hours of training on something knowable at the start (a missing file, an
evaluation set with no readable image, a checkpoint of another method).

Settings are checked by TrainConfig.validate() (types, ranges, the device); this module checks
what they point at: files, folders, checkpoints. The output folder policy is rundir.prepare(),
applied after these checks (so a refused command never touches a previous run's files)."""
from __future__ import annotations

import os

from . import checkpoint
from .config import TrainConfig


def spec_path(spec: str | None) -> str | None:
    """The PATH of an evaluation set's NAME=PATH or PATH."""
    if not spec:
        return None
    return spec.rpartition("=")[2] if "=" in spec else spec


def eval_paths(cfg: TrainConfig) -> list[tuple[str, str]]:
    """[(option, path)] of the configured evaluation sets (NAME=PATH or PATH)."""
    specs = ([("id_eval", cfg.id_eval)] if cfg.id_eval else []) + [("ood_eval", s) for s in cfg.ood_eval]
    return [(opt, spec_path(spec)) for opt, spec in specs]


def check_shards(path: str, what: str) -> None:
    """A WebDataset evaluation set: its shards exist and index, its classnames.txt reads, and at
    least one sample decodes (the first that can, so a healthy set costs one image)."""
    from . import data
    index = data.scan_shards(path, what)
    usable = [s for s in index.samples if not s.problem]
    if not usable:
        why = f" (first: {index.samples[0].problem})" if index.samples else ""
        raise ValueError(f"{what}: {path!r} holds no sample with an image and a label{why}")
    _one_readable(usable, data.decode_shard_image, path, what)


def _one_readable(items, load, path: str, what: str) -> None:
    """Decode items until the first success (a healthy set costs one image); ValueError if none."""
    for item in items:
        try:
            load(item)
            return
        except Exception:  # noqa: BLE001 - PIL raises many types for corrupt files
            continue
    raise ValueError(f"{what}: none of the {len(items)} images in {path!r} is readable")


def check_eval_set(path: str, what: str) -> None:
    """An evaluation set: WebDataset shards (clip_benchmark's layout) or an ImageFolder tree."""
    from . import data
    if data.is_shard_set(path):
        check_shards(path, what)
    else:
        check_image_folder(path, what)


def check_image_folder(path: str, what: str) -> None:
    """An ImageFolder tree with at least one readable image (decoded until the first success, so
    a healthy set costs one image)."""
    from . import data
    try:
        _, items = data.scan_image_folder(path)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    if not items:
        raise ValueError(f"{what}: {path!r} holds no image files ({', '.join(data.IMAGE_EXTENSIONS)})")
    _one_readable([p for p, _ in items], data.load_image, path, what)


def check_classnames(path: str) -> None:
    if not os.path.isfile(path):
        raise ValueError(f"classnames: no such file {path!r}")
    from . import data
    names = data.read_classnames(path, "classnames")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[:3]
        raise ValueError(f"classnames: {path!r} repeats class names {dup}")


def check_weights_arg(value: str | None, what: str) -> None:
    """An open_clip tag is left to models.create (it names the valid tags); a path must be a
    complete weights file."""
    if value and (os.sep in value or os.path.exists(value) or value.endswith((".pt", ".pth", ".bin",
                                                                              ".safetensors"))):
        checkpoint.check_file(value, what)


def check(cfg: TrainConfig, command: str, *, finetuned: str | None = None,
          zeroshot: str | None = None) -> TrainConfig:
    """Validate `cfg` for `command` (train | eval | wise-ft) and everything it points at."""
    cfg.validate()
    if command == "train":
        if not (cfg.train_csv or cfg.train_folder or getattr(cfg, "train_data", None)):
            raise ValueError("train data: give --train-csv or --train-folder")
    elif command == "eval":
        if not (cfg.id_eval or cfg.ood_eval):
            raise ValueError("id_eval: evaluation needs --id-eval and/or --ood-eval")
    elif command == "wise-ft":
        if not cfg.id_eval or not cfg.ood_eval:
            raise ValueError(f"{'ood_eval' if cfg.id_eval else 'id_eval'}: wise-ft compares ID and OOD "
                             "accuracy along the sweep: it needs --id-eval and --ood-eval")
    if cfg.train_csv and not os.path.isfile(cfg.train_csv):
        raise ValueError(f"train_csv: no such file {cfg.train_csv!r}")
    if cfg.train_folder and command == "train":
        check_image_folder(cfg.train_folder, "train_folder")
    elif cfg.train_folder and not os.path.isdir(cfg.train_folder):
        raise ValueError(f"train_folder: no such folder {cfg.train_folder!r}")
    if cfg.classnames:
        check_classnames(cfg.classnames)
    for option, path in eval_paths(cfg):
        check_eval_set(path, option)
    from . import data
    try:
        id_classes = data.id_classnames(cfg.classnames, cfg.train_folder, spec_path(cfg.id_eval))
    except ValueError as exc:   # a --train-folder without class folders
        raise ValueError(f"train_folder: {exc}") from None
    if (cfg.id_eval or cfg.ood_eval) and id_classes is None:
        raise ValueError("classnames: evaluation needs class names (--classnames FILE, --train-folder "
                         "or an --id-eval shard set with its classnames.txt)")
    if cfg.method == "ft" and command == "train" and id_classes is None:
        raise ValueError("classnames: --method ft needs class names for its zero-shot-initialised head")
    for option, path in eval_paths(cfg):   # each set's classes must map onto the ID classes
        data.set_class_indices(path, id_classes, option)
    check_weights_arg(cfg.pretrained, "pretrained")
    check_weights_arg(zeroshot, "zeroshot")
    if finetuned is not None:
        checkpoint.check_file(finetuned, "finetuned")
        if not finetuned.endswith(".safetensors"):
            state = checkpoint.load(finetuned, what="finetuned", mmap=True)
            if "state_dict" not in state and not all(isinstance(k, str) for k in state):
                raise ValueError(f"finetuned: {finetuned!r} holds no model weights")
    if cfg.resume:
        checkpoint.check_file(cfg.resume, "resume")
        state = checkpoint.load(cfg.resume, what="resume", mmap=True)
        checkpoint.check_resumable(state, cfg.to_dict(), cfg.resume)
    return cfg
