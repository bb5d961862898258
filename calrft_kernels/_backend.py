"""Which backends exist on this machine, and why not when one does not.

Importing this module never needs a GPU, triton or a built extension: every probe turns failures
into a reason string that error messages quote."""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os

# The extension links against torch's shared libraries (libc10, libtorch): they are found only
# once torch is loaded, so torch comes first whatever the user imports first.
import torch  # noqa: F401

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference", "chunked")
NATIVE_NAME = "calrft_kernels._C"


def _import_native():
    """(module, "") or (None, why): "not built" only when there is no extension file; a built one
    that fails to load says so with the loader's reason (a torch it was not built against, a
    missing library)."""
    try:
        return importlib.import_module(NATIVE_NAME), ""
    except ModuleNotFoundError as exc:
        if exc.name != NATIVE_NAME:  # the extension is there but needs a module that is not
            return None, f"the native extension {NATIVE_NAME} failed to load ({exc})"
        return None, (f"the native extension {NATIVE_NAME} is not built (pip install "
                      f"--no-build-isolation -e . builds it; see the README)")
    except ImportError as exc:  # found, but the loader refused it (missing library, bad symbol)
        return None, f"the native extension {NATIVE_NAME} failed to load ({exc})"


# Probed once at import (cheap, never fails): torch.compile traces through the dispatch code,
# and must find plain attributes here rather than an import it cannot trace.
_NATIVE = _import_native()


def native():
    """(module or None, reason): the compiled calrft_kernels._C."""
    return _NATIVE


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(None)
def _triton_import():
    try:
        import triton  # noqa: F401
        return True, ""
    except Exception as exc:  # pragma: no cover - triton ships with torch here
        return False, f"triton is not importable ({exc})"


def triton_usable(device) -> tuple[bool, str]:
    ok, why = _triton_import()
    if not ok:
        return ok, why
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
        return True, ""
    return False, (f"triton kernels run on CUDA tensors (or on CPU tensors under "
                   f"TRITON_INTERPRET=1), got a {device.type} tensor")


def cpu_native_usable(device) -> tuple[bool, str]:
    mod, why = native()
    if mod is None:
        return False, why
    if device.type != "cpu":
        return False, f"the C++ CPU kernels need CPU tensors, got a {device.type} tensor"
    return True, ""


def cuda_native_usable(device, symbol: str) -> tuple[bool, str]:
    mod, why = native()
    if mod is None:
        return False, why
    if not getattr(mod, "with_cuda", False):
        return False, "calrft_kernels._C was built without CUDA (see setup.py's build log)"
    if not hasattr(mod, symbol):
        return False, f"this op has no CUDA C++ kernel ({symbol})"
    if device.type != "cuda":
        return False, f"the CUDA kernels need CUDA tensors, got a {device.type} tensor"
    return True, ""


def resolve(backend: str, device, op: str, *, cuda_symbol: str | None = None,
            auto_cuda: str = "triton", chunked: bool = False,
            kernels: tuple | None = None) -> str:
    """Map backend="auto" to a concrete one for `device`, and check a forced one exists here.
    auto_cuda: what "auto" means on CUDA tensors for this op; chunked: whether the op has a
    "chunked" kernel (plain torch.mm plus optional Triton passes: runs on any device); kernels:
    the concrete backends the op has (None: every one of BACKENDS)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if kernels is not None and backend != "auto" and backend not in kernels:
        raise ValueError(f"backend={backend!r} is unavailable for {op}: it has no {backend} "
                         f"kernel (its backends: {', '.join(kernels)})")
    if backend == "chunked":
        if not chunked:
            raise ValueError(f"backend='chunked' is unavailable for {op}: it has no chunked kernel")
        return backend
    if backend == "auto":
        if device.type == "cuda":
            backend = auto_cuda
            if backend == "chunked":
                return backend
        elif device.type == "cpu":
            backend = "cpu"
        else:
            backend = "reference"
    if backend == "reference":
        return backend
    if backend == "cpu":
        ok, why = cpu_native_usable(device)
    elif backend == "triton":
        ok, why = triton_usable(device)
    else:
        ok, why = cuda_native_usable(device, cuda_symbol or f"{op}_cuda")
    if not ok:
        raise ValueError(f"backend={backend!r} is unavailable for {op}: {why}")
    return backend


# ---- checks that need a GPU value on the host -----------------------------------------------
# Some argument checks read a value computed on the device (a tensor logit scale, the finiteness
# of a weight): on CPU tensors that is free, on GPU tensors it is a host synchronisation per call.
# `device_checks(False)` skips exactly those checks for non-CPU tensors inside its block (the
# op's result is then NaN/inf where the check would have raised): for a training loop that must
# not synchronise per step and checks its loss at log steps. One policy for every op.
_DEVICE_CHECKS = contextvars.ContextVar("calrft_device_checks", default=True)


@contextlib.contextmanager
def device_checks(enabled: bool):
    """Within the block, run (True, the default) or skip (False) the argument checks that would
    synchronise with a GPU; CPU tensors and Python numbers are always checked. Thread- and
    task-local."""
    token = _DEVICE_CHECKS.set(bool(enabled))
    try:
        yield
    finally:
        _DEVICE_CHECKS.reset(token)


def host_checks_for(*tensors) -> bool:
    """Whether value checks should run for these tensors: always on CPU tensors, on others unless
    inside device_checks(False)."""
    return _DEVICE_CHECKS.get() or all(t.device.type == "cpu" for t in tensors)
