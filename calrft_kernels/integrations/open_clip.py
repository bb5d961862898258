"""`patch()`: open_clip's contrastive losses become the fused drop-ins of calrft_kernels.losses.

    from calrft_kernels.integrations import open_clip as calrft_open_clip
    calrft_open_clip.patch()          # or: with calrft_open_clip.patch(): ...

After it, `open_clip.create_loss(args)` (and open_clip_train, which calls it) builds
calrft_kernels' ClipLoss, SigLipLoss and DistillClipLoss with the same arguments, and gets the
same numbers without the B x B logits. The names are replaced where open_clip looks them up:
`open_clip.factory` (create_loss's globals), `open_clip.loss` and the `open_clip` package, so
code that constructs `open_clip.ClipLoss(...)` after the patch gets the fused loss too (a name
bound by `from open_clip import ClipLoss` before the patch keeps open_clip's class).
What the fused ops do not compute stays open_clip's own: CoCaLoss (its caption loss; its
contrastive half is open_clip's ClipLoss through inheritance). Horovod (use_horovod=True,
open_clip_train --horovod) is refused by the fused losses with a ValueError.

`patch()` checks before it changes anything: every name must exist, `create_loss` must look
the replaced names up, and each replacement must take every argument open_clip's class takes.
Otherwise it raises RuntimeError naming what is missing and leaves open_clip unpatched; there
is never a run that claims to be patched while open_clip builds its own losses.
"""
from __future__ import annotations

import inspect
from types import ModuleType
from typing import Optional

from .. import losses
from . import _patching

__all__ = ["patch", "unpatch", "active_patch", "OpenClipPatch", "REPLACEMENTS", "KEPT"]

# open_clip's name -> the fused drop-in
REPLACEMENTS = {"ClipLoss": losses.ClipLoss, "SigLipLoss": losses.SigLipLoss,
                "DistillClipLoss": losses.DistillClipLoss}
# The modules whose attributes hold those names. open_clip.factory is required (create_loss
# looks the classes up in its globals); the others are patched where they export the name.
REQUIRED_MODULE = "open_clip.factory"
OPTIONAL_MODULES = ("open_clip.loss", "open_clip")
# What stays open_clip's own, and why.
KEPT = {"CoCaLoss": "its caption loss has no fused op; its contrastive half is open_clip's "
                    "ClipLoss through inheritance"}
LIBRARY = "open_clip"


class OpenClipPatch(_patching.Patch):
    """What `patch()` changed. replaced: {"module.Name": the original object} in patch order;
    kept: {open_clip name: why it stays open_clip's}. Use as a context manager or call
    `unpatch()`; either restores every replaced name to its original object."""
    library = LIBRARY

    def __init__(self) -> None:
        super().__init__()
        self.kept = dict(KEPT)

    def summary(self) -> str:
        """One line naming what was replaced and what was kept."""
        names = sorted({qualified.rsplit(".", 1)[1] for qualified in self.replaced})
        return (f"calrft_kernels: open_clip {', '.join(names)} -> fused "
                f"(calrft_kernels.losses); kept open_clip's own: {', '.join(self.kept)}")

    def _repr_fields(self) -> dict:
        return {"kept": list(self.kept)}


def patch() -> OpenClipPatch:
    """Replace open_clip's ClipLoss, SigLipLoss and DistillClipLoss by the fused drop-ins; return
    the handle. Raises RuntimeError (nothing changed) when a patch is already active, or when the
    installed open_clip lacks a name, its create_loss does not look them up, or its classes take
    an argument the drop-ins do not."""
    modules = _modules()
    with _patching.exclusive(LIBRARY):
        _check(modules[REQUIRED_MODULE])
        handle = OpenClipPatch()
        handle.install((module, name, REPLACEMENTS[name], f"{module_name}.{name}")
                       for module_name, module in modules.items() for name in REPLACEMENTS
                       if module_name == REQUIRED_MODULE or hasattr(module, name))
        return handle


def unpatch() -> None:
    """Undo the active patch; RuntimeError when there is none."""
    _patching.unpatch(LIBRARY)


def active_patch() -> Optional[OpenClipPatch]:
    """The active patch's handle, or None."""
    return _patching.active(LIBRARY)


def _modules() -> dict:
    import importlib
    try:
        return {name: importlib.import_module(name)
                for name in (REQUIRED_MODULE,) + OPTIONAL_MODULES}
    except ImportError as exc:
        raise RuntimeError(f"calrft_kernels' open_clip patch needs open_clip_torch (>= 3.3): "
                           f"{exc}") from exc


def _check(factory: ModuleType) -> None:
    """Everything patch() relies on, checked before anything changes."""
    problems = [f"open_clip.factory.{name} is missing" for name in REPLACEMENTS
                if not inspect.isclass(getattr(factory, name, None))]
    create_loss = getattr(factory, "create_loss", None)
    if create_loss is None:
        problems.append("open_clip.factory.create_loss is missing")
    else:
        unused = [n for n in REPLACEMENTS if n not in create_loss.__code__.co_names]
        if unused:
            problems.append(f"open_clip.factory.create_loss does not build {', '.join(unused)} "
                            f"by name (patching would not reach it)")
    for name, ours in REPLACEMENTS.items():
        theirs = getattr(factory, name, None)
        if inspect.isclass(theirs):
            for method in ("__init__", "forward"):
                extra = (_patching.params(getattr(theirs, method))
                         - _patching.params(getattr(ours, method)))
                if extra:
                    problems.append(f"open_clip's {name}.{method} takes {sorted(extra)}, which "
                                    f"calrft_kernels.losses.{name} does not")
    if problems:
        import open_clip
        version = getattr(open_clip, "__version__", "?")
        raise RuntimeError(f"cannot patch open_clip {version} (nothing was changed): "
                           + "; ".join(problems))
