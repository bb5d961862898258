"""sigmoid_loss: SigLIP's pairwise sigmoid loss (+ CaRot's self-distillation) without B x B logits,
its gradients formed in the forward pass.

How the work is split (docs/design.md, "The sigmoid loss", has the derivation and the contract):
- `SigmoidInputs.validate` checks every argument ONCE, at the Python boundary (through the seams
  of calrft_kernels/pairs.py that the softmax family uses), and returns a frozen, typed object.
- `sigmoid_terms` is the one composition: validated inputs -> `SigmoidTerms` (the differentiable
  total and the two terms for reporting). sigmoid_loss and SigLipLoss call it.
- The op `calrft::sigmoid_pairs` (torch.library: fake kernel, registered autograd, so the loss
  works under torch.compile) runs one kernel per backend, all with one contract:
    "cpu"       C++ kernel (csrc/cpu/sigmoid.cpp): tiles never stored
    "chunked"   cuBLAS GEMMs on bounded row chunks + one fused Triton pass per chunk
                (calrft_kernels/sigmoid_chunked.py): the default on CUDA tensors
    "reference" materialised logits (calrft_kernels/reference.py)
  The loss is a sum of independent pair terms, so G = dl/dS of a tile is known as soon as the
  tile is: the kernel emits dq_u = G k and dk_u = G^T q in the same pass (3 products with
  gradients, 1 without; the teacher tile adds 1) and the backward only scales them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor

from . import _backend
from ._checks import compute_dtype
from .pairs import (Operands, Teacher, check_chunk_rows, check_feature_pair, check_labels,
                    check_scalar, check_teacher, check_tensor_scalars_finite, check_weight,
                    global_batch)

__all__ = ["sigmoid_loss", "sigmoid_terms", "SigmoidInputs", "SigmoidTerms", "sigmoid_pairs"]

KERNELS = ("cpu", "chunked", "reference")


# --------------------------------------------------------------------------------------------
# The op: one name, a kernel per backend, fake kernel, autograd.
# --------------------------------------------------------------------------------------------
def _cpu_kernel(q, k, scale, bias, qlabels, klabels, offset, tq, tk, tscale, tbias,
                distill_weight, with_grads, chunk_rows):
    """The C++ kernel, whose parts are the first 4 of the contract; sum G X = <q, G k> is one
    O(M d) dot product of its dq_u (the kernel never holds X and G of a pair together in a
    reducible form)."""
    mod, why = _backend.native()
    if mod is None:
        raise RuntimeError(why)
    parts, dq_u, dk_u = mod.sigmoid_loss_forward_cpu(q, k, scale, bias, qlabels, klabels, offset,
                                                     tq, tk, tscale, tbias, distill_weight,
                                                     with_grads, chunk_rows)
    gx = torch.vdot(q.reshape(-1), dq_u.reshape(-1)) if with_grads else parts.new_zeros(())
    return torch.cat([parts, gx.reshape(1)]), dq_u, dk_u


def _kernel(backend: str):
    """The forward of a concrete backend; every one follows docs/design.md's contract:
    forward(q, k, scale, bias, qlabels, klabels, offset, tq, tk, tscale, tbias, distill_weight,
            with_grads, chunk_rows) -> (parts [5], dq_u [M or 0, d], dk_u [N or 0, d])."""
    if backend == "cpu":
        return _cpu_kernel
    if backend == "chunked":
        from . import sigmoid_chunked
        return sigmoid_chunked.pairs_forward
    if backend == "reference":
        from . import reference
        return reference.sigmoid_pairs_kernel
    raise ValueError(f"backend must be one of {KERNELS} for calrft::sigmoid_pairs, got "
                     f"{backend!r}")


@torch.library.custom_op("calrft::sigmoid_pairs", mutates_args=())
def sigmoid_pairs(q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, qlabels: Optional[Tensor],
                  klabels: Optional[Tensor], offset: int, tq: Optional[Tensor],
                  tk: Optional[Tensor], tscale: Optional[Tensor], tbias: Optional[Tensor],
                  distill_weight: float, with_grads: bool, backend: str,
                  chunk_rows: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sum over the pairs of S = scale q k^T + bias (and the teacher's
    T = tscale tq tk^T + tbias) of l_ij + distill_weight SD_ij, and what its gradients need; see
    docs/design.md.

    Returns (loss: 0-dim, differentiable; detail [4] = (sum l, sum SD, sum G, sum G X) with
    X = q k^T; dq_u = G k and dk_u = G^T q, or [0, d] without with_grads). Only `loss` is
    differentiable. Positive pairs: qlabels[i] == klabels[j], or without labels j == i + offset.
    chunk_rows: rows per panel of the "cpu" kernel (0: its default, at most 256), rows per
    chunk of the "chunked" kernel (0: from its buffer budget)."""
    q, k, scale, bias, qlabels, klabels, tq, tk, tscale, tbias = (
        None if t is None else t.detach()
        for t in (q, k, scale, bias, qlabels, klabels, tq, tk, tscale, tbias))
    parts, dq_u, dk_u = _kernel(backend)(q, k, scale, bias, qlabels, klabels, offset, tq, tk,
                                         tscale, tbias, distill_weight, with_grads, chunk_rows)
    # parts[4] = sum_ij G_ij X_ij: the scale's gradient
    return parts[0].clone(), parts[1:].clone(), dq_u, dk_u


@sigmoid_pairs.register_fake
def _(q, k, scale, bias, qlabels, klabels, offset, tq, tk, tscale, tbias, distill_weight,
      with_grads, backend, chunk_rows=0):
    dtype = compute_dtype(q.dtype)
    rows, cols = (q.shape[0], k.shape[0]) if with_grads else (0, 0)
    return (q.new_empty((), dtype=dtype), q.new_empty((4,), dtype=dtype),
            q.new_empty((rows, q.shape[1]), dtype=dtype), k.new_empty((cols, k.shape[1]),
                                                                      dtype=dtype))


def _pairs_setup_context(ctx, inputs, output):
    q, k, scale, bias = inputs[:4]
    _, detail, dq_u, dk_u = output
    ctx.mark_non_differentiable(detail, dq_u, dk_u)
    # Unused outputs' gradients stay None: materialised, dq_u and dk_u would cost two [B, d]
    # buffers of zeros in every backward.
    ctx.set_materialize_grads(False)
    ctx.with_grads = inputs[12]
    ctx.dtypes = (q.dtype, k.dtype, scale.dtype, bias.dtype)
    ctx.save_for_backward(scale, detail, dq_u, dk_u)


def _pairs_backward(ctx, grad_loss, grad_detail, grad_dq, grad_dk):
    if torch.is_grad_enabled():  # backward(create_graph=True): the graph would be wrong
        raise RuntimeError("sigmoid_loss has no double backward (create_graph=True): its "
                           "gradients are formed in the forward pass and only scaled here; for "
                           "higher derivatives use calrft_kernels.reference."
                           "sigmoid_loss_reference (plain PyTorch, materialises B x B)")
    if not ctx.with_grads:
        raise RuntimeError("calrft::sigmoid_pairs was called with with_grads=False (no input "
                           "required grad), so it formed no gradients to return")
    none = (None,) * 11  # labels, offset, teacher, weight, flags, backend, chunk_rows
    if grad_loss is None:  # only the non-differentiable outputs were used
        return (None,) * 4 + none
    scale, detail, dq_u, dk_u = ctx.saved_tensors
    q_dtype, k_dtype, scale_dtype, bias_dtype = ctx.dtypes
    factor = grad_loss * scale
    return ((dq_u * factor).to(q_dtype), (dk_u * factor).to(k_dtype),
            (grad_loss * detail[3]).to(scale_dtype), (grad_loss * detail[2]).to(bias_dtype),
            *none)


sigmoid_pairs.register_autograd(_pairs_backward, setup_context=_pairs_setup_context)


# --------------------------------------------------------------------------------------------
# Typed inputs and results
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SigmoidInputs:
    """Validated arguments of sigmoid_loss (build with `SigmoidInputs.validate`).

    teacher is None exactly when there is no distillation term (distill_weight == 0); backend
    is concrete (never "auto"); chunk_rows is 0 for "the kernel's default"; process_group None
    for one process."""
    image: Tensor
    text: Tensor
    scale: Union[Tensor, float]
    bias: Union[Tensor, float, None]
    labels: Optional[Tensor]
    teacher: Optional[Teacher]
    distill_weight: float
    backend: str
    chunk_rows: int = 0
    process_group: Any = None

    @classmethod
    def validate(cls, image_features, text_features, logit_scale, logit_bias=None, *,
                 labels=None, teacher_image_features=None, teacher_text_features=None,
                 teacher_logit_scale=None, teacher_logit_bias=None, distill_weight=0.0,
                 process_group=None, backend="auto", chunk_rows=None) -> "SigmoidInputs":
        """Check every argument of sigmoid_loss (api.md); raise TypeError / ValueError naming
        the argument. The teacher is used iff distill_weight > 0."""
        image, text = check_feature_pair(image_features, text_features)
        scale = check_scalar("logit_scale", logit_scale, image.device)
        bias = check_scalar("logit_bias", logit_bias, image.device, optional=True)
        labels = check_labels(labels, image.shape[0], image.device)
        distill_weight = check_weight("distill_weight", distill_weight)
        teacher = check_teacher(image, distill_weight, teacher_image_features,
                                teacher_text_features, teacher_logit_scale, teacher_logit_bias)
        if teacher is not None and bias is not None and teacher.bias is None:
            raise ValueError("teacher_logit_bias is required when logit_bias is given and "
                             "distill_weight > 0: the soft targets sigmoid(T) need the teacher's "
                             "own bias (pass 0.0 for a teacher without one)")
        check_tensor_scalars_finite({"logit_scale": scale, "logit_bias": bias,
                                     "teacher_logit_scale": teacher and teacher.scale,
                                     "teacher_logit_bias": teacher and teacher.bias})
        chunk_rows = check_chunk_rows(chunk_rows)
        backend = _backend.resolve(backend, image.device, "sigmoid_loss", auto_cuda="chunked",
                                   chunked=True, kernels=KERNELS)
        return cls(image, text, scale, bias, labels, teacher, distill_weight, backend,
                   chunk_rows, process_group)


@dataclass(frozen=True)
class SigmoidTerms:
    """total: the loss, (sum l + distill_weight sum SD) / B, differentiable. contrastive: the
    sigmoid term (1/B) sum l; distillation: (1/B) sum SD, or None without a teacher. With a
    process group the sums run over this rank's rows and every column, B is the local batch
    (open_clip's normalisation: the ranks' mean is the global batch's loss). The two
    terms are values for reporting: they carry no gradient (the kernel forms the gradient of
    the total only). All 0-dim, in the accumulation dtype."""
    total: Tensor
    contrastive: Tensor
    distillation: Optional[Tensor]


# --------------------------------------------------------------------------------------------
# The composition
# --------------------------------------------------------------------------------------------
def _needs_grads(*values) -> bool:
    return torch.is_grad_enabled() and any(isinstance(v, Tensor) and v.requires_grad
                                           for v in values)


def sigmoid_terms(inputs: SigmoidInputs) -> SigmoidTerms:
    """The loss and its terms for validated inputs: one call of calrft::sigmoid_pairs, which forms
    the gradients in the same pass only when an input requires grad. With a process group the
    local image rows meet every rank's text rows (pairs.global_batch gathers the text side only:
    the loss has no column direction), the positives at the local rows' offset."""
    image, backend = inputs.image, inputs.backend
    batch = global_batch(image, inputs.text, inputs.labels, inputs.teacher, inputs.process_group,
                         gather_image=False)
    ops = Operands.of(image, backend)
    cast = ops.cast
    scale = ops.scalar(inputs.scale)
    bias = ops.scalar(0.0 if inputs.bias is None else inputs.bias)
    teacher = batch.teacher
    tq = tk = tscale = tbias = None
    if teacher is not None:
        tq, tk = cast(teacher.image), cast(teacher.text)
        tscale = ops.scalar(teacher.scale).detach()
        if teacher.bias is not None:
            tbias = ops.scalar(teacher.bias).detach()
    as_labels = lambda x: None if x is None else x.to(torch.int64).contiguous()  # noqa: E731
    with_grads = _needs_grads(image, batch.text, inputs.scale, inputs.bias)
    pairs = functools.partial(sigmoid_pairs, backend=backend, chunk_rows=inputs.chunk_rows)
    loss, detail, _, _ = pairs(cast(image), cast(batch.text), scale, bias,
                               as_labels(inputs.labels), as_labels(batch.labels), batch.offset,
                               tq, tk, tscale, tbias, inputs.distill_weight, with_grads)
    n = image.shape[0]
    return SigmoidTerms(loss / n, detail[0] / n, None if teacher is None else detail[1] / n)


def sigmoid_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None,
                 *, labels: Optional[Tensor] = None,
                 teacher_image_features: Optional[Tensor] = None,
                 teacher_text_features: Optional[Tensor] = None, teacher_logit_scale=None,
                 teacher_logit_bias=None, distill_weight: float = 0.0, process_group=None,
                 backend: str = "auto", chunk_rows: Optional[int] = None) -> Tensor:
    """SigLIP's pairwise sigmoid loss (+ CaRot's self-distillation), fused: nothing B x B is
    allocated (except by backend="reference"), the gradients are formed in the forward pass.
    Semantics: docs/api.md; equal to open_clip.loss.SigLipLoss on one process.

    image_features, text_features: [B, d] (normalised by the caller); logit_scale: the
    multiplier (open_clip passes logit_scale.exp()); logit_bias: added to every logit (SigLIP's
    learnable bias); labels: [B] ints, pairs with equal labels are positives (default: i == j);
    teacher_*: the EMA teacher's features, scale and bias, whose sigmoid(T) are the soft targets
    of the distillation term, used when distill_weight > 0 (never get gradients);
    process_group: each rank passes its local rows and gets the loss of those rows against every
    rank's text rows, divided by its local batch (open_clip's distributed SigLipLoss: the ranks'
    mean is the global batch's loss, and DDP's gradient averaging gives its gradient); backend:
    "auto" ("cpu" on CPU tensors, "chunked" on CUDA tensors), "cpu", "chunked" (cuBLAS GEMMs
    on bounded row chunks and one fused Triton pass each; plain torch passes on CPU tensors) or
    "reference"; chunk_rows: rows per panel of the "cpu" kernel (default and maximum 256), rows
    per chunk of "chunked" (default: as many as calrft_kernels.chunked.MAX_BUFFER_BYTES holds).
    Returns a 0-dim tensor in the features' dtype. Double backward is not supported.
    """
    inputs = SigmoidInputs.validate(
        image_features, text_features, logit_scale, logit_bias, labels=labels,
        teacher_image_features=teacher_image_features, teacher_text_features=teacher_text_features,
        teacher_logit_scale=teacher_logit_scale, teacher_logit_bias=teacher_logit_bias,
        distill_weight=distill_weight, process_group=process_group, backend=backend,
        chunk_rows=chunk_rows)
    return sigmoid_terms(inputs).total.to(inputs.image.dtype)
