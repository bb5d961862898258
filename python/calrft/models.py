"""Model creation: any open_clip architecture, plus the project's tiny ones for CPU runs and tests.

The tiny architectures are real open_clip CLIPs (ViT image tower with `visual.proj`, transformer
text tower with `text_projection`), registered through open_clip's model-config registry so that
`open_clip.create_model("calrft-tiny")` works like any built-in name. calrft-tiny-sigmoid is the
same towers SigLIP-style: a learnable logit bias (init_logit_bias -10) and logit scale log 10,
the initialisation open_clip_train's --siglip uses, so the trainer's --loss auto picks the
sigmoid family for it."""
from __future__ import annotations

import os
from pathlib import Path

import open_clip
import torch

TINY = "calrft-tiny"
TINY_SIGMOID = "calrft-tiny-sigmoid"  # not "...siglip": open_clip would pick its T5 tokenizer
_CONFIG_DIR = Path(__file__).with_name("model_configs")


def register_tiny_architecture() -> None:
    """Make calrft-tiny and calrft-tiny-sigmoid known to open_clip (idempotent)."""
    if not {TINY, TINY_SIGMOID} <= set(open_clip.list_models()):
        open_clip.add_model_config(_CONFIG_DIR)


register_tiny_architecture()


def tiny_config(name: str = TINY) -> dict:
    import json
    return json.loads((_CONFIG_DIR / f"{name}.json").read_text())


def create(model_name: str, pretrained: str | None = None, device="cpu", cache_dir=None):
    """(model, train_transform, eval_transform, tokenizer) for an open_clip architecture.

    `pretrained` is an open_clip tag (needs the network) or a local checkpoint path: an
    open_clip/OpenAI weight file, or a calrft checkpoint (its "state_dict" entry is what open_clip
    reads). None or "" means random initialisation. Weights that carry a logit bias (a SigLIP-style
    run: open_clip_train --siglip, or calrft's sigmoid family) build the architecture with one,
    as open_clip_train does, so that they load (and --loss auto picks the sigmoid family)."""
    if model_name not in open_clip.list_models() and not model_name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"model_name: unknown open_clip architecture {model_name!r}")
    if pretrained and os.sep not in pretrained and not os.path.exists(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            raise ValueError(f"pretrained: {pretrained!r} is neither a file nor one of the open_clip "
                             f"tags for {model_name} ({', '.join(tags) or 'none'})")
    elif pretrained and not os.path.exists(pretrained):
        raise ValueError(f"pretrained: no such file {pretrained!r}")
    model_kwargs = {}
    if pretrained and os.path.isfile(pretrained) and _weights_have_logit_bias(pretrained) and \
            "init_logit_bias" not in (open_clip.get_model_config(model_name) or {}):
        model_kwargs["init_logit_bias"] = 0.0  # the file's value replaces it
    try:
        model, train_tf, eval_tf = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained or None, device=device, cache_dir=cache_dir,
            **model_kwargs)
    except RuntimeError as exc:
        if "Failed to download" not in str(exc):
            raise
        raise ValueError(f"pretrained: open_clip could not download the {pretrained!r} weights of "
                         f"{model_name} (no network?); fetch them where there is one into --cache-dir, "
                         f"or give a local weights file ({' '.join(str(exc).split())[:160]})") from None
    tokenizer = open_clip.get_tokenizer(model_name)
    return model, train_tf, eval_tf, tokenizer


def _weights_have_logit_bias(path: str) -> bool:
    """Whether a weights file (torch or .safetensors; a bare state dict or {"state_dict": ...},
    keys perhaps prefixed "module." by DDP) holds a logit_bias, read without loading the
    tensors (memory-mapped)."""
    from . import checkpoint
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            names = set(f.keys())
    else:
        state = checkpoint.load(path, what="pretrained", mmap=True)
        names = set(state.get("state_dict", state))
    return bool({"logit_bias", "module.logit_bias"} & names)


def visual_projection(model) -> torch.Tensor | None:
    """W_v [width, embed], the last linear map of the image tower: open_clip ViTs' visual.proj, or
    a timm tower's linear head (timm_proj "linear": visual.head.proj). None for towers without
    one (timm_proj "none", e.g. open_clip's ViT-*-SigLIP; ResNets)."""
    visual = getattr(model, "visual", None)
    proj = getattr(visual, "proj", None)
    if proj is None:
        proj = getattr(getattr(visual, "head", None), "proj", None)
    if isinstance(proj, torch.nn.Linear):
        return proj.weight.T
    return proj if isinstance(proj, torch.Tensor) else None


def text_projection(model) -> torch.Tensor | None:
    proj = getattr(model, "text_projection", None)
    if isinstance(proj, torch.nn.Linear):
        return proj.weight.T
    return proj


def logit_bias(model) -> torch.Tensor | None:
    """The learnable logit bias of a SigLIP-style model (open_clip builds one when the config has
    init_logit_bias, as open_clip_train's --siglip does), or None."""
    return getattr(model, "logit_bias", None)


def unwrap(model):
    """The open_clip model inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def set_grad_checkpointing(model, enable: bool = True) -> None:
    """Activation checkpointing in the model's transformer towers (open_clip's
    set_grad_checkpointing): each residual block's activations are recomputed in the backward
    instead of kept, trading about one more forward for memory."""
    model = unwrap(model)
    setter = getattr(model, "set_grad_checkpointing", None)
    if setter is None:
        raise ValueError(f"grad_checkpointing: {type(model).__name__} has no set_grad_checkpointing")
    setter(enable)
