"""The training loop: CaRot / FLYP / FT fine-tuning of an open_clip model, on one process or
many (torchrun + DDP)."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from pathlib import Path

import torch

from . import checkpoint, data, dist, ema, models, preempt, preflight, report, rundir
from . import step as steps
from . import evaluate as ev
from . import templates as templates_mod
from .config import TrainConfig
from .ops import CaRotLoss

log = logging.getLogger("calrft.train")


def cosine_lr(step: int, total: int, base_lr: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * base_lr * (1 + math.cos(math.pi * min(1.0, progress)))


def no_decay(name: str, param) -> bool:
    """logit_scale, biases, norms (and other 1-d parameters) get no weight decay."""
    return param.ndim < 2 or "logit_scale" in name or "bias" in name or ".ln" in name or "norm" in name


def make_optimizer(module, lr, weight_decay):
    decay, plain = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (plain if no_decay(name, p) else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": plain, "weight_decay": 0.0}], lr=lr)


class FTClassifier(torch.nn.Module):
    """--method ft: the image tower and a linear head initialised from the zero-shot head,
    trained with cross-entropy; logits = exp(logit_scale) * f @ W^T."""

    def __init__(self, clip, head):
        super().__init__()
        self.clip = clip
        self.head = torch.nn.Parameter(head.clone().to(clip.logit_scale.dtype))
        # Only the image tower, the scale and the head train; the text tower is not used.
        for name, p in clip.named_parameters():
            if not name.startswith("visual.") and name != "logit_scale":
                p.requires_grad_(False)

    def forward(self, images):
        feats = self.clip.encode_image(images, normalize=True)
        return self.clip.logit_scale.exp() * feats @ self.head.T

    def classify(self, feats):
        return self.clip.logit_scale.exp().float() * feats.float() @ self.head.float().T


def build_data(cfg: TrainConfig, train_tf, eval_tf):
    """(train set, eval sets, ID class names) from the configured files."""
    templates = templates_mod.get(cfg.templates)
    classnames = None
    if cfg.train_folder:
        train_set = data.ImageFolderCaptions(cfg.train_folder, train_tf, templates, cfg.seed)
        classnames = train_set.classnames
    elif cfg.train_data:
        train_set = data.WebDatasetCaptions(cfg.train_data, train_tf, seed=cfg.seed)
    elif cfg.train_csv:
        train_set = data.CsvCaptions(cfg.train_csv, train_tf, cfg.csv_image_key, cfg.csv_caption_key,
                                     cfg.csv_label_key, seed=cfg.seed)
    else:
        train_set = None
    if cfg.classnames or classnames is None:   # --classnames wins over --train-folder's names
        classnames = data.id_classnames(cfg.classnames, id_eval=preflight.spec_path(cfg.id_eval))
    eval_sets = []
    if cfg.id_eval or cfg.ood_eval:
        if classnames is None:
            raise ValueError("classnames: evaluation needs class names (--classnames, --train-folder "
                             "or an --id-eval shard set with its classnames.txt)")
        for k, spec in enumerate(([cfg.id_eval] if cfg.id_eval else []) + list(cfg.ood_eval)):
            name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
            is_id = k == 0 and bool(cfg.id_eval)
            name = name or ("id" if is_id else Path(path.rstrip("/")).name)
            ds = data.eval_set(path, eval_tf, classnames, "id_eval" if is_id else "ood_eval")
            subset = None if sorted(ds.class_indices) == list(range(len(classnames))) else ds.class_indices
            eval_sets.append(data.EvalSet(name, ds, subset))
    return train_set, eval_sets, classnames


class JsonLog:
    """Structured log: one JSON object a line, written by rank 0. A fresh run starts it empty;
    a resumed run drops the records past its checkpoint's step (`resume_at`), so no step repeats."""

    def __init__(self, path, resume_at: int | None = None):
        self.path = Path(path) if dist.is_main() else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_at is None:
                self.path.unlink(missing_ok=True)
            else:
                rundir.truncate_log(self.path, resume_at)

    def write(self, **record):
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class Trainer:
    def __init__(self, cfg: TrainConfig, *, model=None, tokenizer=None, train_set=None,
                 eval_sets=None, classnames=None):
        self.cfg = cfg.validate()
        self.device = dist.init_from_env(cfg.device)
        # the out-folder policy (refuses a previous run's folder unless resuming or overwriting)
        rundir.prepare(cfg.out, "train", resume=cfg.resume, overwrite=cfg.overwrite,
                       inputs={"pretrained": cfg.pretrained}, main=dist.is_main())
        # the first evaluation set is the ID set when the caller passes sets, or --id-eval is given
        self.id_first = bool(cfg.id_eval) or (model is not None and bool(eval_sets))
        torch.manual_seed(cfg.seed)
        if model is None:
            model, train_tf, eval_tf, tokenizer = models.create(cfg.model, cfg.pretrained, "cpu",
                                                                cfg.cache_dir)
            train_set, eval_sets, classnames = build_data(cfg, train_tf, eval_tf)
        if train_set is None:
            raise ValueError("train data: give --train-csv, --train-folder or --train-data")
        self.clip, self.tokenizer = model.to(self.device), tokenizer
        self.train_set, self.eval_sets = train_set, eval_sets or []
        self.classnames = classnames
        self.templates = templates_mod.get(cfg.templates)
        self.rank, self.world = dist.rank(), dist.world_size()
        self.group = torch.distributed.group.WORLD if self.world > 1 else None

        self.student = self.clip
        if cfg.method == "ft":
            if classnames is None:
                raise ValueError("method: ft needs class names for its zero-shot-initialised head")
            head = ev.zeroshot_head(self.clip, tokenizer, classnames, self.templates, self.device,
                                    cfg.precision)
            self.student = FTClassifier(self.clip, head).to(self.device)
        # the contrastive family (--loss; auto: sigmoid for a model with a logit bias). The
        # softmax family ignores a bias (a constant shift under the softmax): it is frozen, so
        # that it is neither left without a gradient under DDP nor touched by the optimiser.
        self.family = None if cfg.method == "ft" else steps.loss_family(cfg.loss, self.clip)
        if self.family == "softmax" and models.logit_bias(self.clip) is not None:
            self.clip.logit_bias.requires_grad_(False)
        if self.family is not None and dist.is_main():
            log.info("loss family: %s (--loss %s)", self.family, cfg.loss)
        self.teacher = None
        if cfg.method == "carot" and cfg.distill_weight > 0:
            self.teacher = ema.make_teacher(self.clip)
        self.wrapped = self.student
        if self.world > 1:
            self.wrapped = torch.nn.parallel.DistributedDataParallel(
                self.student, device_ids=[self.device] if str(self.device).startswith("cuda") else None)
        self.loss_fn = None
        if cfg.method == "carot":
            missing = [name for name, w in (("image", models.visual_projection(self.clip)),
                                            ("text", models.text_projection(self.clip)))
                       if w is None]
            if missing:
                raise ValueError(f"method: carot's orthogonality and cross terms act on the "
                                 f"towers' projections, and {cfg.model}'s {' and '.join(missing)} "
                                 f"tower has none (e.g. a timm tower with timm_proj 'none'); use "
                                 f"--method flyp, or a model with projections")
            self.loss_fn = CaRotLoss(cfg.distill_weight, cfg.orth_weight, cfg.cross_weight,
                                     cfg.sigma_min_weight, family=self.family,
                                     **self._group_kwargs())
        if cfg.grad_checkpointing:
            models.set_grad_checkpointing(self.clip, True)
        self.scaler = steps.make_scaler(cfg.precision, self.device)
        objective = None if cfg.method == "ft" else steps.Objective(
            cfg.method, self.loss_fn, self.group, cfg.supervised_targets, self.family)
        self.stepper = steps.Stepper(cfg.method, student=self.student, wrapped=self.wrapped,
                                     clip=self.clip, teacher=self.teacher, objective=objective,
                                     device=self.device, precision=cfg.precision,
                                     micro_batch_size=cfg.micro_batch_size, scaler=self.scaler)

        self.streamed = isinstance(train_set, data.WebDatasetCaptions)
        self.sampler_args = dict(n=0 if self.streamed else len(train_set), global_batch=cfg.batch_size,
                                 rank=self.rank, world=self.world, seed=cfg.seed)
        if self.streamed:  # a stream has no length: an epoch is --train-num-samples (or the run)
            self.steps_per_epoch = (max(1, cfg.train_num_samples // cfg.batch_size)
                                    if cfg.train_num_samples else cfg.steps)
        else:
            self.steps_per_epoch = data.GlobalBatchSampler(**self.sampler_args).steps_per_epoch()
        self.total_steps = cfg.steps or cfg.epochs * self.steps_per_epoch
        self.optimizer = make_optimizer(self.student, cfg.lr, cfg.weight_decay)
        warmup = min(cfg.warmup, max(0, self.total_steps - 1))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: cosine_lr(s, self.total_steps, 1.0, warmup) if warmup else
            cosine_lr(s, self.total_steps, 1.0, 0))
        self.ema_schedule = ema.EmaSchedule(self.total_steps, cfg.ema_start, cfg.ema_end,
                                            cfg.ema_warmup, cfg.ema_every)
        self.step = 0
        self.out = Path(cfg.out)
        self.saved = None                  # (step, path) of the last checkpoint written or resumed
        self.monitor = data.UnreadableMonitor(cfg.max_unreadable, cfg.unreadable_window)
        self.signals = preempt.StopSignals()   # active while fit() runs
        self.flag_group = dist.cpu_group()     # the step-boundary agreement (created by every rank)
        if cfg.resume:
            self.load(cfg.resume)
        self.log = JsonLog(self.out / "log.jsonl", resume_at=self.step if cfg.resume else None)

    def report_config(self) -> dict:
        """The settings for results.json / report.md, with the loss family that ran."""
        return {**self.cfg.to_dict(), "loss_family": self.family}

    def _group_kwargs(self):
        """CaRotLoss takes the process group that makes its contrastive part global."""
        return {"process_group": self.group} if self.group is not None else {}

    # ---- checkpoints ----
    def save(self, path=None):
        if not dist.is_main():
            return
        extra = {"ft_head": self.student.head.detach()} if self.cfg.method == "ft" else {}
        if self.scaler is not None:
            extra["grad_scaler"] = self.scaler.state_dict()
        path = path or self.out / "checkpoint.pt"
        checkpoint.save(path, model=self.clip, teacher=self.teacher,
                        optimizer=self.optimizer, scheduler=self.scheduler, step=self.step,
                        config=self.cfg.to_dict(), extra=extra)
        self.saved = (self.step, str(path))

    def load(self, path):
        """Resume from a training checkpoint of the same method, model and trajectory settings
        (checkpoint.check_resumable; ValueError otherwise)."""
        state = checkpoint.load(path, self.device, what="resume")
        checkpoint.check_resumable(state, self.cfg.to_dict(), path)
        try:
            self.clip.load_state_dict(state["state_dict"])
            if self.teacher is not None:
                self.teacher.load_state_dict(state["teacher"])
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ValueError(f"resume: {str(path)!r} does not fit model {self.cfg.model} ({first})") from None
        if "ft_head" in state:
            with torch.no_grad():
                self.student.head.copy_(state["ft_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.step = state["step"]
        self.saved = (self.step, str(path))
        checkpoint.set_rng_state(state["rng"])

    def epoch_loader(self, epoch: int, start: int):
        """This rank's batches of `epoch` from batch `start` on (index sets: the global-batch
        sampler; WebDataset shards: the rank's stream)."""
        if self.streamed:
            return data.webdataset_loader(self.train_set, self.tokenizer, global_batch=self.cfg.batch_size,
                                          rank=self.rank, world=self.world, epoch=epoch, start_step=start,
                                          steps_per_epoch=self.steps_per_epoch, workers=self.cfg.workers,
                                          timeout=self.cfg.data_timeout)
        sampler = data.GlobalBatchSampler(**self.sampler_args, epoch=epoch, start_step=start)
        return data.train_loader(self.train_set, self.tokenizer, sampler, self.cfg.workers,
                                 self.cfg.data_timeout)

    def next_batch(self, batches):
        """(this rank's next batch, None) or (None, the DataStreamError that stops the run), or
        (None, None) at the end of the epoch. Every batch passes the unreadable-sample monitor."""
        try:
            with self.signals.fetch():
                batch = next(batches)
        except StopIteration:
            return None, None
        except RuntimeError as exc:
            error = exc if isinstance(exc, data.DataStreamError) else data.loader_failure(exc, self.cfg.data_timeout)
            if error is None:
                raise
            return None, error
        try:
            self.monitor.observe(batch["read"], batch["skipped"])
        except data.DataStreamError as exc:
            return None, exc
        return batch, None

    def boundary(self, error=None) -> tuple[int, bool]:
        """The step boundary every rank passes together: (the stop signal's number or 0, whether
        a rank's data failed), agreed by all ranks in one small CPU all-reduce (dist.agree); on
        one process, this process's own."""
        requested = signal.Signals[self.signals.requested].value if self.signals.requested else 0
        signum, failed = dist.agree([requested, error is not None], self.flag_group)
        return signum, bool(failed)

    def stop_if_signalled(self):
        """Before an evaluation: stop here when any rank has a signal pending (the evaluation
        waits for the resumed run), agreed as at a step boundary."""
        signum, _ = self.boundary()
        if signum:
            self.stop(signum, False)

    def stop(self, signum: int, failed: bool, error=None):
        """End the run at this step boundary: save a checkpoint (unless this step's is written)
        and raise Preempted (a signal; it wins, as a preemption signal also ends the loader
        workers where a cluster signals every process) or the DataStreamError (a rank's data
        failed)."""
        if not (self.saved and self.saved[0] == self.step):
            self.save()
        path = self.saved[1] if self.saved and dist.is_main() else None
        if signum:
            name = signal.Signals(signum).name
            self.log.write(step=self.step, event="preempted", signal=name)
            raise preempt.Preempted(name, self.step, self.total_steps, path)
        self.log.write(step=self.step, event="data_error", error=str(error) if error else "another rank")
        raise error or data.DataStreamError(f"train data: another rank's data stream failed at step "
                                            f"{self.step} (its error line names the files)")

    # ---- one step ----
    def train_step(self, batch) -> dict:
        """One optimiser step (plain, or feature-cached with --micro-batch-size; step.py).
        Returns the loss terms as detached 0-d tensors (step.materialise reads them at a log
        step) and "ema_momentum" when the teacher was updated."""
        self.student.train()
        self.optimizer.zero_grad(set_to_none=True)
        terms = self.stepper.forward_backward(batch, use_teacher=self.step > 0)
        if self.cfg.grad_clip:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        if self.teacher is not None and self.ema_schedule.should_update(self.step):
            momentum = self.ema_schedule.momentum(self.step)
            ema.ema_update(self.teacher, self.clip, momentum)
            terms["ema_momentum"] = momentum
        return terms

    # ---- evaluation ----
    def classifier(self):
        if self.cfg.method == "ft":
            return self.student.classify
        return ev.ZeroShotClassifier(self.clip, self.tokenizer, self.classnames, self.templates,
                                     self.device, self.cfg.precision)

    def evaluate(self):
        if not self.eval_sets:
            return None
        try:
            result = ev.evaluate(self.clip, self.classifier(), self.eval_sets, self.device,
                                 self.cfg.eval_batch_size, self.cfg.workers, id_first=self.id_first,
                                 precision=self.cfg.precision, timeout=self.cfg.data_timeout)
        except RuntimeError as exc:
            error = data.loader_failure(exc, self.cfg.data_timeout, "evaluation data")
            if error is None:
                raise
            raise error from exc
        self.log.write(step=self.step, eval=ev.public(result))
        return result

    # ---- the loop ----
    def fit(self, *, stop_on_signals: bool = True):
        """Train to the end (or --stop-after). SIGTERM / SIGUSR1 stop it at a step boundary with a
        checkpoint (preempt.Preempted; with stop_on_signals, the default; otherwise they keep
        their previous effect); training data that cannot make progress stops it the same way
        with data.DataStreamError. Ctrl-C, write errors (a full disk) and data errors propagate
        with a note naming the last checkpoint, which is complete (writes are atomic)."""
        try:
            with self.signals if stop_on_signals else contextlib.nullcontext():
                return self._fit()
        except (KeyboardInterrupt, OSError, data.DataStreamError) as exc:
            raise self._noted(exc)
        except RuntimeError as exc:   # a worker died mid-step (without stop_on_signals)
            error = data.loader_failure(exc, self.cfg.data_timeout)
            if error is None:
                raise
            raise self._noted(error) from exc

    def _noted(self, exc):
        where = (f"the last checkpoint is step {self.saved[0]}: {self.saved[1]} (continue with "
                 f"--resume {self.saved[1]})" if self.saved else "no checkpoint was written")
        if isinstance(exc, KeyboardInterrupt):
            exc.add_note(f"interrupted at step {self.step} of {self.total_steps}; {where}")
        elif dist.is_main():
            exc.add_note(where)
        return exc

    def _fit(self):
        cfg = self.cfg
        from .progress import Progress
        bar = Progress(self.total_steps, cfg.method, initial=self.step, every=cfg.log_every,
                       enabled=cfg.progress and dist.is_main())
        try:
            return self._loop(bar)
        finally:
            bar.close()

    def _loop(self, bar):
        cfg = self.cfg
        result, stop = None, cfg.stop_after
        eval_every = cfg.eval_every or self.steps_per_epoch
        save_every = cfg.save_every or self.steps_per_epoch
        mark, shown = (time.perf_counter(), self.step), {}
        while self.step < self.total_steps:
            epoch, start = divmod(self.step, self.steps_per_epoch)
            batches = iter(self.epoch_loader(epoch, start))
            while True:
                batch, error = self.next_batch(batches)
                if batch is None and error is None:
                    break                                   # the end of the epoch, on every rank
                signum, failed = self.boundary(error)
                if signum or failed:
                    self.stop(signum, failed, error)
                terms = self.train_step(batch)
                lr = self.scheduler.get_last_lr()[0]
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    # the loss terms stay on the device until here: one host sync per log step;
                    # samples/s over the steps since the last log (the sync ends them)
                    terms = steps.materialise(terms)
                    steps.check_finite_loss(terms, self.step)
                    now = time.perf_counter()
                    rate = cfg.batch_size * (self.step - mark[1]) / max(1e-9, now - mark[0])
                    mark = (now, self.step)
                    shown = dict(loss=f"{terms['loss']:.4f}", lr=f"{lr:.2e}", sps=f"{rate:.0f}")
                    self.log.write(step=self.step, epoch=epoch, lr=lr, samples_per_s=rate,
                                   train_unreadable=len(self.monitor.seen), **terms)
                bar.update(**shown)
                if self.step == self.total_steps or (stop is not None and self.step >= stop):
                    break
                if self.step % save_every == 0:
                    self.save()
                if self.step % eval_every == 0:
                    self.stop_if_signalled()
                    result = self.evaluate()
            if stop is not None and self.step >= stop and self.step < self.total_steps:
                self.save()
                return None
        self.save()
        self.stop_if_signalled()
        return self.evaluate()


def run(cfg: TrainConfig, **inject) -> dict | None:
    """Train, evaluate, and write results.json, the report and plots into cfg.out. Every
    argument is checked first (preflight.check) when the data come from the config."""
    if not inject:
        preflight.check(cfg, "train")
    trainer = Trainer(cfg, **inject)
    result = trainer.fit()
    if result is not None and dist.is_main():
        report.write_all(cfg.out, {cfg.method: result}, trainer.report_config())
    return result
