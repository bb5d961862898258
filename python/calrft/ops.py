"""The fused ops the trainer composes (one import site, so call sites use the api.md names)."""
from calrft_kernels import contrastive_loss  # noqa: F401

try:
    from calrft_kernels import CaRotLoss, CovarianceAccumulator, covariance_sigma_min  # noqa: F401
    import calrft_kernels.spectral  # noqa: F401  (CaRotLoss needs it at call time)
except ImportError:  # TEMPORARY while the spectral ops land on main; deleted before the branch is done.
    from calrft._shim import CaRotLoss, CovarianceAccumulator, covariance_sigma_min  # noqa: F401

# TEMPORARY: main's _C has no CPU contrastive kernel yet; use the op's reference backend meanwhile.
from calrft_kernels import _backend as _b  # noqa: E402
if not hasattr(_b.native()[0], "contrastive_stats_forward_cpu"):
    import functools as _f
    contrastive_loss = _f.partial(contrastive_loss, backend="reference")  # noqa: F811
