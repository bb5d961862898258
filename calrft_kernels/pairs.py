"""Seams shared by the pair-loss families (the softmax contrastive loss, contrastive.py, and the
sigmoid loss, sigmoid.py): the dtype policy, the argument checks of their common arguments, the
typed teacher and the process-group gather (`global_batch`). Each family validates its arguments
here, once, at the Python boundary; every check raises TypeError / ValueError naming the
argument.

Tensor scalars (logit_scale, logit_bias, teacher_logit_scale, teacher_logit_bias) are checked for
finiteness. On the CPU that is free; on a GPU it needs their values on the host: ONE
synchronisation per call (all scalars stacked into one check), skipped inside
calrft_kernels.device_checks(False) (a non-finite scale then gives a NaN loss instead of a
ValueError). Python floats are always checked; under torch.compile the check is an asynchronous
device assert (no graph break).
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from . import _backend
from ._checks import FLOAT_DTYPES, compute_dtype
from .distributed import gather_no_grad, gather_with_grad, world

__all__ = ["Teacher", "GlobalBatch", "global_batch", "Operands", "kernel_dtype", "check_features",
           "check_feature_pair", "check_scalar", "check_tensor_scalars_finite", "check_labels", "check_weight", "check_chunk_rows",
           "check_teacher", "as_scalar_tensor"]


# --------------------------------------------------------------------------------------------
# dtype policy (one place)
# --------------------------------------------------------------------------------------------
def kernel_dtype(dtype: torch.dtype, backend: str, device: torch.device) -> torch.dtype:
    """The operand dtype a backend's kernel reads. The C++ kernel, the reference and the chunked
    path on a CPU read float32/float64 (half types are upcast: CPU BLAS has no fast half GEMM);
    Triton and the chunked path on a GPU read fp16/bf16 natively (fp32 accumulation)."""
    if dtype in (torch.float16, torch.bfloat16) and (
            backend in ("cpu", "reference") or (backend == "chunked" and device.type != "cuda")):
        return torch.float32
    return dtype


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------
def check_features(name: str, x, like: Optional[Tensor] = None) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
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


def check_scalar(name: str, value, device, optional: bool = False):
    """A 0-dim floating tensor on the features' device, or a finite real number. Tensor values
    are checked for finiteness by check_tensor_scalars_finite (batched: one sync on a GPU)."""
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
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{name} must be finite, got {value}")
        return value
    raise TypeError(f"{name} must be a float or a 0-dim tensor, got {type(value).__name__}")


def check_tensor_scalars_finite(named: dict) -> None:
    """Raise ValueError naming the first non-finite tensor scalar. CPU: free. GPU: one host
    synchronisation for all of them (skipped inside calrft_kernels.device_checks(False)). Under torch.compile:
    an asynchronous assert in the graph (no graph break, no sync; fails as a RuntimeError)."""
    tensors = {name: v for name, v in named.items() if isinstance(v, Tensor)}
    if not tensors:
        return
    if torch.compiler.is_compiling():
        for value in tensors.values():
            torch._assert_async(torch.isfinite(value.detach()))
        return
    if not _backend.host_checks_for(*tensors.values()):
        return
    flags = torch.stack([torch.isfinite(v.detach().float()) for v in tensors.values()])
    if bool(flags.all()):
        return
    for (name, value), ok in zip(tensors.items(), flags.tolist()):
        if not ok:
            raise ValueError(f"{name} must be finite, got {value.detach().item()}")


def check_labels(labels, batch: int, device) -> Optional[Tensor]:
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


def check_weight(name: str, value, upper: Optional[float] = None) -> float:
    """A real number in [0, inf) (or [0, upper)); NaN and infinity are refused, naming `name`."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not value >= 0.0 or value == float("inf") or (upper is not None and not value < upper):
        bound = f"[0, {upper})" if upper is not None else "[0, inf)"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return value


def check_chunk_rows(value) -> int:
    if value is None:
        return 0
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"chunk_rows must be a positive int or None, got {value!r}")
    return int(value)


def check_feature_pair(image_features, text_features) -> tuple[Tensor, Tensor]:
    """image_features and text_features: [B, d] float tensors of one dtype and device."""
    image = check_features("image_features", image_features)
    text = check_features("text_features", text_features, image)
    if text.shape[1] != image.shape[1]:
        raise ValueError(f"text_features has width {text.shape[1]} but image_features has "
                         f"{image.shape[1]}")
    if text.dtype != image.dtype:
        raise TypeError(f"text_features has dtype {text.dtype} but image_features has "
                        f"{image.dtype}")
    return image, text


# --------------------------------------------------------------------------------------------
# The teacher
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Teacher:
    """The EMA teacher's features [B, dt], scale and bias (None: no bias); detached (never gets
    gradients). The softmax family ignores the bias (a constant shift of every teacher logit
    leaves its softmax targets unchanged); the sigmoid family's targets sigmoid(T) use it."""
    image: Tensor
    text: Tensor
    scale: Union[Tensor, float]
    bias: Union[Tensor, float, None] = None


def check_teacher(image: Tensor, distill_weight: float, teacher_image_features,
                  teacher_text_features, teacher_logit_scale,
                  teacher_logit_bias=None) -> Optional[Teacher]:
    """The detached Teacher when distill_weight > 0 (its features, scale and, where the family
    has one, bias checked against the student's `image` features), else None."""
    if distill_weight <= 0.0:
        return None
    if (teacher_image_features is None or teacher_text_features is None
            or teacher_logit_scale is None):
        raise ValueError("distill_weight > 0 needs teacher_image_features, "
                         "teacher_text_features and teacher_logit_scale")
    timg = check_features("teacher_image_features", teacher_image_features, image)
    ttxt = check_features("teacher_text_features", teacher_text_features, image)
    if timg.shape[1] != ttxt.shape[1]:
        raise ValueError(f"teacher_image_features and teacher_text_features differ in "
                         f"width: {timg.shape[1]} vs {ttxt.shape[1]}")
    tscale = check_scalar("teacher_logit_scale", teacher_logit_scale, image.device)
    tbias = check_scalar("teacher_logit_bias", teacher_logit_bias, image.device, optional=True)
    detach = lambda v: v.detach() if isinstance(v, Tensor) else v  # noqa: E731
    return Teacher(timg.detach(), ttxt.detach(), detach(tscale), detach(tbias))


@dataclass(frozen=True)
class Operands:
    """The dtype policy applied to one call, as both families' compositions hand validated
    inputs to their kernels: `dtype`, the operand dtype the backend reads (kernel_dtype); `acc`,
    the dtype of the scalars and of what the kernels accumulate (compute_dtype of `dtype`)."""
    dtype: torch.dtype
    acc: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, features: Tensor, backend: str) -> "Operands":
        dtype = kernel_dtype(features.dtype, backend, features.device)
        return cls(dtype, compute_dtype(dtype), features.device)

    def cast(self, x: Tensor) -> Tensor:
        """Features as the kernel reads them: the operand dtype, contiguous."""
        return x.to(self.dtype).contiguous()

    def scalar(self, value) -> Tensor:
        """A checked scalar (tensor or float) as a 0-dim tensor of the accumulation dtype
        (autograd kept)."""
        if isinstance(value, Tensor):
            return value.to(self.acc)
        return torch.tensor(value, dtype=self.acc, device=self.device)


# --------------------------------------------------------------------------------------------
# Process groups: what the local rows are compared against
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GlobalBatch:
    """What the local rows are compared against: the image/text rows of the global batch, where
    the local rows start in it (offset), and the global labels and teacher (None when absent).
    Built by `global_batch`; with gather_image=False the image side (image, teacher.image) holds
    the local rows only."""
    image: Tensor
    text: Tensor
    offset: int = 0
    labels: Optional[Tensor] = None
    teacher: Optional[Teacher] = None


def global_batch(image: Tensor, text: Tensor, labels: Optional[Tensor],
                 teacher: Optional[Teacher], process_group, *,
                 gather_image: bool = True) -> GlobalBatch:
    """The batch of the api.md convention for both families. Single process (process_group None):
    the inputs themselves. With a process group (every rank passes the same number of local
    rows): every rank's text rows, and image rows when gather_image, gathered with autograd
    (gather_with_grad: the backward sums every rank's gradient of its rows); labels and the
    teacher's features gathered without. The softmax family gathers both sides (its columns
    direction needs every image row); the sigmoid family only the text side (each rank scores its
    own image rows against every text row): one O(B d) gather, never anything B x B."""
    if process_group is None:
        return GlobalBatch(image, text, 0, labels, teacher)
    rank, _ = world(process_group)
    if teacher is not None:
        timage = gather_no_grad(teacher.image, process_group) if gather_image else teacher.image
        teacher = dataclasses.replace(teacher, image=timage,
                                      text=gather_no_grad(teacher.text, process_group))
    labels = None if labels is None else gather_no_grad(labels, process_group)
    image_all = gather_with_grad(image, process_group) if gather_image else image
    return GlobalBatch(image_all, gather_with_grad(text, process_group), rank * image.shape[0],
                       labels, teacher)
