"""Test and benchmark hooks: native entry points that are not part of the public API.

Production code never imports this module. Tests and benchmarks reach the kernels' internal
pieces (a thin-block kernel, the preconditioner's Cholesky, an element-wise exp, ...) through the
functions here, so the production surface of calrft_kernels._C stays the ops the package calls.
Each op family keeps its own section below.
"""
from __future__ import annotations

from . import _backend


def native_testing():
    """The compiled test-only submodule ``calrft_kernels._C.testing``, or raise with the reason
    it is unavailable (the extension is not built)."""
    mod, why = _backend.native()
    if mod is None:
        raise RuntimeError(why)
    return getattr(mod, "testing", mod)


def available() -> bool:
    """Whether the native test hooks can be called on this machine."""
    return _backend.native()[0] is not None
