"""`calrft env`: what this installation runs on, and a self-check of each backend that runs here.

The first thing to paste into a bug report (as `python -m torch.utils.collect_env` is torch's):
versions, the native extension's state (loaded, or why not), the GPU, and for each backend that
runs on this machine one small float64 problem through the public op, compared with the plain
reference. A backend that should run here but fails its check makes the command exit 1."""
from __future__ import annotations

import platform
from dataclasses import dataclass


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _version(dist: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _compare(name: str, run, reference, tol: float = 1e-10) -> Check:
    try:
        got, want = run(), reference()
    except Exception as exc:  # noqa: BLE001 - the check reports whatever went wrong
        return Check(name, False, f"{type(exc).__name__}: {' '.join(str(exc).split())}")
    err = float((got - want).abs().max())
    return Check(name, err <= tol, f"max |difference| from the reference {err:.1e} (tolerance {tol:.0e})")


def self_checks() -> list[Check]:
    """The C++ CPU kernels (and the CUDA ones on a GPU) against the float64 reference."""
    import torch

    import calrft_kernels as ck
    from calrft_kernels import _backend

    gen = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(37, 19, generator=gen, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(37, 19, generator=gen, dtype=torch.float64), dim=1)
    z = torch.randn(45, 11, generator=gen, dtype=torch.float64) + 3.0
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    checks = []
    for dev in devices:
        backend = "cpu" if dev == "cpu" else "auto"
        a, b, y = img.to(dev), txt.to(dev), z.to(dev)
        checks.append(_compare(
            f"contrastive_loss(backend={backend!r}) on {dev}",
            lambda: ck.contrastive_loss(a, b, 20.0, backend=backend).cpu(),
            lambda: ck.contrastive_loss(img, txt, 20.0, backend="reference")))
        checks.append(_compare(
            f"sigmoid_loss(backend={backend!r}) on {dev}",
            lambda: ck.sigmoid_loss(a, b, 10.0, -10.0, backend=backend).cpu(),
            lambda: ck.sigmoid_loss(img, txt, 10.0, -10.0, backend="reference")))
        checks.append(_compare(
            f"batch_covariance(backend={backend!r}) on {dev}",
            lambda: ck.batch_covariance(y, backend=backend).cpu(),
            lambda: ck.batch_covariance(z, backend="reference")))
    cov = ck.batch_covariance(z, backend="reference")
    checks.append(_compare(
        "smallest_eigenvalue(method='davidson') on cpu",
        lambda: ck.smallest_eigenvalue(cov, method="davidson", tol=1e-12)[0],
        lambda: torch.linalg.eigvalsh(cov)[0], tol=1e-9))
    if _backend.native()[0] is None:
        checks.insert(0, Check("native extension calrft_kernels._C", False, _backend.native()[1]))
    return checks


def report() -> tuple[str, bool]:
    """(the text `calrft env` prints, whether every check passed)."""
    import torch

    import calrft
    from calrft_kernels import _backend
    mod, why = _backend.native()
    if mod is not None:
        native = "loaded, with CUDA kernels" if getattr(mod, "with_cuda", False) else \
            "loaded, CPU kernels only (built without CUDA)"
    else:
        native = why
    if torch.cuda.is_available():
        gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    else:
        gpu = "none visible"
    lines = [
        f"calrft {calrft.__version__} (calrft-kernels {_version('calrft-kernels')})",
        f"python {platform.python_version()} on {platform.platform()}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), triton {_version('triton')}, "
        f"open_clip_torch {_version('open_clip_torch')}, webdataset {_version('webdataset')}",
        f"GPU: {gpu}",
        f"native extension calrft_kernels._C: {native}",
        "self-check against the float64 reference:",
    ]
    checks = self_checks()
    lines += [f"  {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}" for c in checks]
    return "\n".join(lines), all(c.ok for c in checks)
