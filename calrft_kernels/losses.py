"""nn.Module losses: ClipLoss, DistillClipLoss and SigLipLoss (drop-ins for open_clip.loss's
classes of those names) and CaRotLoss (the whole per-step CaRot objective). They compose the
package's ops; none computes a kernel itself."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .contrastive import (ContrastiveInputs, ContrastiveTerms, GlobalBatch, check_weight,
                          contrastive_terms, with_rows)
from .distributed import gather_no_grad, gather_with_grad, world
from .eigen import covariance_sigma_min
from .orthogonality import orthogonality_loss
from .sigmoid import SigmoidInputs, sigmoid_terms

SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")  # open_clip's SigLipLoss exchanges


class ClipLoss(nn.Module):
    """open_clip.loss.ClipLoss with the same constructor, forward and outputs, computed by the
    fused contrastive kernels (no B x B logits).

    With world_size > 1 it follows open_clip's four gather modes on the default process group:
    local_loss=True, gather_with_grad=True is contrastive_loss(process_group=...) (each rank: its
    rows against the global batch); the other modes reproduce open_clip's gradient paths.
    cache_labels is accepted for compatibility (there are no label tensors to cache)."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False, *, backend: str = "auto"):
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod=True is not supported: launch with torchrun "
                             "(torch.distributed) instead")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.backend = backend

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale,
                logit_bias=None, output_dict: bool = False):
        terms, inputs = self._terms(image_features, text_features, logit_scale, logit_bias)
        loss = terms.contrastive.to(inputs.image.dtype)
        return {"contrastive_loss": loss} if output_dict else loss

    def _terms(self, image_features, text_features, logit_scale, logit_bias=None,
               **teacher) -> tuple[ContrastiveTerms, ContrastiveInputs]:
        """The fused terms of this rank in open_clip's gather mode (teacher: the
        teacher_* arguments of contrastive_loss, for DistillClipLoss)."""
        distributed = self.world_size > 1
        group = dist.group.WORLD if distributed and self.gather_with_grad and self.local_loss \
            else None
        inputs = ContrastiveInputs.validate(image_features, text_features, logit_scale,
                                            logit_bias, process_group=group,
                                            backend=self.backend, **teacher)
        if distributed and group is None:
            inputs, batch = self._open_clip_gather(inputs)
            return contrastive_terms(inputs, batch), inputs
        return contrastive_terms(inputs), inputs

    def _open_clip_gather(self, inputs: ContrastiveInputs):
        """open_clip's other three gather modes: (local inputs, the batch they are scored
        against), with open_clip's gradient paths. A teacher's features are gathered without
        gradients (open_clip gathers them like the student's, and they have none)."""
        group = dist.group.WORLD
        image, text = inputs.image, inputs.text
        rank, _ = world(group)
        n = image.shape[0]
        if self.gather_with_grad:
            image_all, text_all = gather_with_grad(image, group), gather_with_grad(text, group)
        else:
            image_all, text_all = gather_no_grad(image, group), gather_no_grad(text, group)
            if not self.local_loss:  # open_clip splices the local rows back in with their grads
                image_all = torch.cat([image_all[:rank * n], image, image_all[(rank + 1) * n:]])
                text_all = torch.cat([text_all[:rank * n], text, text_all[(rank + 1) * n:]])
        teacher = inputs.teacher
        if teacher is not None:
            teacher = dataclasses.replace(teacher, image=gather_no_grad(teacher.image, group),
                                          text=gather_no_grad(teacher.text, group))
        if self.local_loss:
            return inputs, GlobalBatch(image_all, text_all, rank * n, teacher=teacher)
        # every rank computes the loss of the whole global batch
        return (with_rows(inputs, image_all, text_all),
                GlobalBatch(image_all, text_all, 0, teacher=teacher))


class DistillClipLoss(ClipLoss):
    """open_clip.loss.DistillClipLoss with the same constructor, forward and outputs: CLIP's
    loss plus the distillation term open_clip_train uses with --distill-model, both from one
    fused pass (contrastive_loss's teacher terms; no B x B logits for student or teacher).

    distill_loss is open_clip's: the mean of both directions' soft cross-entropy to the teacher's
    softmax, 0.5 (SD_rows + SD_cols), i.e. half of contrastive_loss's distillation term. Every
    gather mode of ClipLoss applies, to the teacher's features too."""

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale,
                dist_image_features: Tensor, dist_text_features: Tensor, dist_logit_scale,
                output_dict: bool = False):
        terms, inputs = self._terms(image_features, text_features, logit_scale,
                                    teacher_image_features=dist_image_features,
                                    teacher_text_features=dist_text_features,
                                    teacher_logit_scale=dist_logit_scale, distill_weight=1.0)
        dtype = inputs.image.dtype
        contrastive, distill = terms.contrastive.to(dtype), (0.5 * terms.distillation).to(dtype)
        if output_dict:
            return {"contrastive_loss": contrastive, "distill_loss": distill}
        return contrastive, distill


class SigLipLoss(nn.Module):
    """open_clip.loss.SigLipLoss with the same constructor, forward and outputs, computed by the
    fused sigmoid kernel (no B x B logits, gradients formed in the forward pass).

    With world_size > 1 every open_clip dist_impl ("bidir", "shift", "reduce", "gather") gives
    open_clip's numbers: each of them scores this rank's image rows against every rank's text
    rows (the gradients flowing back to the text's rank) and divides by the local batch, which
    is sigmoid_loss(process_group=...) on the default process group: one all_gather of the text
    features (O(B d)) whatever dist_impl says; dist_impl is kept for compatibility and checked as
    open_clip does. cache_labels is accepted for compatibility (there are no label tensors to
    cache)."""

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None, *, backend: str = "auto"):
        super().__init__()
        dist_impl = dist_impl or "bidir"  # open_clip's default
        if dist_impl not in SIGLIP_DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {SIGLIP_DIST_IMPLS} or None, got "
                             f"{dist_impl!r}")
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl
        self.backend = backend

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias,
                output_dict: bool = False):
        group = dist.group.WORLD if self.world_size > 1 else None
        inputs = SigmoidInputs.validate(image_features, text_features, logit_scale, logit_bias,
                                        process_group=group, backend=self.backend)
        loss = sigmoid_terms(inputs).total.to(inputs.image.dtype)
        return {"contrastive_loss": loss} if output_dict else loss


FAMILIES = ("softmax", "sigmoid")  # CaRotLoss's contrastive term: CLIP's InfoNCE or SigLIP's


class CaRotLoss(nn.Module):
    """The per-step CaRot objective (objective.md):

        L = MCL + cross_weight ||W_v W_t^T||_F + orth_weight ||W_v^T W_v - I||_F
              + distill_weight SD - sigma_min_weight * sigma_min(Cov(sigma_min_features))

    family="softmax" (default): MCL and SD are CLIP's symmetric InfoNCE and the soft
    cross-entropy to the teacher's softmax (contrastive_loss). family="sigmoid", for SigLIP
    backbones: MCL is SigLIP's pairwise sigmoid loss and SD the pairwise binary cross-entropy to
    the teacher's sigmoid(T), T with the teacher's own logit bias (sigmoid_loss); the other terms
    and every weight are the same. MCL and SD come from one fused pass; SD is skipped while no
    teacher is given (CaRot starts distillation after step 0). The optional last term is a direct
    regulariser of the smallest singular value of the batch feature covariance (rewarding a
    larger sigma_min), the route the paper found too heavy without a fused op.
    output_dict=True returns every term ("contrastive", "distillation", "orthogonality", "cross",
    "sigma_min", "total"); with the sigmoid family "contrastive" and "distillation" are values
    for reporting (its kernel forms the gradient of their weighted sum, which "total" carries)."""

    def __init__(self, distill_weight: float = 1.5, orth_weight: float = 0.2,
                 cross_weight: float = 0.05, sigma_min_weight: float = 0.0, *,
                 label_smoothing: float = 0.0, sigma_min_eps: float = 1e-6,
                 process_group=None, backend: str = "auto", family: str = "softmax"):
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
        # NaN / infinite / negative weights are refused here, naming the argument.
        self.distill_weight = check_weight("distill_weight", distill_weight)
        self.orth_weight = check_weight("orth_weight", orth_weight)
        self.cross_weight = check_weight("cross_weight", cross_weight)
        self.sigma_min_weight = check_weight("sigma_min_weight", sigma_min_weight)
        self.label_smoothing = check_weight("label_smoothing", label_smoothing, upper=1.0)
        if family == "sigmoid" and self.label_smoothing:
            raise ValueError("label_smoothing applies to the softmax family only: the sigmoid "
                             "loss has no softmax targets to smooth")
        self.sigma_min_eps = check_weight("sigma_min_eps", sigma_min_eps)
        self.process_group = process_group
        self.backend = backend
        self.family = family

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, *,
                visual_proj: Tensor, text_proj: Tensor,
                teacher_image_features: Optional[Tensor] = None,
                teacher_text_features: Optional[Tensor] = None, teacher_logit_scale=None,
                labels: Optional[Tensor] = None, logit_bias=None, teacher_logit_bias=None,
                sigma_min_features: Optional[Tensor] = None, output_dict: bool = False):
        _check_projection("visual_proj", visual_proj)
        _check_projection("text_proj", text_proj)
        if visual_proj.shape[1] != text_proj.shape[1]:
            raise ValueError(f"visual_proj and text_proj must map to the same embedding width, "
                             f"got {tuple(visual_proj.shape)} and {tuple(text_proj.shape)}")
        # The one distillation decision: SD is computed iff its weight is positive and a
        # teacher is given (CaRot starts distillation after step 0).
        distill = self.distill_weight > 0 and teacher_image_features is not None
        common = dict(labels=labels, teacher_image_features=teacher_image_features,
                      teacher_text_features=teacher_text_features,
                      teacher_logit_scale=teacher_logit_scale,
                      distill_weight=self.distill_weight if distill else 0.0,
                      process_group=self.process_group, backend=self.backend)
        if self.family == "sigmoid":
            terms = sigmoid_terms(SigmoidInputs.validate(
                image_features, text_features, logit_scale, logit_bias,
                teacher_logit_bias=teacher_logit_bias, **common))
            pair_total, mcl, sd = terms.total, terms.contrastive, terms.distillation
        else:
            inputs = ContrastiveInputs.validate(image_features, text_features, logit_scale,
                                                logit_bias, label_smoothing=self.label_smoothing,
                                                **common)
            terms = contrastive_terms(inputs)
            pair_total = terms.total(inputs.distill_weight)
            mcl, sd = terms.contrastive, terms.distillation
        zero = mcl.new_zeros(())
        out = {"contrastive": mcl, "distillation": zero if sd is None else sd,
               "orthogonality": orthogonality_loss(visual_proj).to(zero.dtype),
               # ||W_v W_t^T||_F: a small [vision_width, text_width] product, not a kernel
               "cross": torch.linalg.matrix_norm(visual_proj @ text_proj.T).to(zero.dtype)}
        if self.sigma_min_weight > 0:
            feats = image_features if sigma_min_features is None else sigma_min_features
            out["sigma_min"] = covariance_sigma_min(feats, eps=self.sigma_min_eps).to(zero.dtype)
        else:
            out["sigma_min"] = zero
        out["total"] = (pair_total + self.orth_weight * out["orthogonality"]
                        + self.cross_weight * out["cross"]
                        - self.sigma_min_weight * out["sigma_min"])
        out = {k: v.to(image_features.dtype) for k, v in out.items()}
        return out if output_dict else out["total"]


def _check_projection(name: str, w) -> None:
    if not isinstance(w, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D [width, embed_dim], got shape {tuple(w.shape)}")
