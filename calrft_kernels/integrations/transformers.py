"""`apply()`: Hugging Face CLIP and SigLIP models compute `return_loss=True` with the fused ops.

    from calrft_kernels.integrations import transformers as calrft_transformers
    calrft_transformers.apply()       # or: with calrft_transformers.apply() as handle: ...
    out = model(input_ids=..., pixel_values=..., return_loss=True)   # out.loss: fused

After it, the `forward` of CLIPModel, SiglipModel and Siglip2Model (where the installed
transformers has it) runs the model's own towers and normalisation as before, then:
- the loss (return_loss=True) comes from the fused ops: CLIPModel's symmetric InfoNCE from
  contrastive_loss's kernels, SigLIP's pairwise sigmoid loss from sigmoid_loss's kernel, each
  with the model's own logit_scale (exp'd, as the model does) and, for SigLIP, logit_bias; the
  same value and gradients as the model's loss, with nothing B x B allocated by the loss;
- with skip_logits=True (the default), a training forward (model.training) with return_loss=True
  does not build logits_per_image / logits_per_text (they are None in the output), so nothing
  B x B is allocated at all. Evaluation forwards and forwards without return_loss build and
  return them as before. A call may override the default with the keyword skip_logits=...;
- everything else (the output class and its other fields, return_dict=False tuples, attention
  and hidden-state outputs) is the model's.
The loss is in the op's statistics dtype: float32 for 16-bit features (as under autocast the
model's own loss is), the features' dtype otherwise. Like the models' own loss, it is the loss of
this process's batch, unless apply(gather_across_devices=True) (sentence-transformers' name for
it): then, in a torch.distributed run (transformers.Trainer's DDP), each rank's rows meet every
rank's batch through one all_gather of the [B, d] features, and the ranks' mean, which DDP's
gradient averaging differentiates, is the loss of the global batch (calrft_kernels' process_group
convention, docs/api.md).

`apply()` checks before it changes anything: each class must exist (Siglip2Model only where
asked for by name), its forward must take exactly the parameters the fused forward passes on,
and the output class must have the fields it fills. Otherwise it raises RuntimeError naming what
is missing and changes nothing; there is never a model that claims to be patched while it builds
its own loss. Install with `pip install 'calrft-kernels[transformers]'` (the version the tests
ran on)."""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .. import _backend, sigmoid
from ..contrastive import ContrastiveInputs, contrastive_terms
from ..sigmoid import SigmoidInputs, sigmoid_terms
from . import _patching

__all__ = ["apply", "unpatch", "active_patch", "TransformersPatch", "MODELS", "TESTED_VERSION"]

LIBRARY = "transformers"
TESTED_VERSION = "5.18.0"  # the version of setup.py's [transformers] extra
EXTRA = "calrft-kernels[transformers]"
FAMILY_BACKENDS = {"softmax": _backend.BACKENDS, "sigmoid": ("auto",) + sigmoid.KERNELS}
OUTPUT_FIELDS = ("loss", "logits_per_image", "logits_per_text", "text_embeds", "image_embeds",
                 "text_model_output", "vision_model_output")


@dataclass(frozen=True)
class ModelSpec:
    """How a model's forward is laid out: its module and output class, the loss family, and the
    attribute (method or submodule) that runs each tower with the forward's arguments it takes.
    norm: the module's own vector-norm helper (CLIP), or None for Tensor.norm (SigLIP)."""
    module: str
    output: str
    family: str
    vision: str
    vision_args: tuple
    text: str
    text_args: tuple
    norm: Optional[str] = None
    required: bool = True  # apply() without `models` refuses a transformers that lacks it

    @property
    def forward_params(self) -> set:
        return {*self.vision_args, *self.text_args, "return_loss", "kwargs"}


_TEXT_ARGS = ("input_ids", "attention_mask", "position_ids")
MODELS = {
    "CLIPModel": ModelSpec("transformers.models.clip.modeling_clip", "CLIPOutput", "softmax",
                           "get_image_features", ("pixel_values", "interpolate_pos_encoding"),
                           "get_text_features", _TEXT_ARGS, norm="_get_vector_norm"),
    "SiglipModel": ModelSpec("transformers.models.siglip.modeling_siglip", "SiglipOutput",
                             "sigmoid", "vision_model",
                             ("pixel_values", "interpolate_pos_encoding"), "text_model",
                             _TEXT_ARGS),
    "Siglip2Model": ModelSpec("transformers.models.siglip2.modeling_siglip2", "Siglip2Output",
                              "sigmoid", "vision_model",
                              ("pixel_values", "pixel_attention_mask", "spatial_shapes"),
                              "text_model", _TEXT_ARGS, required=False),
}


class TransformersPatch(_patching.Patch):
    """What `apply()` changed. replaced: {"module.Class.forward": the original} in patch order;
    families: {class name: "softmax" | "sigmoid"}; absent: {class name: why it was not patched};
    skip_logits: the training-forward default. Use as a context manager or call `unpatch()`;
    either restores every forward to its original."""
    library = LIBRARY

    def __init__(self, skip_logits: bool, backend: str, gather_across_devices: bool) -> None:
        super().__init__()
        self.skip_logits = skip_logits
        self.backend = backend
        self.gather_across_devices = gather_across_devices
        self.families: dict = {}
        self.absent: dict = {}

    def summary(self) -> str:
        """One line naming what was replaced (and what the installed transformers lacks)."""
        fused = ", ".join(f"{name} ({family})" for name, family in self.families.items())
        logits = "skipped" if self.skip_logits else "built"
        batch = "global (gathered)" if self.gather_across_devices else "this process's"
        line = (f"calrft_kernels: transformers {fused} return_loss -> fused "
                f"(calrft_kernels ops); logits in training forwards: {logits}; loss over "
                f"{batch} batch")
        if self.absent:
            line += "; not patched: " + ", ".join(f"{k} ({v})" for k, v in self.absent.items())
        return line

    def _repr_fields(self) -> dict:
        return {"skip_logits": self.skip_logits,
                "gather_across_devices": self.gather_across_devices, "absent": list(self.absent)}


def apply(models: Optional[Sequence[str]] = None, *, skip_logits: bool = True,
          gather_across_devices: bool = False, backend: str = "auto") -> TransformersPatch:
    """Make the models' `return_loss=True` use the fused ops; return the handle.

    models: class names among MODELS (default: CLIPModel, SiglipModel, and Siglip2Model where
    the installed transformers has it); skip_logits (default True): training forwards with
    return_loss=True leave logits_per_image / logits_per_text None (nothing B x B);
    gather_across_devices (default False): in a torch.distributed run, each rank's loss is its
    rows against the global batch (the default process group), not against its own; backend:
    the ops' backend ("auto": the C++ kernels on CPU tensors, the chunked path on CUDA).
    Raises RuntimeError (nothing changed) when a patch is already active, transformers is not
    installed, or a class, its forward's parameters or its output's fields are not what the
    fused forward relies on; TypeError / ValueError for a bad argument."""
    names = _check_models(models)
    for flag, value in (("skip_logits", skip_logits),
                        ("gather_across_devices", gather_across_devices)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be a bool, got {type(value).__name__}")
    _check_backend(backend, names)
    version = _version()
    with _patching.exclusive(LIBRARY):
        handle = TransformersPatch(skip_logits, backend, gather_across_devices)
        found, problems = {}, []
        for name in names:
            spec = MODELS[name]
            cls, output, reason = _lookup(name, spec)
            if cls is None:
                if spec.required or models is not None:
                    problems.append(reason)
                else:
                    handle.absent[name] = reason
                continue
            problems += _check_layout(name, spec, cls, output)
            found[name] = (spec, cls, output)
        if problems:
            raise RuntimeError(f"cannot patch transformers {version} (nothing was changed): "
                               + "; ".join(problems))
        changes = []
        for name, (spec, cls, output) in found.items():
            handle.families[name] = spec.family
            forward = _fused_forward(spec, cls.forward, output, _normaliser(spec), handle)
            changes.append((cls, "forward", forward, f"{spec.module}.{name}.forward"))
        handle.install(changes)
        return handle


def unpatch() -> None:
    """Undo the active patch; RuntimeError when there is none."""
    _patching.unpatch(LIBRARY)


def active_patch() -> Optional[TransformersPatch]:
    """The active patch's handle, or None."""
    return _patching.active(LIBRARY)


# --------------------------------------------------------------------------------------------
# Checks: everything the fused forward relies on, before anything changes
# --------------------------------------------------------------------------------------------
def _check_models(models) -> tuple:
    if models is None:
        return tuple(MODELS)
    if isinstance(models, str) or not all(isinstance(m, str) for m in models):
        raise TypeError(f"models must be a sequence of class names, got {models!r}")
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise ValueError(f"models must name some of {list(MODELS)}, got {list(models)!r}")
    return tuple(dict.fromkeys(models))


def _check_backend(backend, names) -> None:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    for name in names:
        family = MODELS[name].family
        if backend not in FAMILY_BACKENDS[family]:
            raise ValueError(f"backend={backend!r} is unavailable for {name}'s {family} loss "
                             f"(its backends: {', '.join(FAMILY_BACKENDS[family])})")


def _version() -> str:
    try:
        import transformers
    except ImportError as exc:
        raise RuntimeError(f"calrft_kernels' transformers integration needs transformers "
                           f"(pip install '{EXTRA}'): {exc}") from exc
    return getattr(transformers, "__version__", "?")


def _lookup(name: str, spec: ModelSpec):
    """(the class, its output class, None), or (None, None, why not)."""
    try:
        module = importlib.import_module(spec.module)
    except ImportError as exc:
        return None, None, f"{spec.module} cannot be imported ({exc})"
    cls = getattr(module, name, None)
    if not inspect.isclass(cls):
        return None, None, f"{spec.module}.{name} is missing"
    return cls, getattr(module, spec.output, None), None


def _check_layout(name: str, spec: ModelSpec, cls, output) -> list:
    problems = []
    if "forward" not in vars(cls):
        problems.append(f"{name} has no forward of its own")
    else:
        params = _patching.params(cls.forward)
        missing, extra = spec.forward_params - params, params - spec.forward_params
        if missing:
            problems.append(f"{name}.forward lacks {sorted(missing)}")
        if extra:
            problems.append(f"{name}.forward takes {sorted(extra)}, which the fused forward "
                            f"would not pass on")
        if not _uses_can_return_tuple(cls.forward):
            problems.append(f"{name}.forward is not wrapped by transformers.utils.generic."
                            f"can_return_tuple (its return_dict handling)")
    for tower, args in ((spec.vision, spec.vision_args), (spec.text, spec.text_args)):
        method = getattr(cls, tower, None)  # a submodule (SigLIP) is an instance attribute
        lacking = set(args) - _patching.params(method) if method is not None else set()
        if lacking:
            problems.append(f"{name}.{tower} does not take {sorted(lacking)}")
    if output is None:
        problems.append(f"{spec.module}.{spec.output} is missing")
    else:
        fields = {f.name for f in dataclasses.fields(output)} if dataclasses.is_dataclass(
            output) else set()
        if not set(OUTPUT_FIELDS) <= fields:
            problems.append(f"{spec.output} lacks the fields "
                            f"{sorted(set(OUTPUT_FIELDS) - fields)}")
    return problems


def _normaliser(spec: ModelSpec):
    """The model's own vector norm (so the features are bit for bit the model's), else
    Tensor.norm, which is what SigLIP's forward calls."""
    helper = getattr(importlib.import_module(spec.module), spec.norm, None) if spec.norm else None
    return helper or (lambda x: x.norm(p=2, dim=-1, keepdim=True))


# --------------------------------------------------------------------------------------------
# The fused forward
# --------------------------------------------------------------------------------------------
def _fused_forward(spec: ModelSpec, original, output, norm, handle: TransformersPatch):
    """The model's forward with the loss from the fused ops (and, in training forwards with
    return_loss under skip_logits, without the logits). Binds the call with the original's
    signature, so positional calls mean what they meant; return_dict is handled, as by the
    original, by transformers' can_return_tuple."""
    signature = inspect.signature(original)

    def forward(self, *args, skip_logits: Optional[bool] = None, **kwargs):
        call = signature.bind(self, *args, **kwargs)
        call.apply_defaults()
        given = call.arguments
        extra = dict(given.get("kwargs", {}))
        vision = getattr(self, spec.vision)(**{a: given[a] for a in spec.vision_args}, **extra)
        text = getattr(self, spec.text)(**{a: given[a] for a in spec.text_args}, **extra)
        text_embeds = text.pooler_output
        text_embeds = text_embeds / norm(text_embeds)
        image_embeds = vision.pooler_output
        image_embeds = (image_embeds / norm(image_embeds)).to(text_embeds.device)
        device = text_embeds.device
        scale = self.logit_scale.to(device).exp()
        bias = self.logit_bias.to(device) if spec.family == "sigmoid" else None
        return_loss = given["return_loss"]
        skip = handle.skip_logits if skip_logits is None else skip_logits
        logits_per_text = logits_per_image = loss = None
        if not (return_loss and self.training and skip):
            logits_per_text = torch.matmul(text_embeds, image_embeds.t()) * scale
            if bias is not None:
                logits_per_text = logits_per_text + bias
            logits_per_image = logits_per_text.t()
        if return_loss:
            loss = _loss(spec.family, image_embeds, text_embeds, scale, bias, handle.backend,
                         _group(handle.gather_across_devices))
        return output(loss=loss, logits_per_image=logits_per_image,
                      logits_per_text=logits_per_text, text_embeds=text_embeds,
                      image_embeds=image_embeds, text_model_output=text,
                      vision_model_output=vision)

    from transformers.utils.generic import can_return_tuple  # the original's (checked)
    return functools.wraps(original)(can_return_tuple(forward))


def _group(gather: bool):
    """The process group of a gathered loss: the default group of a distributed run with more
    than one rank, else None (one process: its batch is the global batch)."""
    if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def _loss(family: str, image, text, scale, bias, backend: str, group):
    """The model's loss from the fused ops, in the statistics dtype."""
    if image.dtype != text.dtype:  # towers kept in different dtypes
        dtype = torch.promote_types(image.dtype, text.dtype)
        image, text = image.to(dtype), text.to(dtype)
    if family == "softmax":
        return contrastive_terms(ContrastiveInputs.validate(
            image, text, scale, process_group=group, backend=backend)).contrastive
    return sigmoid_terms(SigmoidInputs.validate(image, text, scale, bias, process_group=group,
                                                backend=backend)).total


def _uses_can_return_tuple(function) -> bool:
    """Whether transformers' can_return_tuple (which handles return_dict) wraps `function`."""
    try:
        from transformers.utils.generic import can_return_tuple
    except ImportError:
        return False
    code = can_return_tuple(lambda self: None).__code__  # every wrapper it makes runs this code
    while function is not None:
        if getattr(function, "__code__", None) is code:
            return True
        function = getattr(function, "__wrapped__", None)
    return False
