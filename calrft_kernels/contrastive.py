"""contrastive_loss: CLIP's symmetric InfoNCE (+ CaRot's self-distillation) without B x B logits.

How the work is split (docs/design.md has the derivation):
- The kernels (C++ on CPU, Triton on GPU) compute only per-row and per-column statistics of the
  logits tiles: log-sum-exp of S, and with a teacher the log-sum-exp of T and sum softmax(T) S.
  They are wrapped here as the torch.library op `calrft::contrastive_stats` (fake kernel and
  autograd registered, so the loss works under torch.compile).
- Everything else - validation, dtype rules, targets (identity / labels / smoothing), the linear
  target terms, weights, the process group - is O(B d) PyTorch shared by every backend.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import Tensor

from . import _backend
from .distributed import gather_no_grad, gather_with_grad, world
from .reference import contrastive_loss_reference

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# The statistics op: one name, a kernel per device, fake kernel, autograd.
# --------------------------------------------------------------------------------------------
def _n_stats(tq: Optional[Tensor]) -> int:
    return 1 if tq is None else 3


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and gradients accumulate in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _plain(*tensors):
    """Detached views: kernels are opaque to autograd (register_autograd differentiates them), and
    their worker threads do not inherit no_grad, so no input may carry requires_grad."""
    return [None if t is None else t.detach() for t in tensors]


def _kernels(backend: str):
    """(forward, backward) launchers of a concrete backend; both follow docs/design.md."""
    if backend == "cpu":
        mod, why = _backend.native()
        if mod is None:
            raise RuntimeError(why)
        return mod.contrastive_stats_forward_cpu, mod.contrastive_stats_backward_cpu
    if backend == "triton":
        from .triton import contrastive as triton_contrastive
        return triton_contrastive.stats_forward, triton_contrastive.stats_backward
    raise ValueError(f"backend must be 'cpu' or 'triton' for calrft::contrastive_stats, got {backend!r}")


@torch.library.custom_op("calrft::contrastive_stats", mutates_args=())
def contrastive_stats(q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, tq: Optional[Tensor],
                      tk: Optional[Tensor], tscale: Optional[Tensor], with_cols: bool,
                      backend: str) -> tuple[Tensor, Tensor]:
    """Row (and column) statistics of S = scale q k^T + bias; see docs/design.md."""
    forward, _ = _kernels(backend)
    return forward(*_plain(q, k, scale, bias, tq, tk, tscale), with_cols)


@contrastive_stats.register_fake
def _(q, k, scale, bias, tq, tk, tscale, with_cols, backend):
    r, dtype = _n_stats(tq), _stats_dtype(q.dtype)
    cols = k.shape[0] if with_cols else 0
    return q.new_empty((r, q.shape[0]), dtype=dtype), q.new_empty((r, cols), dtype=dtype)


@torch.library.custom_op("calrft::contrastive_stats_backward", mutates_args=())
def contrastive_stats_backward(grad_row: Tensor, grad_col: Tensor, q: Tensor, k: Tensor,
                               scale: Tensor, bias: Tensor, tq: Optional[Tensor],
                               tk: Optional[Tensor], tscale: Optional[Tensor], row_stats: Tensor,
                               col_stats: Tensor, with_cols: bool,
                               backend: str) -> tuple[Tensor, Tensor]:
    """(dS k, dS^T q) for the dS that the statistics' gradients imply (unscaled by `scale`)."""
    _, backward = _kernels(backend)
    return backward(*_plain(grad_row, grad_col, q, k, scale, bias, tq, tk, tscale, row_stats,
                            col_stats), with_cols)


@contrastive_stats_backward.register_fake
def _(grad_row, grad_col, q, k, scale, bias, tq, tk, tscale, row_stats, col_stats, with_cols,
      backend):
    dtype = _stats_dtype(q.dtype)
    return q.new_empty(q.shape, dtype=dtype), k.new_empty(k.shape, dtype=dtype)


def _stats_setup_context(ctx, inputs, output):
    q, k, scale, bias, tq, tk, tscale, with_cols, backend = inputs
    ctx.save_for_backward(q, k, scale, bias, tq, tk, tscale, *output)
    ctx.with_cols, ctx.backend = with_cols, backend


def _stats_backward(ctx, grad_row, grad_col):
    q, k, scale, bias, tq, tk, tscale, row_stats, col_stats = ctx.saved_tensors
    grad_row = torch.zeros_like(row_stats) if grad_row is None else grad_row.contiguous()
    grad_col = torch.zeros_like(col_stats) if grad_col is None else grad_col.contiguous()
    dq_u, dk_u = contrastive_stats_backward(grad_row, grad_col, q, k, scale, bias, tq, tk, tscale,
                                            row_stats, col_stats, ctx.with_cols, ctx.backend)
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
    return dq, dk, dscale, dbias, None, None, None, None, None


contrastive_stats.register_autograd(_stats_backward, setup_context=_stats_setup_context)


# --------------------------------------------------------------------------------------------
# Validation: one function for every backend.
# --------------------------------------------------------------------------------------------
def _check_features(name: str, x, like: Optional[Tensor] = None) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [batch, dim], got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must have at least one row and one column, got shape {tuple(x.shape)}")
    if like is not None:
        if x.shape[0] != like.shape[0]:
            raise ValueError(f"{name} has {x.shape[0]} rows but image_features has {like.shape[0]}")
        if x.device != like.device:
            raise ValueError(f"{name} is on {x.device} but image_features is on {like.device}")
    return x


def _check_scalar(name: str, value, device, optional: bool = False):
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} is required")
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar (0-dim tensor or float), got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the features are on {device}")
        return value.reshape(())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{name} must be finite, got {value}")
        return float(value)
    raise TypeError(f"{name} must be a float or a 0-dim tensor, got {type(value).__name__}")


def _check_labels(labels, batch: int, device) -> Optional[Tensor]:
    if labels is None:
        return None
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but the features are on {device}")
    return labels


def _check_weight(name: str, value, upper: Optional[float] = None) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not value >= 0.0 or value == float("inf") or (upper is not None and not value < upper):
        bound = f"[0, {upper})" if upper is not None else "[0, inf)"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return value


def _check_teacher(timg, ttxt, tscale, distill_weight: float, image: Tensor):
    if distill_weight == 0.0:
        return None
    if timg is None or ttxt is None or tscale is None:
        raise ValueError("distill_weight > 0 needs teacher_image_features, teacher_text_features "
                         "and teacher_logit_scale")
    timg = _check_features("teacher_image_features", timg, image)
    ttxt = _check_features("teacher_text_features", ttxt, image)
    if timg.shape[1] != ttxt.shape[1]:
        raise ValueError(f"teacher_image_features and teacher_text_features differ in width: "
                         f"{timg.shape[1]} vs {ttxt.shape[1]}")
    tscale = _check_scalar("teacher_logit_scale", tscale, image.device)
    return timg.detach(), ttxt.detach(), (tscale.detach() if isinstance(tscale, Tensor) else tscale)


# --------------------------------------------------------------------------------------------
# The loss, composed from the statistics.
# --------------------------------------------------------------------------------------------
def _as_scalar_tensor(value, dtype, device) -> Tensor:
    if isinstance(value, Tensor):
        return value.to(dtype)
    return torch.tensor(value, dtype=dtype, device=device)


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


def _kernel_dtype(x: Tensor, backend: str) -> torch.dtype:
    """The C++ kernel reads float32/float64; Triton reads half and bfloat16 natively."""
    if backend == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return x.dtype


def _direction_terms(row_stats: Tensor, q: Tensor, keys: Tensor, offset: int, scale: Tensor,
                     bias: Tensor, labels_all, label_smoothing: float, teacher: bool):
    """(mean CE, mean soft CE) of one direction from its statistics and linear terms."""
    lse = row_stats[0]
    target = _target_logits(q, keys, offset, scale, bias, labels_all, label_smoothing)
    ce = (lse - target).mean()
    soft_ce = (lse - row_stats[2]).mean() if teacher else None
    return ce, soft_ce


def _contrastive_terms(image: Tensor, text: Tensor, image_all: Tensor, text_all: Tensor,
                       offset: int, scale, bias, labels_all, label_smoothing: float, teacher,
                       backend: str) -> dict:
    """{"contrastive": MCL, "distillation": SD or None} for the local rows image/text (which
    start at `offset` of image_all/text_all). Single process: image is image_all, offset 0."""
    kdtype = _kernel_dtype(image, backend)
    sdtype = _stats_dtype(kdtype)
    device = image.device
    scale_t = _as_scalar_tensor(scale, sdtype, device)
    bias_t = _as_scalar_tensor(0.0 if bias is None else bias, sdtype, device)
    cast = lambda x: x.to(kdtype).contiguous()  # noqa: E731
    img, txt = cast(image), cast(text)
    tq = tk = tscale_t = None
    if teacher is not None:
        timg_all, ttxt_all, tscale = teacher
        tscale_t = _as_scalar_tensor(tscale, sdtype, device).detach()
    single = image_all is image
    if single:
        tq, tk = (None, None) if teacher is None else (cast(timg_all), cast(ttxt_all))
        row_stats, col_stats = contrastive_stats(img, txt, scale_t, bias_t, tq, tk, tscale_t,
                                                 True, backend)
        img_all, txt_all = img, txt
    else:
        img_all, txt_all = cast(image_all), cast(text_all)
        if teacher is not None:
            n = image.shape[0]
            tq, tk = cast(timg_all[offset:offset + n]), cast(ttxt_all)
            tq_t, tk_t = cast(ttxt_all[offset:offset + n]), cast(timg_all)
        else:
            tq_t = tk_t = None
        row_stats, _ = contrastive_stats(img, txt_all, scale_t, bias_t, tq, tk, tscale_t, False,
                                         backend)
        col_stats, _ = contrastive_stats(txt, img_all, scale_t, bias_t, tq_t, tk_t, tscale_t,
                                         False, backend)
    with_teacher = teacher is not None
    f32 = lambda x: x.to(sdtype)  # noqa: E731  (linear terms accumulate like the kernels)
    ce_i, sd_i = _direction_terms(row_stats, f32(img), f32(txt_all), offset, scale_t, bias_t,
                                  labels_all, label_smoothing, with_teacher)
    ce_t, sd_t = _direction_terms(col_stats, f32(txt), f32(img_all), offset, scale_t, bias_t,
                                  labels_all, label_smoothing, with_teacher)
    return {"contrastive": 0.5 * (ce_i + ce_t),
            "distillation": (sd_i + sd_t) if with_teacher else None}


def _prepare(image_features, text_features, logit_scale, logit_bias, labels, label_smoothing,
             teacher_image_features, teacher_text_features, teacher_logit_scale, distill_weight,
             backend):
    image = _check_features("image_features", image_features)
    text = _check_features("text_features", text_features, image)
    if text.shape[1] != image.shape[1]:
        raise ValueError(f"text_features has width {text.shape[1]} but image_features has "
                         f"{image.shape[1]}")
    if text.dtype != image.dtype:
        raise TypeError(f"text_features has dtype {text.dtype} but image_features has {image.dtype}")
    scale = _check_scalar("logit_scale", logit_scale, image.device)
    bias = _check_scalar("logit_bias", logit_bias, image.device, optional=True)
    labels = _check_labels(labels, image.shape[0], image.device)
    label_smoothing = _check_weight("label_smoothing", label_smoothing, upper=1.0)
    distill_weight = _check_weight("distill_weight", distill_weight)
    teacher = _check_teacher(teacher_image_features, teacher_text_features, teacher_logit_scale,
                             distill_weight, image)
    backend = _backend.resolve(backend, image.device, "contrastive_loss",
                               cuda_symbol="contrastive_stats_forward_cuda")
    if backend == "triton" and image.dtype == torch.float64:
        raise TypeError("backend='triton' computes in float32 at most; pass float32/16 or bfloat16 "
                        "features, or use backend='cpu'/'reference' for float64")
    return image, text, scale, bias, labels, label_smoothing, teacher, distill_weight, backend


def contrastive_terms(image_features: Tensor, text_features: Tensor, logit_scale,
                      logit_bias=None, *, labels: Optional[Tensor] = None,
                      label_smoothing: float = 0.0,
                      teacher_image_features: Optional[Tensor] = None,
                      teacher_text_features: Optional[Tensor] = None, teacher_logit_scale=None,
                      distill=True, process_group=None, backend: str = "auto") -> dict:
    """The two terms of contrastive_loss separately: {"contrastive": MCL, "distillation": SD or
    None}, from one fused pass (CaRotLoss reports them apart). Arguments as contrastive_loss;
    the teacher is used when its three inputs are given and `distill` is true."""
    teacher_given = distill and teacher_image_features is not None
    (image, text, scale, bias, labels, label_smoothing, teacher, _,
     backend) = _prepare(image_features, text_features, logit_scale, logit_bias, labels,
                         label_smoothing, teacher_image_features, teacher_text_features,
                         teacher_logit_scale, 1.0 if teacher_given else 0.0, backend)
    return _terms_over_group(image, text, scale, bias, labels, label_smoothing, teacher,
                             process_group, backend)


def _terms_over_group(image, text, scale, bias, labels, label_smoothing, teacher, process_group,
                      backend) -> dict:
    if process_group is None:
        image_all, text_all, labels_all, offset = image, text, labels, 0
    else:
        rank, _ = world(process_group)
        image_all = gather_with_grad(image, process_group)
        text_all = gather_with_grad(text, process_group)
        labels_all = None if labels is None else gather_no_grad(labels, process_group)
        if teacher is not None:
            teacher = (gather_no_grad(teacher[0], process_group),
                       gather_no_grad(teacher[1], process_group), teacher[2])
        offset = rank * image.shape[0]
    if backend == "reference":
        return _reference_terms(image, text, image_all, text_all, offset, scale, bias,
                                labels_all, label_smoothing, teacher)
    return _contrastive_terms(image, text, image_all, text_all, offset, scale, bias, labels_all,
                              label_smoothing, teacher, backend)


def _reference_terms(image, text, image_all, text_all, offset, scale, bias, labels_all,
                     label_smoothing, teacher) -> dict:
    """The materialising reference, split into the same two terms."""
    if image_all is not image:  # local rows: splice the local (grad-carrying) rows in
        n = image.shape[0]
        image_all = torch.cat([image_all[:offset], image, image_all[offset + n:]])
        text_all = torch.cat([text_all[:offset], text, text_all[offset + n:]])
    rows = slice(offset, offset + image.shape[0])
    common = dict(labels=labels_all, label_smoothing=label_smoothing, local_rows=rows)
    mcl = contrastive_loss_reference(image_all, text_all, scale, bias, **common)
    if teacher is None:
        return {"contrastive": mcl, "distillation": None}
    with_sd = contrastive_loss_reference(image_all, text_all, scale, bias,
                                         teacher_image_features=teacher[0],
                                         teacher_text_features=teacher[1],
                                         teacher_logit_scale=teacher[2], distill_weight=1.0,
                                         **common)
    return {"contrastive": mcl, "distillation": with_sd - mcl}


def contrastive_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None,
                     *, labels: Optional[Tensor] = None, label_smoothing: float = 0.0,
                     teacher_image_features: Optional[Tensor] = None,
                     teacher_text_features: Optional[Tensor] = None, teacher_logit_scale=None,
                     distill_weight: float = 0.0, process_group=None,
                     backend: str = "auto") -> Tensor:
    """CLIP's symmetric contrastive loss (+ CaRot's self-distillation), fused: nothing B x B is
    allocated (except by backend="reference"). Semantics: ../shared/spec/api.md.

    image_features, text_features: [B, d] (normalised by the caller); logit_scale: the multiplier
    (open_clip's logit_scale.exp()); logit_bias: added to every logit; labels: [B] ints for
    multi-positive targets; label_smoothing: e in [0, 1); teacher_*: EMA-teacher features and
    scale, used when distill_weight > 0 (never get gradients); process_group: each rank passes
    its local rows and gets the loss of those rows against the global batch; backend: "auto",
    "cpu", "triton", "cuda" (no CUDA C++ kernel exists for this op: raises) or "reference".
    Returns a 0-dim tensor in the features' dtype.
    """
    (image, text, scale, bias, labels, label_smoothing, teacher, distill_weight,
     backend) = _prepare(image_features, text_features, logit_scale, logit_bias, labels,
                         label_smoothing, teacher_image_features, teacher_text_features,
                         teacher_logit_scale, distill_weight, backend)
    terms = _terms_over_group(image, text, scale, bias, labels, label_smoothing, teacher,
                              process_group, backend)
    loss = terms["contrastive"]
    if terms["distillation"] is not None:
        loss = loss + distill_weight * terms["distillation"]
    return loss.to(image.dtype)
