"""The handle convention every integration shares: one active patch per library, a handle that
records each replaced attribute with its original, restores them exactly (in reverse order) when
undone or when its context is left, and refuses a second patch or a second undo.

A library's module builds its handle (a Patch subclass naming the library), checks what it relies
on inside `exclusive(library)`, then calls `handle.install(...)` with the attributes to replace."""
from __future__ import annotations

import inspect
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Optional

_lock = threading.RLock()
_active: dict = {}  # library -> its active Patch


@dataclass(frozen=True)
class Replacement:
    """One replaced attribute: owner.name (a module's global or a class's method) was original;
    own: whether owner held it itself (a class may inherit it, and then gets it back by
    deleting the replacement)."""
    owner: Any
    name: str
    qualified: str
    original: Any
    new: Any
    own: bool


class Patch:
    """Base of the integrations' handles. Use as a context manager or call `unpatch()`; either
    restores every replaced attribute to its original object."""
    library: ClassVar[str] = ""

    def __init__(self) -> None:
        self.replacements: list = []
        self.active = False

    @property
    def replaced(self) -> dict:
        """{qualified name: the library's original}, in patch order."""
        return {r.qualified: r.original for r in self.replacements}

    def install(self, changes: Iterable[tuple]) -> None:
        """Replace each (owner, name, new, qualified) and make this the library's active patch.
        Call inside `exclusive(self.library)`, after every check passed."""
        with _lock:
            for owner, name, new, qualified in changes:
                own = name in vars(owner)
                original = vars(owner)[name] if own else getattr(owner, name)
                self.replacements.append(Replacement(owner, name, qualified, original, new, own))
                setattr(owner, name, new)
            self.active = True
            _active[self.library] = self

    def unpatch(self) -> None:
        with _lock:
            if not self.active or _active.get(self.library) is not self:
                raise RuntimeError(f"this calrft_kernels {self.library} patch is not active "
                                   f"(already unpatched)")
            for r in reversed(self.replacements):
                if vars(r.owner).get(r.name) is not r.new:
                    warnings.warn(f"{r.qualified} was changed by someone else after "
                                  f"calrft_kernels patched it; restoring {self.library}'s "
                                  f"original over it", RuntimeWarning, stacklevel=3)
                if r.own:
                    setattr(r.owner, r.name, r.original)
                elif r.name in vars(r.owner):
                    delattr(r.owner, r.name)
            self.active = False
            del _active[self.library]

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            self.unpatch()

    def _repr_fields(self) -> dict:
        """What __repr__ lists after the replaced names (subclasses add theirs)."""
        return {}

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        fields = {"replaced": list(self.replaced), **self._repr_fields()}
        return f"{type(self).__name__}({state}, " + ", ".join(
            f"{k}={v}" for k, v in fields.items()) + ")"


@contextmanager
def exclusive(library: str):
    """Hold the patch lock; RuntimeError when `library` already has an active patch."""
    with _lock:
        if library in _active:
            raise RuntimeError(f"{library} is already patched by calrft_kernels; call unpatch() "
                               f"(or leave the first patch's context) before patching again")
        yield


def active(library: str) -> Optional[Patch]:
    """The library's active handle, or None."""
    return _active.get(library)


def unpatch(library: str) -> None:
    """Undo the library's active patch; RuntimeError when there is none."""
    handle = _active.get(library)
    if handle is None:
        raise RuntimeError(f"{library} is not patched by calrft_kernels: nothing to unpatch")
    handle.unpatch()


def params(function) -> set:
    """The parameter names of a function or method, self excluded (the signature checks)."""
    return {name for name in inspect.signature(function).parameters if name != "self"}
