"""contrastive_loss: CLIP's symmetric InfoNCE (+ CaRot's self-distillation) without B x B logits.

How the work is split (docs/design.md has the derivation and the kernel contract):
- `ContrastiveInputs.validate` checks every argument ONCE, at the Python boundary (through the
  checks calrft_kernels/pairs.py shares with the sigmoid family), and returns a frozen, typed
  object; nothing below it validates user input again.
- `contrastive_terms` is the one composition: it turns validated inputs into the two terms
  (MCL and SD) from the statistics op plus O(B d) PyTorch (targets, labels, smoothing, the
  linear target terms, the process group). contrastive_loss, ClipLoss and CaRotLoss all call it.
- The statistics op `calrft::contrastive_stats` (torch.library: fake kernel, registered autograd,
  so the loss works under torch.compile) has one kernel per backend, all with one contract:
    "cpu"       C++ kernel (csrc/cpu/contrastive.cpp), tiles never stored
    "triton"    fused Triton kernels (calrft_kernels/triton/contrastive.py), tiles never stored
    "chunked"   row chunks: one GEMM per chunk into a bounded [C, B] buffer plus one fused pass
                (calrft_kernels/chunked.py); the default on CUDA
    "reference" the materialising float64-capable references (calrft_kernels/reference.py)
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor

from . import _backend
from ._checks import compute_dtype
from . import pairs
from .pairs import (GlobalBatch, Operands, Teacher, check_chunk_rows, check_feature_pair,
                    check_labels, check_scalar, check_teacher, check_tensor_scalars_finite,
                    check_weight, kernel_dtype)

__all__ = ["contrastive_loss", "contrastive_terms", "ContrastiveInputs", "ContrastiveTerms",
           "GlobalBatch", "Teacher", "contrastive_stats", "contrastive_stats_backward",
           "check_weight", "global_batch", "with_rows", "kernel_dtype"]


# --------------------------------------------------------------------------------------------
# The statistics op: one name, a kernel per backend, fake kernel, autograd.
# --------------------------------------------------------------------------------------------
def _n_stats(tq: Optional[Tensor]) -> int:
    return 1 if tq is None else 3


def _plain(*tensors):
    """Detached views: kernels are opaque to autograd (register_autograd differentiates them), and
    their worker threads do not inherit no_grad, so no input may carry requires_grad."""
    return [None if t is None else t.detach() for t in tensors]


def _kernels(backend: str, chunk_rows: int):
    """(forward, backward) of a concrete backend; every pair follows docs/design.md's contract:
    forward(q, k, scale, bias, tq, tk, tscale, with_cols) -> (row_stats, col_stats),
    backward(grad_row, grad_col, q, k, scale, bias, tq, tk, tscale, row_stats, col_stats,
             with_cols) -> (dq_u, dk_u)."""
    if backend == "cpu":
        mod, why = _backend.native()
        if mod is None:
            raise RuntimeError(why)
        return mod.contrastive_stats_forward_cpu, mod.contrastive_stats_backward_cpu
    if backend == "triton":
        from .triton import contrastive as triton_contrastive
        return triton_contrastive.stats_forward, triton_contrastive.stats_backward
    if backend == "chunked":
        from . import chunked
        return (functools.partial(chunked.stats_forward, chunk_rows=chunk_rows),
                functools.partial(chunked.stats_backward, chunk_rows=chunk_rows))
    if backend == "reference":
        from . import reference
        return reference.contrastive_stats_kernel, reference.contrastive_stats_backward_kernel
    raise ValueError(f"backend must be 'cpu', 'triton', 'chunked' or 'reference' for "
                     f"calrft::contrastive_stats, got {backend!r}")


@torch.library.custom_op("calrft::contrastive_stats", mutates_args=())
def contrastive_stats(q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, tq: Optional[Tensor],
                      tk: Optional[Tensor], tscale: Optional[Tensor], with_cols: bool,
                      backend: str, chunk_rows: int = 0) -> tuple[Tensor, Tensor]:
    """Row (and column) statistics of S = scale q k^T + bias; see docs/design.md.
    chunk_rows: rows per chunk of the "chunked" kernel (0: sized from chunked.MAX_BUFFER_BYTES)."""
    forward, _ = _kernels(backend, chunk_rows)
    return forward(*_plain(q, k, scale, bias, tq, tk, tscale), with_cols)


@contrastive_stats.register_fake
def _(q, k, scale, bias, tq, tk, tscale, with_cols, backend, chunk_rows=0):
    r, dtype = _n_stats(tq), compute_dtype(q.dtype)
    cols = k.shape[0] if with_cols else 0
    return q.new_empty((r, q.shape[0]), dtype=dtype), q.new_empty((r, cols), dtype=dtype)


@torch.library.custom_op("calrft::contrastive_stats_backward", mutates_args=())
def contrastive_stats_backward(grad_row: Tensor, grad_col: Tensor, q: Tensor, k: Tensor,
                               scale: Tensor, bias: Tensor, tq: Optional[Tensor],
                               tk: Optional[Tensor], tscale: Optional[Tensor], row_stats: Tensor,
                               col_stats: Tensor, with_cols: bool, backend: str,
                               chunk_rows: int = 0) -> tuple[Tensor, Tensor]:
    """(dS k, dS^T q) for the dS that the statistics' gradients imply (unscaled by `scale`)."""
    _, backward = _kernels(backend, chunk_rows)
    return backward(*_plain(grad_row, grad_col, q, k, scale, bias, tq, tk, tscale, row_stats,
                            col_stats), with_cols)


@contrastive_stats_backward.register_fake
def _(grad_row, grad_col, q, k, scale, bias, tq, tk, tscale, row_stats, col_stats, with_cols,
      backend, chunk_rows=0):
    dtype = compute_dtype(q.dtype)
    return q.new_empty(q.shape, dtype=dtype), k.new_empty(k.shape, dtype=dtype)


def _stats_setup_context(ctx, inputs, output):
    q, k, scale, bias, tq, tk, tscale, with_cols, backend, chunk_rows = inputs
    ctx.save_for_backward(q, k, scale, bias, tq, tk, tscale, *output)
    ctx.with_cols, ctx.backend, ctx.chunk_rows = with_cols, backend, chunk_rows


def _stats_backward(ctx, grad_row, grad_col):
    q, k, scale, bias, tq, tk, tscale, row_stats, col_stats = ctx.saved_tensors
    grad_row = torch.zeros_like(row_stats) if grad_row is None else grad_row.contiguous()
    grad_col = torch.zeros_like(col_stats) if grad_col is None else grad_col.contiguous()
    dq_u, dk_u = contrastive_stats_backward(grad_row, grad_col, q, k, scale, bias, tq, tk, tscale,
                                            row_stats, col_stats, ctx.with_cols, ctx.backend,
                                            ctx.chunk_rows)
    # dS_ij = sum of softmax-weighted rows/columns: d scale = sum_ij dS_ij (q_i . k_j) and
    # d bias = sum_ij dS_ij, where every softmax row sums to one.
    # A dot product and in-place scaling keep the peak at dq_u, dk_u: no extra [B, d]
    # temporaries (B = 65536, d = 512: 3 x 128 MiB saved).
    dscale = torch.vdot(q.reshape(-1).to(dq_u.dtype), dq_u.reshape(-1)).to(scale.dtype)
    dq = dq_u.mul_(scale).to(q.dtype)
    dk = dk_u.mul_(scale).to(k.dtype)
    dbias = grad_row[0].sum() + grad_col[0].sum()
    if tq is not None:  # statistic 2 (teacher-weighted S) also moves with the bias
        dbias = dbias + grad_row[2].sum() + grad_col[2].sum()
    dbias = dbias.to(bias.dtype)
    return dq, dk, dscale, dbias, None, None, None, None, None, None


contrastive_stats.register_autograd(_stats_backward, setup_context=_stats_setup_context)


# --------------------------------------------------------------------------------------------
# Typed inputs and results
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ContrastiveInputs:
    """Validated arguments of contrastive_loss (build with `ContrastiveInputs.validate`).

    teacher is None exactly when there is no distillation term (distill_weight == 0); backend
    is concrete (never "auto"); chunk_rows is 0 for "size from chunked.MAX_BUFFER_BYTES"."""
    image: Tensor
    text: Tensor
    scale: Union[Tensor, float]
    bias: Union[Tensor, float, None]
    labels: Optional[Tensor]
    label_smoothing: float
    teacher: Optional[Teacher]
    distill_weight: float
    process_group: Any
    backend: str
    chunk_rows: int = 0

    @classmethod
    def validate(cls, image_features, text_features, logit_scale, logit_bias=None, *,
                 labels=None, label_smoothing=0.0, teacher_image_features=None,
                 teacher_text_features=None, teacher_logit_scale=None, distill_weight=0.0,
                 process_group=None, backend="auto", chunk_rows=None) -> "ContrastiveInputs":
        """Check every argument of contrastive_loss (api.md); raise TypeError / ValueError
        naming the argument. The teacher is used iff distill_weight > 0."""
        image, text = check_feature_pair(image_features, text_features)
        scale = check_scalar("logit_scale", logit_scale, image.device)
        bias = check_scalar("logit_bias", logit_bias, image.device, optional=True)
        labels = check_labels(labels, image.shape[0], image.device)
        label_smoothing = check_weight("label_smoothing", label_smoothing, upper=1.0)
        distill_weight = check_weight("distill_weight", distill_weight)
        teacher = check_teacher(image, distill_weight, teacher_image_features,
                                teacher_text_features, teacher_logit_scale)
        check_tensor_scalars_finite({"logit_scale": scale, "logit_bias": bias,
                                     "teacher_logit_scale": teacher and teacher.scale})
        chunk_rows = check_chunk_rows(chunk_rows)
        backend = _backend.resolve(backend, image.device, "contrastive_loss",
                                   cuda_symbol="contrastive_stats_forward_cuda",
                                   auto_cuda="chunked", chunked=True)
        if backend == "triton" and image.dtype == torch.float64:
            raise TypeError("backend='triton' computes in float32 at most; pass float32/16 or "
                            "bfloat16 features, or use backend='cpu'/'chunked'/'reference' for "
                            "float64")
        return cls(image, text, scale, bias, labels, label_smoothing, teacher, distill_weight,
                   process_group, backend, chunk_rows)


@dataclass(frozen=True)
class ContrastiveTerms:
    """contrastive: MCL (0.5 (CE_rows + CE_cols)); distillation: SD (soft CE of both
    directions) or None without a teacher. Both 0-dim, in the statistics dtype."""
    contrastive: Tensor
    distillation: Optional[Tensor]

    def total(self, distill_weight: float) -> Tensor:
        if self.distillation is None:
            return self.contrastive
        return self.contrastive + distill_weight * self.distillation


def global_batch(inputs: ContrastiveInputs) -> GlobalBatch:
    """The batch of the api.md convention (pairs.global_batch): single process, the inputs
    themselves; with a process group, every rank's image and text rows gathered with autograd
    (labels and teacher without)."""
    return pairs.global_batch(inputs.image, inputs.text, inputs.labels, inputs.teacher,
                              inputs.process_group)


# --------------------------------------------------------------------------------------------
# The composition: the loss terms from the statistics.
# --------------------------------------------------------------------------------------------
def _target_logits(q: Tensor, keys: Tensor, offset: int, scale: Tensor, bias: Tensor,
                   labels_all: Optional[Tensor], label_smoothing: float) -> Tensor:
    """sum_j Y_ij S_ij for the rows offset..offset+len(q) of the global batch: the linear part of
    each CE term. Y K is a row gather (identity targets) or a class mean (labels): O(B d)."""
    rows = slice(offset, offset + q.shape[0])
    if labels_all is None:
        yk = keys[rows]
    else:
        classes, inverse = torch.unique(labels_all, return_inverse=True)
        sums = keys.new_zeros(classes.shape[0], keys.shape[1]).index_add_(0, inverse, keys)
        counts = torch.bincount(inverse, minlength=classes.shape[0]).to(keys.dtype)
        yk = (sums / counts[:, None])[inverse[rows]]
    if label_smoothing:
        yk = (1.0 - label_smoothing) * yk + label_smoothing * keys.mean(0)
    return scale * (q * yk).sum(1) + bias


def _direction_terms(stats: Tensor, q: Tensor, keys: Tensor, offset: int, scale: Tensor,
                     bias: Tensor, labels_all, label_smoothing: float, teacher: bool):
    """(mean CE, mean soft CE or None) of one direction from its statistics and linear terms."""
    lse = stats[0]
    target = _target_logits(q, keys, offset, scale, bias, labels_all, label_smoothing)
    ce = (lse - target).mean()
    soft_ce = (lse - stats[2]).mean() if teacher else None
    return ce, soft_ce


def contrastive_terms(inputs: ContrastiveInputs,
                      batch: Optional[GlobalBatch] = None) -> ContrastiveTerms:
    """MCL and SD of the local rows (inputs.image / inputs.text) against `batch` (default: the
    api.md convention, `global_batch(inputs)`): one statistics pass per direction group.

    Single process (batch rows are the local rows): one op call with row and column statistics.
    Local rows of a larger batch: one call per direction with row statistics only."""
    batch = global_batch(inputs) if batch is None else batch
    image, text, backend = inputs.image, inputs.text, inputs.backend
    ops = Operands.of(image, backend)
    cast = ops.cast
    scale = ops.scalar(inputs.scale)
    bias = ops.scalar(0.0 if inputs.bias is None else inputs.bias)
    teacher = batch.teacher
    tscale = None if teacher is None else ops.scalar(teacher.scale).detach()
    img, txt = cast(image), cast(text)
    stats = functools.partial(contrastive_stats, backend=backend, chunk_rows=inputs.chunk_rows)
    offset = batch.offset
    if batch.image is image and batch.text is text:
        tq, tk = (None, None) if teacher is None else (cast(teacher.image), cast(teacher.text))
        row_stats, col_stats = stats(img, txt, scale, bias, tq, tk, tscale, True)
        img_all, txt_all = img, txt
    else:
        img_all, txt_all = cast(batch.image), cast(batch.text)
        rows = slice(offset, offset + image.shape[0])
        tq = tk = tq_t = tk_t = None
        if teacher is not None:
            tq, tk = cast(teacher.image[rows]), cast(teacher.text)
            tq_t, tk_t = cast(teacher.text[rows]), cast(teacher.image)
        row_stats, _ = stats(img, txt_all, scale, bias, tq, tk, tscale, False)
        col_stats, _ = stats(txt, img_all, scale, bias, tq_t, tk_t, tscale, False)
    up = lambda x: x.to(ops.acc)  # noqa: E731  (linear terms accumulate like the kernels)
    common = (scale, bias, batch.labels, inputs.label_smoothing, teacher is not None)
    ce_i, sd_i = _direction_terms(row_stats, up(img), up(txt_all), offset, *common)
    ce_t, sd_t = _direction_terms(col_stats, up(txt), up(img_all), offset, *common)
    return ContrastiveTerms(0.5 * (ce_i + ce_t), None if teacher is None else sd_i + sd_t)


def contrastive_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None,
                     *, labels: Optional[Tensor] = None, label_smoothing: float = 0.0,
                     teacher_image_features: Optional[Tensor] = None,
                     teacher_text_features: Optional[Tensor] = None, teacher_logit_scale=None,
                     distill_weight: float = 0.0, process_group=None,
                     backend: str = "auto", chunk_rows: Optional[int] = None) -> Tensor:
    """CLIP's symmetric contrastive loss (+ CaRot's self-distillation), fused: nothing B x B is
    allocated (except by backend="reference"). Semantics: docs/api.md.

    image_features, text_features: [B, d] (normalised by the caller); logit_scale: the multiplier
    (open_clip's logit_scale.exp()); logit_bias: added to every logit; labels: [B] ints for
    multi-positive targets; label_smoothing: e in [0, 1); teacher_*: EMA-teacher features and
    scale, used when distill_weight > 0 (never get gradients); process_group: each rank passes
    its local rows and gets the loss of those rows against the global batch; backend: "auto"
    ("chunked" on CUDA tensors, "cpu" on CPU tensors), "chunked", "triton", "cpu", "cuda" (no
    CUDA C++ kernel exists for this op: raises) or "reference"; chunk_rows: rows per chunk of the
    "chunked" backend (its [chunk_rows, B] fp32 buffer bounds the extra memory; default: sized
    from calrft_kernels.chunked.MAX_BUFFER_BYTES, see docs/design.md).
    Returns a 0-dim tensor in the features' dtype.
    """
    inputs = ContrastiveInputs.validate(
        image_features, text_features, logit_scale, logit_bias, labels=labels,
        label_smoothing=label_smoothing, teacher_image_features=teacher_image_features,
        teacher_text_features=teacher_text_features, teacher_logit_scale=teacher_logit_scale,
        distill_weight=distill_weight, process_group=process_group, backend=backend,
        chunk_rows=chunk_rows)
    return contrastive_terms(inputs).total(inputs.distill_weight).to(inputs.image.dtype)


def with_rows(inputs: ContrastiveInputs, image: Tensor, text: Tensor) -> ContrastiveInputs:
    """The same validated options for other (already checked) rows, e.g. ClipLoss's non-local
    modes, where every rank computes the whole global batch's loss."""
    return dataclasses.replace(inputs, image=image, text=text)
