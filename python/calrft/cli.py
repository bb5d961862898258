"""The `calrft` command: train, eval, wise-ft, demo and env for calibrated robust fine-tuning of
open_clip models.

Every subcommand takes --config FILE (YAML, JSON or TOML with the same keys as its flags,
underscores for dashes); flags given on the command line override the file, which overrides the
defaults. Every argument is checked before any work starts. Exit status: 0 success, 1 a failure
while writing outputs (e.g. a full disk) or training data that cannot make progress, 2 a bad
argument, 75 train stopped by SIGTERM / SIGUSR1 with a checkpoint to resume from, 130 interrupted
(Ctrl-C); failures print one `calrft COMMAND: error: ...` line."""
from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import re
import sys

from .config import TrainConfig, field_kind, merge, read_file
from .data import DataStreamError
from .preempt import EXIT_PREEMPTED, Preempted
from .rundir import DEFAULT_OUT

# One line per option; add_config_flags appends the default.
TRAIN_HELP = {
    "model": "open_clip architecture name (e.g. ViT-B-16, or calrft-tiny for CPU tests)",
    "pretrained": "open_clip tag (needs network) or a local weights file / calrft checkpoint; "
                  "empty for random initialisation",
    "cache_dir": "folder where open_clip caches downloaded weights",
    "method": "carot (CaRot), flyp (contrastive only) or ft (cross-entropy, zero-shot-initialised head)",
    "loss": "contrastive loss family of carot/flyp: softmax (CLIP's InfoNCE), sigmoid (SigLIP's "
            "pairwise loss, with the model's logit bias), or auto (sigmoid for models with a logit "
            "bias, e.g. open_clip's --siglip / init_logit_bias ones)",
    "distill_weight": "CaRot self-distillation (EMA teacher) weight",
    "orth_weight": "CaRot orthogonality constraint weight on the visual projection",
    "cross_weight": "CaRot cross term weight of the orthogonality constraint",
    "sigma_min_weight": "weight of the direct sigma_min regulariser (0 = off, as in the paper)",
    "supervised_targets": "contrastive targets over same-label pairs instead of the diagonal",
    "ema_start": "EMA teacher momentum at step 0",
    "ema_end": "EMA teacher momentum after the warm-up",
    "ema_warmup": "fraction of all steps over which the EMA momentum rises",
    "ema_every": "steps between EMA teacher updates (and one at the last step)",
    "train_csv": "CSV/TSV of training image paths and captions",
    "csv_image_key": "image path column of --train-csv",
    "csv_caption_key": "caption column of --train-csv",
    "csv_label_key": "optional class index column of --train-csv (ft, supervised targets)",
    "train_folder": "ImageFolder training tree (captions from templates, class names from folders)",
    "train_data": "WebDataset tar shards of (image, caption) pairs, e.g. shards/{00000..00099}.tar",
    "train_num_samples": "samples per epoch of a --train-data stream (it has no length of its own)",
    "classnames": "file of class names, one a line (the ID classes; else --train-folder's folders or an "
                  "--id-eval shard set's classnames.txt)",
    "templates": "prompt templates for zero-shot heads and folder captions: openai, short, simple, or a "
                 "file of templates one a line with {c} or {} for the class (e.g. clip_benchmark's "
                 "zeroshot_classification_templates.txt)",
    "id_eval": "ID evaluation set (NAME=PATH or PATH): an ImageFolder tree, or WebDataset shards in "
               "clip_benchmark's layout (a folder with classnames.txt and test/*.tar, or a shard "
               "pattern); its metrics and sigma_min",
    "ood_eval": "OOD evaluation sets (NAME=PATH or PATH), ImageFolder trees or shards as --id-eval; "
                "their classes map by name onto a subset of the ID classes",
    "workers": "data-loading worker processes",
    "data_timeout": "seconds a data-loader worker may take to deliver a batch before the run stops with "
                    "an error line, exit status 1 (with --workers >= 1; 0 = wait forever); a worker that "
                    "dies stops the run the same way",
    "max_unreadable": "stop the run (exit status 1, one line naming the files and counts) when more than "
                      "this fraction of the last --unreadable-window training samples a rank read were "
                      "unreadable (1 = never); a full pass over the shards without one readable sample "
                      "always stops it",
    "unreadable_window": "samples per rank over which --max-unreadable is taken",
    "batch_size": "global batch size, split over ranks",
    "micro_batch_size": "rows per rank per forward/backward chunk: feature caching below --batch-size (the loss "
                        "still sees the whole global batch; memory of one chunk; unset = off)",
    "grad_checkpointing": "recompute activations in the backward pass to save memory",
    "epochs": "training epochs (ignored when --steps is set)",
    "steps": "total optimiser steps (overrides --epochs)",
    "lr": "peak AdamW learning rate",
    "weight_decay": "AdamW weight decay (none on logit_scale, biases, norms)",
    "warmup": "linear warm-up steps before the cosine decay",
    "grad_clip": "clip the gradient norm to this value (unset = no clipping)",
    "precision": "auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32",
    "seed": "seed of every random choice (data order, captions, augmentation, init)",
    "device": "cpu, cuda or cuda:N (default: CUDA when available, else CPU)",
    "out": "output folder (refused if it holds a run, unless --resume or --overwrite)",
    "eval_every": "steps between evaluations (0 = after each epoch)",
    "eval_batch_size": "evaluation batch size per process",
    "log_every": "steps between log.jsonl records (and progress lines when not on a terminal)",
    "save_every": "steps between checkpoints (0 = after each epoch; always at the end). SIGTERM or SIGUSR1 "
                  "(cluster preemption) also saves one: the step in progress finishes, every rank stops "
                  "at the same step, one line names the checkpoint, exit status 75",
    "resume": "continue the run of this checkpoint (same method, model and optimisation settings)",
    "overwrite": "replace the outputs of a previous run in --out (other files are kept)",
    "stop_after": "stop (saving a checkpoint) after this many steps; continue with --resume",
    "progress": "progress bar on a terminal, plain lines otherwise",
}
# Where a command reads a setting differently from train.
COMMAND_HELP = {
    **{(c, "out"): "output folder (refused if it holds a run, unless --overwrite)" for c in ("eval", "wise-ft")},
    **{(c, "train_folder"): "an ImageFolder tree whose folder names give the class names (instead of "
                            "--classnames)" for c in ("eval", "wise-ft")},
}
EVAL_FIELDS = {"model", "pretrained", "cache_dir", "classnames", "templates", "id_eval", "ood_eval",
               "workers", "eval_batch_size", "device", "out", "train_folder", "overwrite", "precision"}


def add_config_flags(parser, command="train", cls=TrainConfig, only=None):
    """One --flag per config field; default None so we can tell which flags were given."""
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.name == "out":
            default = DEFAULT_OUT[command]
        if f.name == "overwrite" or default in (None, [], ""):
            suffix = ""
        else:
            suffix = f" (default: {default})"
        help_text = (COMMAND_HELP.get((command, f.name)) or TRAIN_HELP.get(f.name, f.name.replace("_", " "))) + suffix
        typ, _ = field_kind(f)
        if typ is bool:
            if f.name == "overwrite":
                parser.add_argument(flag, action="store_true", default=None, help=help_text)
            else:
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typ is list:
            parser.add_argument(flag, nargs="*", default=None, metavar=f.name.upper(), help=help_text)
        else:
            parser.add_argument(flag, type=typ, default=None, metavar=f.name.upper(), help=help_text)
    parser.add_argument("--config", metavar="FILE",
                        help="YAML, JSON or TOML file of settings with the flags' names (flags override it)")


def config_from(args, command="train", cls=TrainConfig):
    file_values = read_file(args.config) if args.config else {}
    flags = vars(args)
    if "out" not in file_values and flags.get("out") is None:
        flags = {**flags, "out": DEFAULT_OUT[command]}
    return merge(cls, file_values, flags, source=args.config)


def cmd_train(args):
    from . import dist, report, train
    cfg = config_from(args, "train")
    try:
        result = train.run(cfg)
    except Preempted:
        dist.shutdown()                  # every rank stopped at the same step
        raise
    except BaseException:
        dist.shutdown(barrier=False)     # another rank may be gone
        raise
    if result is not None and dist.is_main():
        print(report.table({cfg.method: result}))
    dist.shutdown()
    return 0


def _eval_setup(cfg):
    """(model, tokenizer, eval sets, class names, classifier) for calrft eval / wise-ft."""
    from . import checkpoint, models
    from . import evaluate as ev
    from . import templates as templates_mod
    from .train import build_data
    model, _, eval_tf, tokenizer = models.create(cfg.model, cfg.pretrained, "cpu", cfg.cache_dir)
    _, eval_sets, classnames = build_data(dataclasses.replace(cfg, train_csv=None), None, eval_tf)
    templates = templates_mod.get(cfg.templates)
    classifier = ev.ZeroShotClassifier(model, tokenizer, classnames, templates, precision=cfg.precision)
    if cfg.pretrained and not _is_tag(cfg.pretrained) and not cfg.pretrained.endswith(".safetensors"):
        state = checkpoint.load(cfg.pretrained, what="pretrained")
        if "ft_head" in state:  # a --method ft checkpoint: its learned head, not a zero-shot one
            head = state["ft_head"]
            classifier = lambda f: model.logit_scale.exp().float() * f.float() @ head.float().T  # noqa: E731
    return model, tokenizer, eval_sets, classnames, classifier


def _is_tag(pretrained):
    import os
    return not os.path.exists(pretrained)


def _check_name(name):
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+=-]*", name):
        raise ValueError(f"name: {name!r} must be a file-name-safe word (letters, digits, . _ + = -)")


def cmd_eval(args):
    from . import evaluate as ev
    from . import preflight, report, rundir
    cfg = config_from(args, "eval")
    _check_name(args.name)
    preflight.check(cfg, "eval")
    rundir.prepare(cfg.out, "eval", overwrite=cfg.overwrite, inputs={"pretrained": cfg.pretrained})
    model, _, eval_sets, _, classifier = _eval_setup(cfg)
    result = ev.evaluate(model, classifier, eval_sets, cfg.device or "cpu", cfg.eval_batch_size, cfg.workers,
                         id_first=bool(cfg.id_eval), precision=cfg.precision)
    report.write_all(cfg.out, {args.name: result}, cfg.to_dict())
    print(report.table({args.name: result}))
    return 0


def _alphas(text):
    try:
        alphas = [float(a) for a in text.split(",")]
    except ValueError:
        raise ValueError(f"alphas: expected comma-separated numbers in [0, 1], got {text!r}") from None
    if not alphas or any(not 0.0 <= a <= 1.0 for a in alphas):
        raise ValueError(f"alphas: every weight must lie in [0, 1], got {text!r}")
    return alphas


def cmd_wise_ft(args):
    import os
    from . import checkpoint, preflight, report, rundir, wiseft
    from . import evaluate as ev
    from . import templates as templates_mod
    cfg = config_from(args, "wise-ft")
    cfg.pretrained = args.zeroshot
    alphas = _alphas(args.alphas)
    preflight.check(cfg, "wise-ft", finetuned=args.finetuned, zeroshot=args.zeroshot)
    rundir.prepare(cfg.out, "wise-ft", overwrite=cfg.overwrite,
                   inputs={"zeroshot": args.zeroshot, "finetuned": args.finetuned})
    finetuned = checkpoint.load_weights(args.finetuned, "finetuned")
    model, tokenizer, eval_sets, classnames, _ = _eval_setup(cfg)
    zeroshot = wiseft.state_of(model)
    wiseft.check_compatible(zeroshot, finetuned)
    templates = templates_mod.get(cfg.templates)

    def evaluate(m):
        clf = ev.ZeroShotClassifier(m, tokenizer, classnames, templates, precision=cfg.precision)
        return ev.evaluate(m, clf, eval_sets, cfg.device or "cpu", cfg.eval_batch_size, cfg.workers,
                           precision=cfg.precision)
    rows = wiseft.sweep(model, zeroshot, finetuned, alphas, evaluate)
    methods = {f"alpha={r['alpha']:.2f}": r for r in rows}
    sweeps = {"wise-ft": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]}
    report.write_all(cfg.out, methods, cfg.to_dict(), "## WiSE-FT\n\n" + wiseft.table(sweeps))
    wiseft.plot(sweeps, os.path.join(cfg.out, "wiseft.png"))
    print(wiseft.table(sweeps))
    return 0


def cmd_demo(args):
    from . import demo, rundir
    if args.threads < 1:
        raise ValueError(f"threads: must be >= 1, got {args.threads}")
    try:
        seeds = [int(s) for s in str(args.seeds).split(",")]
    except ValueError:
        raise ValueError(f"seeds: expected comma-separated integers, got {args.seeds!r}") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: expected distinct integers >= 0, got {args.seeds!r}")
    overrides = read_file(args.config) if args.config else {}
    demo.check_overrides(overrides, f"config {args.config!r}")
    if args.sigma_min_weight is not None:
        overrides["sigma_min_weight"] = args.sigma_min_weight
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    probe = TrainConfig(model="calrft-tiny", pretrained=None, device="cpu")
    for key, value in overrides.items():  # check the overrides before any work
        if key not in fields:
            raise ValueError(f"config {args.config!r}: unknown fine-tuning key {key!r}")
        setattr(probe, key, value)
    probe.validate()
    overrides = {k: getattr(probe, k) for k in overrides}
    rundir.prepare(args.out, "demo", overwrite=args.overwrite)
    import torch
    torch.set_num_threads(args.threads)
    demo.run(args.out, seeds=seeds, quick=args.quick, cache=args.cache_dir, wise=args.wise_ft,
             progress=args.progress, loss=args.loss, **overrides)
    return 0


def cmd_env(args):
    from . import envinfo
    text, ok = envinfo.report()
    print(text)
    return 0 if ok else 1


def build_parser():
    doc = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(
        prog="calrft", description=" ".join(doc[0].split()),
        epilog=" ".join(doc[1].split()) + " Run `calrft COMMAND --help` for a command's options.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune an open_clip model (CaRot, FLYP or FT)",
                       description="Fine-tune with --method carot|flyp|ft; defaults are the paper's. "
                                   "Run under torchrun for DDP.")
    add_config_flags(p, "train")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate accuracy and calibration, ID and OOD",
                       description="Evaluate a model's zero-shot (or ft-head) accuracy and calibration "
                                   "on an ID set and OOD sets.")
    add_config_flags(p, "eval", only=EVAL_FIELDS)
    p.add_argument("--name", default="model", help="method name in results.json (default: model)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("wise-ft", help="weight-space ensembles of zero-shot and fine-tuned models",
                       description="Evaluate (1 - alpha) * zero-shot + alpha * fine-tuned weights for "
                                   "each alpha, ID and OOD.")
    add_config_flags(p, "wise-ft", only=EVAL_FIELDS - {"pretrained"})
    p.add_argument("--zeroshot", required=True, help="zero-shot weights (open_clip tag or path)")
    p.add_argument("--finetuned", required=True,
                   help="fine-tuned weights: a calrft checkpoint, an open_clip file or .safetensors")
    p.add_argument("--alphas", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0",
                   help="comma-separated weights of the fine-tuned model, each in [0, 1] "
                        "(default: 0 to 1 by 0.1)")
    p.set_defaults(func=cmd_wise_ft)

    p = sub.add_parser("demo", help="the embedded digits distribution-shift benchmark, end to end",
                       description="Pretrain (cached) a tiny CLIP on digits, fine-tune it with FLYP "
                                   "and CaRot, evaluate ID and under five shifts, WiSE-FT sweep.")
    p.add_argument("--out", default=DEFAULT_OUT["demo"], help=f"output folder, refused if it holds a demo unless --overwrite (default: {DEFAULT_OUT['demo']})")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of a previous demo in --out")
    p.add_argument("--quick", action="store_true", help="shorter fine-tuning (< 5 min on 2 cores)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; several give mean and spread (default: 0)")
    p.add_argument("--cache-dir", default=None, help="folder caching the pretrained zero-shot model (default: $XDG_CACHE_HOME/calrft)")
    p.add_argument("--wise-ft", action=argparse.BooleanOptionalAction, default=True, help="run the WiSE-FT sweep")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bars on a terminal, plain lines otherwise")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads, >= 1 (default 1: the tiny model gains nothing from more)")
    p.add_argument("--sigma-min-weight", type=float, default=None, help="CaRot's direct sigma_min regulariser weight")
    p.add_argument("--loss", choices=("softmax", "sigmoid"), default="softmax",
                   help="contrastive family of every stage: softmax (CLIP's InfoNCE on calrft-tiny) or "
                        "sigmoid (SigLIP's loss on calrft-tiny-sigmoid, with its logit bias) "
                        "(default: softmax)")
    p.add_argument("--config", metavar="FILE", help="YAML, JSON or TOML of fine-tuning overrides (TrainConfig keys)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("env", help="versions, the native extension and GPU, and a self-check of each backend",
                       description="Print what this installation runs on (for bug reports) and check each "
                                   "backend that runs here against the float64 reference; exit 1 if the "
                                   "native extension failed to load or a check failed.")
    p.set_defaults(func=cmd_env)
    return parser


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _notes(exc: BaseException) -> str:
    """The notes added to an exception on its way up (e.g. the last checkpoint), joined."""
    return "; ".join(getattr(exc, "__notes__", []))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # our loggers at INFO; other libraries' (open_clip logs model set-up at INFO) at WARNING
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("calrft").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    prefix = f"calrft {args.command}: error:"
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"{prefix} {_one_line(exc)}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:                    # a diverged run (steps.check_finite_loss)
        print(f"{prefix} {_one_line(exc)}", file=sys.stderr)
        return 1
    except DataStreamError as exc:                       # training data that cannot make progress
        notes = _notes(exc)
        print(f"{prefix} {_one_line(str(exc) + ('; ' + notes if notes else ''))}", file=sys.stderr)
        return 1
    except Preempted as exc:                             # SIGTERM / SIGUSR1: checkpointed, resumable
        if exc.path is not None:                         # the rank that wrote it says so, once
            print(f"calrft {args.command}: {_one_line(exc)} (exit status {EXIT_PREEMPTED})", file=sys.stderr)
        return EXIT_PREEMPTED
    except OSError as exc:
        notes = _notes(exc)
        if exc.errno == errno.ENOSPC:
            what = f"no space left on device writing {exc.filename} (ENOSPC)"
        else:
            name = errno.errorcode.get(exc.errno, "") if exc.errno else ""
            what = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "") + (
                f" ({name})" if name else "")
        print(f"{prefix} {_one_line(what + ('; ' + notes if notes else ''))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        notes = _notes(exc) or "interrupted"
        print(f"calrft {args.command}: {_one_line(notes)}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
