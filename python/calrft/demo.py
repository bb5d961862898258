"""calrft demo: the embedded benchmark end to end.

pretrain (cached) -> zero-shot eval -> FLYP fine-tune -> CaRot fine-tune -> WiSE-FT sweep, then a
table on stdout and results.json, report.md and plots in --out. `loss` picks the contrastive
family of every stage: "softmax" (CLIP's InfoNCE on calrft-tiny, the default) or "sigmoid"
(SigLIP's loss on calrft-tiny-sigmoid, whose logit bias the loss, the EMA teacher and the
checkpoints carry)."""
from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

import torch

from . import data, digits, models, report, wiseft
from .checkpoint import atomic_write_text
from . import evaluate as ev
from . import templates as templates_mod
from .config import TrainConfig
from .train import Trainer

log = logging.getLogger("calrft.demo")

# Fine-tuning settings for the tiny model on digits. The schedule keeps the paper's proportions:
# warm-up and EMA-update interval are each 2% of all steps (500 of ~25k in the paper).
PROFILES = {
    "quick": dict(steps=80, batch_size=128, lr=1e-4, pretrain_steps=800,
                  alphas=(0.0, 0.5, 1.0)),
    "full": dict(steps=240, batch_size=128, lr=1e-4, pretrain_steps=800,
                 alphas=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0)),
}
METHODS = ("flyp", "carot")


def check_overrides(overrides: dict, source: str = "config") -> None:
    """Fine-tuning overrides may not set the model or the loss family: both follow the demo's
    `loss` (its pretrained model is of that family)."""
    for key in ("loss", "model"):
        if key in overrides:
            raise ValueError(f"{source}: {key!r} is not a fine-tuning override of the demo (its "
                             f"model and loss family come from --loss)")


def finetune_config(profile: dict, method: str, seed: int, out: Path, loss: str = "softmax",
                    **overrides) -> TrainConfig:
    steps = profile["steps"]
    two_percent = max(1, round(0.02 * steps))
    cfg = TrainConfig(model=digits.pretrain_model(loss), loss=loss, pretrained=None, method=method,
                      batch_size=profile["batch_size"],
                      steps=steps, lr=profile["lr"], warmup=two_percent, ema_every=two_percent,
                      templates="openai", workers=0, seed=seed, device="cpu", out=str(out / method),
                      eval_every=10**9, save_every=10**9, log_every=10, progress=True)
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise ValueError(f"config: unknown fine-tuning key {k!r}")
        setattr(cfg, k, v)
    return cfg.validate()


def run_seed(out: Path, seed: int, quick: bool, cache=None, wise=True, progress=True, profile=None,
             loss="softmax", **overrides) -> dict:
    profile = profile or PROFILES["quick" if quick else "full"]
    check_overrides(overrides)
    out.mkdir(parents=True, exist_ok=True)
    times = {}
    t = time.time()
    weights = digits.pretrain(seed, cache=cache, progress=progress, family=loss,
                              steps=profile["pretrain_steps"])
    times["pretrain"] = time.time() - t
    bench = digits.build_benchmark(seed)
    classnames = bench["classnames"]
    templates = templates_mod.get("openai")
    eval_sets = [data.EvalSet(name, data.TensorEval(*tensors)) for name, tensors in bench["test"].items()]
    train_set = data.TensorCaptions(*bench["train"], classnames, templates, seed=seed)

    def fresh_model():
        torch.manual_seed(seed)
        model, _, _, tokenizer = models.create(digits.pretrain_model(loss), str(weights))
        return model, tokenizer

    def evaluate(model, tokenizer):
        clf = ev.ZeroShotClassifier(model, tokenizer, classnames, templates)
        return ev.evaluate(model, clf, eval_sets, workers=0)

    t = time.time()
    model, tokenizer = fresh_model()
    zeroshot_state = wiseft.state_of(model)
    results = {"zeroshot": evaluate(model, tokenizer)}
    times["zeroshot_eval"] = time.time() - t
    finetuned = {}
    for method in METHODS:
        t = time.time()
        model, tokenizer = fresh_model()
        cfg = finetune_config(profile, method, seed, out, loss, progress=progress, **overrides)
        trainer = Trainer(cfg, model=model, tokenizer=tokenizer, train_set=train_set,
                          eval_sets=eval_sets, classnames=classnames)
        results[method] = trainer.fit(stop_on_signals=False)   # the demo has no --resume
        finetuned[method] = wiseft.state_of(model)
        times[method] = time.time() - t
    extra = ""
    sweeps = {}
    if wise:
        t = time.time()
        model, tokenizer = fresh_model()
        for method in METHODS:
            sweeps[method] = [{k: v for k, v in r.items() if not k.startswith("_")} for r in wiseft.sweep(
                model, zeroshot_state, finetuned[method], profile["alphas"],
                lambda m: evaluate(m, tokenizer))]
        wiseft.plot(sweeps, out / "wiseft.png")
        extra = "## WiSE-FT\n\n" + wiseft.table(sweeps)
        times["wiseft"] = time.time() - t
    config = {"seed": seed, "quick": quick, "profile": profile, "pretrained": str(weights),
              "loss_family": loss,
              "finetune": finetune_config(profile, "carot", seed, out, loss, **overrides).to_dict(),
              "seconds": times}
    doc = report.write_all(out, results, config, extra)
    if sweeps:
        doc["wiseft"] = sweeps
        atomic_write_text(out / "results.json", json.dumps(doc, indent=2, default=str))
    return doc


def aggregate(docs: list[dict]) -> dict:
    """Mean and spread (sample std) over seeds of every ID / OOD-average metric and sigma_min."""
    out = {}
    for method in docs[0]["methods"]:
        rows = [d["methods"][method] for d in docs]
        entry = {}
        for part in ("id", "ood_avg"):
            for m in report.METRICS:
                vals = [r["id"][m] if part == "id" else r["ood"]["avg"][m] for r in rows]
                entry[f"{part}_{m}"] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
        vals = [r["sigma_min"] for r in rows]
        entry["sigma_min"] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
        out[method] = entry
    return out


def aggregate_table(agg: dict) -> str:
    cols = ["id_acc", "id_ece", "ood_avg_acc", "ood_avg_ece", "id_nll", "ood_avg_nll", "sigma_min"]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for method, entry in agg.items():
        cells = [f"{entry[c][0]:.3e} ± {entry[c][1]:.1e}" if c == "sigma_min" else
                 f"{entry[c][0]:.4f} ± {entry[c][1]:.4f}" for c in cols]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(out, seeds=(0,), quick=False, cache=None, wise=True, progress=True, profile=None,
        loss="softmax", **overrides) -> dict:
    out = Path(out)
    docs = []
    for seed in seeds:
        seed_out = out if len(seeds) == 1 else out / f"seed{seed}"
        docs.append(run_seed(seed_out, seed, quick, cache, wise, progress, profile, loss,
                             **overrides))
        print(f"\nseed {seed} ({loss} loss family):\n" + report.table(docs[-1]["methods"]))
    if len(seeds) > 1:
        agg = aggregate(docs)
        text = (f"# calrft demo over seeds {list(seeds)} (mean ± std), {loss} loss family\n\n"
                + aggregate_table(agg) + "\n")
        atomic_write_text(out / "summary.md", text)
        atomic_write_text(out / "summary.json", json.dumps({"seeds": list(seeds), "aggregate": agg}, indent=2))
        print("\n" + text)
    return {"runs": docs}
