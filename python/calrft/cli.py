"""The `calrft` command: train, eval, wise-ft, demo. Every subcommand takes --config FILE (YAML
or JSON); flags given on the command line override the file, which overrides the defaults."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing

from .config import TrainConfig, merge, read_file

TRAIN_HELP = {
    "method": "carot (CaRot), flyp (contrastive only) or ft (cross-entropy, zero-shot-initialised head)",
    "pretrained": "open_clip tag (needs network) or a local checkpoint path",
    "ood_eval": "OOD evaluation ImageFolder trees (NAME=PATH or PATH); class folders map by name "
                "onto a subset of the ID classes",
    "sigma_min_weight": "weight of the direct sigma_min regulariser (0 = off, as in the paper)",
    "stop_after": "stop (saving a checkpoint) after this many steps; continue with --resume",
    "steps": "total optimiser steps (overrides --epochs)",
    "batch_size": "global batch size, split over ranks",
}


def _field_type(f):
    hint = f.type if not isinstance(f.type, str) else f.type
    for name, typ in (("bool", bool), ("int", int), ("float", float), ("str", str), ("list", list)):
        if hint.startswith(name):
            return typ
    raise TypeError(f"unsupported config field type {hint}")


def add_config_flags(parser, cls=TrainConfig, only=None):
    """One --flag per config field; default None so we can tell which flags were given."""
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = TRAIN_HELP.get(f.name, "") + f" (default: {default})"
        typ = _field_type(f)
        if typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typ is list:
            parser.add_argument(flag, nargs="*", default=None, help=help_text)
        else:
            parser.add_argument(flag, type=typ, default=None, help=help_text)
    parser.add_argument("--config", help="YAML or JSON file of config values (flags override it)")


def config_from(args, cls=TrainConfig):
    file_values = read_file(args.config) if args.config else {}
    return merge(cls, file_values, vars(args))


EVAL_FIELDS = {"model", "pretrained", "cache_dir", "classnames", "templates", "id_eval", "ood_eval",
               "workers", "eval_batch_size", "device", "out", "train_folder"}


def cmd_train(args):
    from . import train
    cfg = config_from(args)
    result = train.run(cfg)
    if result is not None:
        from . import report, dist
        if dist.is_main():
            print(report.table({cfg.method: result}))
    return 0


def _eval_setup(cfg):
    """(model, tokenizer, eval sets, class names, classifier) for calrft eval / wise-ft."""
    from . import checkpoint, models
    from . import evaluate as ev
    from . import templates as templates_mod
    from .train import build_data
    if not cfg.id_eval:
        raise ValueError("id_eval: evaluation needs --id-eval")
    model, _, eval_tf, tokenizer = models.create(cfg.model, cfg.pretrained, "cpu", cfg.cache_dir)
    _, eval_sets, classnames = build_data(dataclasses.replace(cfg, train_csv=None), None, eval_tf)
    templates = templates_mod.get(cfg.templates)
    classifier = ev.ZeroShotClassifier(model, tokenizer, classnames, templates)
    if cfg.pretrained and not _is_tag(cfg.pretrained):
        state = checkpoint.load(cfg.pretrained)
        if "ft_head" in state:  # a --method ft checkpoint: its learned head, not a zero-shot one
            head = state["ft_head"]
            classifier = lambda f: model.logit_scale.exp().float() * f.float() @ head.float().T  # noqa: E731
    return model, tokenizer, eval_sets, classnames, classifier


def _is_tag(pretrained):
    import os
    return not os.path.exists(pretrained)


def cmd_eval(args):
    from . import evaluate as ev
    from . import report
    cfg = config_from(args)
    model, _, eval_sets, _, classifier = _eval_setup(cfg)
    result = ev.evaluate(model, classifier, eval_sets, cfg.device or "cpu", cfg.eval_batch_size, cfg.workers)
    report.write_all(cfg.out, {args.name: result}, cfg.to_dict())
    print(report.table({args.name: result}))
    return 0


def cmd_wise_ft(args):
    from . import checkpoint, report, wiseft
    from . import evaluate as ev
    from . import templates as templates_mod
    cfg = config_from(args)
    cfg.pretrained = args.zeroshot
    model, tokenizer, eval_sets, classnames, _ = _eval_setup(cfg)
    zeroshot = wiseft.state_of(model)
    finetuned = checkpoint.load(args.finetuned)["state_dict"] if not args.finetuned.endswith(
        ".safetensors") else None
    alphas = [float(a) for a in args.alphas.split(",")]
    templates = templates_mod.get(cfg.templates)

    def evaluate(m):
        clf = ev.ZeroShotClassifier(m, tokenizer, classnames, templates)
        return ev.evaluate(m, clf, eval_sets, cfg.device or "cpu", cfg.eval_batch_size, cfg.workers)
    rows = wiseft.sweep(model, zeroshot, finetuned, alphas, evaluate)
    import os
    os.makedirs(cfg.out, exist_ok=True)
    methods = {f"alpha={r['alpha']:.2f}": r for r in rows}
    sweeps = {"wise-ft": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]}
    report.write_all(cfg.out, methods, cfg.to_dict(), "## WiSE-FT\n\n" + wiseft.table(sweeps))
    wiseft.plot(sweeps, os.path.join(cfg.out, "wiseft.png"))
    print(wiseft.table(sweeps))
    return 0


def cmd_demo(args):
    from . import demo
    overrides = {}
    if args.config:
        overrides = read_file(args.config)
    for key in ("sigma_min_weight",):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    seeds = [int(s) for s in str(args.seeds).split(",")]
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    demo.run(args.out, seeds=seeds, quick=args.quick, cache=args.cache_dir, wise=args.wise_ft,
             progress=args.progress, **overrides)
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="calrft", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune an open_clip model (CaRot, FLYP or FT)",
                       description="Fine-tune with --method carot|flyp|ft; defaults are the paper's. "
                                   "Run under torchrun for DDP.")
    add_config_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate accuracy and calibration, ID and OOD")
    add_config_flags(p, only=EVAL_FIELDS)
    p.add_argument("--name", default="model", help="method name in results.json")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("wise-ft", help="weight-space ensembles of zero-shot and fine-tuned models")
    add_config_flags(p, only=EVAL_FIELDS - {"pretrained"})
    p.add_argument("--zeroshot", required=True, help="zero-shot weights (open_clip tag or path)")
    p.add_argument("--finetuned", required=True, help="a calrft checkpoint")
    p.add_argument("--alphas", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0",
                   help="comma-separated weights of the fine-tuned model")
    p.set_defaults(func=cmd_wise_ft)

    p = sub.add_parser("demo", help="the embedded digits distribution-shift benchmark, end to end")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="shorter fine-tuning (< 5 min on 2 cores)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; several give mean and spread")
    p.add_argument("--cache-dir", default=None, help="pretrained-model cache (default: $XDG_CACHE_HOME/calrft)")
    p.add_argument("--wise-ft", action=argparse.BooleanOptionalAction, default=True, help="run the WiSE-FT sweep")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the tiny model's ops are too small to gain from "
                        "more, and on a busy machine extra threads slowed pretraining ~10x)")
    p.add_argument("--sigma-min-weight", type=float, default=None, help="CaRot's direct sigma_min regulariser weight")
    p.add_argument("--config", help="YAML/JSON of fine-tuning overrides (TrainConfig keys)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # our loggers at INFO; other libraries' (open_clip logs model set-up at INFO) at WARNING
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("calrft").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"calrft {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
