"""One optimiser step's forward and backward: plain, or with feature caching (GradCache).

Both steps compose the same loss (`Objective`, the package's ops from calrft.ops) and leave the
gradients of the same objective in the parameters; the trainer then clips, steps and updates the
EMA teacher the same way after either.

Plain step: one graph over this rank's batch (activation memory grows with the batch).

Feature-cached step (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup"; open_clip's --accum-freq is the same idea), for a contrastive batch far beyond
what one graph fits:
  1. pass 1, no graphs: the student's features (and the teacher's: it runs once per sample) for
     the whole per-rank batch, micro-batch by micro-batch, the random state before each
     micro-batch saved;
  2. the loss of the whole batch on those features as leaves (global across ranks through the
     op's process group), backward: the gradients w.r.t. the features and the scale, O(B d)
     memory with the fused ops; the parameter terms (orthogonality, cross) and the optional
     sigma_min term are part of that one loss, so they count once;
  3. pass 2: each micro-batch forward again with a graph, its random state restored (dropout
     replays the masks of pass 1, so the features are the ones the loss saw), backward with its
     slice of the feature gradients (the scale's gradient with the last micro-batch). Under DDP
     every micro-batch but the last runs under no_sync, so gradients are all-reduced once.
Peak memory: one micro-batch's activations plus O(B d) features and loss state; the batch itself
may stay on the host (each micro-batch is moved to the device when it runs). The random state
after the step is the one pass 1 left, as if the student had run once.

Batch-norm layers (open_clip's ResNet towers) normalise each micro-batch by its own statistics,
as under any gradient accumulation; their running statistics are updated once per micro-batch
(pass 1's update; pass 2's is undone).

--method ft has no batch-coupled loss: cross-entropy is a per-sample mean, so micro-batch
gradient accumulation (each micro-batch's summed loss over the whole batch size) is exact and
needs no cache.

Nothing here converts a tensor to a Python number: the returned loss terms are detached 0-d
tensors, read by the caller only at a log step (no host synchronisation per step)."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import models
from .ops import CaRotLoss, contrastive_loss, device_checks, sigmoid_loss

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
METHODS = ("carot", "flyp", "ft")
LOSSES = ("auto", "softmax", "sigmoid")   # --loss: the contrastive family of carot / flyp


# ---- precision -------------------------------------------------------------------------------

def autocast_dtype(precision: str, device) -> torch.dtype | None:
    """The autocast dtype of a precision setting on a device: "auto" is bf16 on CUDA and fp32
    (no autocast) on CPU; "bf16" / "fp16" autocast on any device; "fp32" never."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def autocast(device, precision: str = "auto"):
    """The autocast context of `precision` on `device` (a null context for fp32)."""
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def make_scaler(precision: str, device):
    """A gradient scaler for fp16 (its range needs one), None otherwise."""
    if autocast_dtype(precision, device) != torch.float16:
        return None
    return torch.amp.GradScaler(torch.device(device).type)


# ---- random state ------------------------------------------------------------------------------

class RngState:
    """The generators a forward pass draws from (dropout, patch dropout): the CPU generator and,
    on a CUDA device, that device's generator."""

    def __init__(self, device):
        device = torch.device(device)
        self.cuda = device if device.type == "cuda" else None

    def capture(self):
        return (torch.get_rng_state(),
                torch.cuda.get_rng_state(self.cuda) if self.cuda is not None else None)

    def restore(self, state) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.cuda)


# ---- the loss ----------------------------------------------------------------------------------

def loss_family(setting: str, model) -> str:
    """The contrastive family of --loss `setting` for `model`: "auto" is "sigmoid" for a model
    with a logit bias (SigLIP-style: open_clip builds one from init_logit_bias, as
    open_clip_train's --siglip does) and "softmax" otherwise."""
    if setting not in LOSSES:
        raise ValueError(f"loss: expected one of {', '.join(LOSSES)}, got {setting!r}")
    if setting == "auto":
        return "sigmoid" if models.logit_bias(models.unwrap(model)) is not None else "softmax"
    return setting


@dataclass(frozen=True)
class Features:
    """What a CLIP forward gives the loss: image and text features, the logit scale (the
    multiplier exp(logit_scale)) and the logit bias (None for a model without one)."""
    image: torch.Tensor
    text: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None = None

    @classmethod
    def of(cls, outputs) -> "Features":
        """From an open_clip CLIP forward: (image, text, scale[, bias]) or its output_dict."""
        if isinstance(outputs, dict):
            return cls(outputs["image_features"], outputs["text_features"],
                       outputs["logit_scale"], outputs.get("logit_bias"))
        return cls(*outputs[:3], outputs[3] if len(outputs) > 3 else None)


@dataclass
class Objective:
    """The loss of a batch of (image, text) features: the one composition both steps use.

    flyp: the family's loss (contrastive_loss or sigmoid_loss); carot: CaRotLoss of that family
    (contrastive + distillation + the parameter terms of `clip`'s projections + the optional
    sigma_min term). All are global across ranks through `process_group` (each rank passes its
    local rows). The softmax family ignores a logit bias (a constant shift under the softmax,
    as open_clip's ClipLoss does); the sigmoid family uses the student's and the teacher's."""
    method: str
    carot_loss: CaRotLoss | None = None
    process_group: object = None
    supervised_targets: bool = False
    family: str = "softmax"

    def __post_init__(self):
        if self.method not in ("carot", "flyp"):
            raise ValueError(f"method: the contrastive objective is carot or flyp, got {self.method!r}")
        if self.family not in LOSSES[1:]:
            raise ValueError(f"family: expected softmax or sigmoid, got {self.family!r}")
        if self.method == "carot" and self.carot_loss is None:
            raise ValueError("carot_loss: method carot needs a CaRotLoss")
        if self.carot_loss is not None and self.carot_loss.family != self.family:
            raise ValueError(f"carot_loss: its family {self.carot_loss.family!r} is not the "
                             f"objective's {self.family!r}")

    def __call__(self, student: Features, *, labels=None, teacher: Features | None = None,
                 clip=None) -> dict:
        """{term: 0-d tensor} with "total", the loss to differentiate. The ops' checks that would
        synchronise with a GPU (finiteness of the logit scale and the projections) are skipped:
        a non-finite value shows as a non-finite loss, which the trainer checks at log steps."""
        with device_checks(False):
            return self._terms(student, labels=labels, teacher=teacher, clip=clip)

    def _terms(self, f: Features, *, labels, teacher, clip) -> dict:
        targets = labels if self.supervised_targets else None
        sigmoid = self.family == "sigmoid"
        bias = f.bias if sigmoid else None
        if self.method == "flyp":
            fused = sigmoid_loss if sigmoid else contrastive_loss
            loss = fused(f.image, f.text, f.scale, bias, labels=targets,
                         process_group=self.process_group)
            return {"contrastive": loss, "total": loss}
        kwargs = {}
        if teacher is not None:
            kwargs = dict(teacher_image_features=teacher.image, teacher_text_features=teacher.text,
                          teacher_logit_scale=teacher.scale)
            if sigmoid:  # the soft targets sigmoid(T) use the teacher's own bias (0 without one)
                kwargs["teacher_logit_bias"] = 0.0 if teacher.bias is None else teacher.bias
        out = self.carot_loss(f.image, f.text, f.scale, visual_proj=models.visual_projection(clip),
                              text_proj=models.text_projection(clip), labels=targets,
                              logit_bias=bias, output_dict=True, **kwargs)
        return {k: v for k, v in out.items() if torch.is_tensor(v) and v.ndim == 0}


# ---- the steps ---------------------------------------------------------------------------------

def spans(n: int, micro: int | None) -> list[tuple[int, int]]:
    """[lo, hi) row ranges of the micro-batches of n rows (the last may be shorter); one span when
    micro is None or >= n."""
    if micro is None or micro >= n:
        return [(0, n)]
    if micro < 1:
        raise ValueError(f"micro_batch_size: must be >= 1, got {micro}")
    return [(lo, min(n, lo + micro)) for lo in range(0, n, micro)]


class Stepper:
    """Forward and backward of one step (gradients left in the parameters, scaled by `scaler`
    when one is given); returns the detached loss terms.

    student: the module trained (the CLIP model, or ft's classifier); wrapped: the same under DDP
    (or the student itself); clip: the CLIP model inside (its projections enter CaRot's parameter
    terms); teacher: the EMA teacher or None; objective: the contrastive loss (carot / flyp);
    micro_batch_size: rows per micro-batch of the cached step (None: the plain step)."""

    def __init__(self, method, *, student, wrapped=None, clip=None, teacher=None, objective=None,
                 device="cpu", precision="auto", micro_batch_size=None, scaler=None):
        if method not in METHODS:
            raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
        if method != "ft" and objective is None:
            raise ValueError(f"objective: method {method} needs its Objective")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size: must be >= 1, got {micro_batch_size}")
        autocast_dtype(precision, device)  # validates
        self.method, self.student = method, student
        self.wrapped = wrapped if wrapped is not None else student
        self.clip = clip if clip is not None else student
        self.teacher, self.objective = teacher, objective
        self.device, self.precision = device, precision
        self.micro_batch_size, self.scaler = micro_batch_size, scaler
        self.rng = RngState(device)
        # batch-norm layers (open_clip's ResNet towers) update running statistics in every
        # train-mode forward: the cached step keeps pass 1's updates only (one per micro-batch)
        self.norms = [m for m in self.student.modules()
                      if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]

    # -- helpers
    def autocast(self):
        return autocast(self.device, self.precision)

    def _backward(self, loss, inputs=None, grads=None):
        if inputs is not None:
            torch.autograd.backward(inputs, grads)
        elif self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def _to(self, x):
        return x.to(self.device, non_blocking=True)

    def _sync(self, last: bool):
        """DDP reduces gradients in the backward of the last micro-batch only."""
        no_sync = getattr(self.wrapped, "no_sync", None)
        return contextlib.nullcontext() if last or no_sync is None else no_sync()

    @torch.no_grad()
    def _teacher(self, images, texts) -> Features:
        with self.autocast():
            return Features.of(self.teacher(images, texts))

    # -- the step
    def forward_backward(self, batch, *, use_teacher: bool = True) -> dict:
        """Gradients of the step's loss into the parameters; {term: detached 0-d tensor} with
        "loss" (the total). use_teacher: distil from the teacher (CaRot starts after step 0)."""
        images, texts = batch["images"], batch.get("texts")
        labels = batch["labels"].to(self.device, non_blocking=True)
        use_teacher = use_teacher and self.teacher is not None and self.method == "carot"
        parts = spans(images.shape[0], self.micro_batch_size)
        if len(parts) == 1:  # the cached steps move each micro-batch (the batch may not fit)
            images = self._to(images)
            texts = None if texts is None else self._to(texts)
        if self.method == "ft":
            terms = self._ft(images, labels, parts)
        elif len(parts) == 1:
            terms = self._plain(images, texts, labels, use_teacher)
        else:
            terms = self._cached(images, texts, labels, use_teacher, parts)
        return {k: v.detach() for k, v in terms.items()}

    def _ft(self, images, labels, parts):
        """Cross-entropy, a per-sample mean: micro-batches accumulate sum / B exactly."""
        n, total = images.shape[0], None
        for k, (lo, hi) in enumerate(parts):
            with self._sync(k == len(parts) - 1):
                with self.autocast():
                    logits = self.wrapped(self._to(images[lo:hi]))
                logits = logits if logits.dtype == torch.float64 else logits.float()
                loss = F.cross_entropy(logits, labels[lo:hi], reduction="sum") / n
                self._backward(loss)
            total = loss.detach() if total is None else total + loss.detach()
        return {"ce": total, "loss": total}

    def _plain(self, images, texts, labels, use_teacher):
        with self.autocast():
            student = Features.of(self.wrapped(images, texts))
        teacher = self._teacher(images, texts) if use_teacher else None
        terms = self.objective(student, labels=labels, teacher=teacher, clip=self.clip)
        self._backward(terms["total"])
        terms["loss"] = terms["total"]
        return terms

    def _cached(self, images, texts, labels, use_teacher, parts):
        # pass 1: features of every micro-batch without graphs, the random state before each
        states, student, teacher = [], [], []
        with torch.no_grad():
            for lo, hi in parts:
                states.append(self.rng.capture())
                x, y = self._to(images[lo:hi]), self._to(texts[lo:hi])
                with self.autocast():
                    student.append(Features.of(self.student(x, y)))
                if use_teacher:
                    teacher.append(self._teacher(x, y))
        after = self.rng.capture()
        norm_state = [{k: v.clone() for k, v in m.state_dict().items()} for m in self.norms]
        # the loss of the whole batch and its gradients w.r.t. the features, the scale and the
        # bias (O(B d)); the scalars are the last micro-batch's (the same module parameters)
        leaves = _joined(student, leaf=True)
        terms = self.objective(leaves, labels=labels, clip=self.clip,
                               teacher=_joined(teacher) if use_teacher else None)
        self._backward(terms["total"])
        terms["loss"] = terms["total"]
        grads = Features(leaves.image.grad, leaves.text.grad, leaves.scale.grad,
                         None if leaves.bias is None else leaves.bias.grad)
        del leaves, student, teacher
        # pass 2: each micro-batch again with a graph, its pass-1 random state replayed
        for k, (lo, hi) in enumerate(parts):
            last = k == len(parts) - 1
            self.rng.restore(states[k])
            with self._sync(last):
                with self.autocast():
                    f = Features.of(self.wrapped(self._to(images[lo:hi]), self._to(texts[lo:hi])))
                outputs, out_grads = [f.image, f.text], [grads.image[lo:hi], grads.text[lo:hi]]
                if last:  # a scalar without a gradient (the softmax family's bias) is not used
                    for value, grad in ((f.scale, grads.scale), (f.bias, grads.bias)):
                        if grad is not None:
                            outputs.append(value)
                            out_grads.append(grad.to(value.dtype))
                self._backward(None, outputs, out_grads)
        self.rng.restore(after)
        for m, state in zip(self.norms, norm_state):
            m.load_state_dict(state)
        return terms


def _joined(parts: list[Features], leaf: bool = False) -> Features:
    """The micro-batches' features as one batch (the scalars of the last); leaf: every tensor a
    fresh leaf that requires grad (the cached step's loss differentiates w.r.t. them)."""
    last = parts[-1]
    joined = Features(torch.cat([p.image for p in parts]), torch.cat([p.text for p in parts]),
                      last.scale, last.bias)
    if not leaf:
        return joined
    return Features(*(None if t is None else t.detach().requires_grad_()
                      for t in (joined.image, joined.text, joined.scale, joined.bias)))


def materialise(terms: dict) -> dict:
    """Loss terms as Python floats (one host synchronisation): for a log step."""
    tensors = {k: v for k, v in terms.items() if torch.is_tensor(v)}
    if not tensors:
        return dict(terms)
    values = torch.stack([v.detach().float().reshape(()) for v in tensors.values()]).cpu().tolist()
    out = dict(terms)
    out.update(zip(tensors, values))
    return out


def check_finite_loss(terms: dict, step: int) -> None:
    """Raise FloatingPointError when a materialised loss term is NaN or infinite (the ops skip
    their synchronising checks inside a step, so a diverged run is caught here, at a log step)."""
    bad = {k: v for k, v in terms.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        raise FloatingPointError(
            f"the loss is not finite at step {step} ({', '.join(f'{k}={v}' for k, v in bad.items())}): "
            f"training diverged (lower --lr, or check the data and --precision)")
