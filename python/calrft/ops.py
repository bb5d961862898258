"""The fused ops the trainer composes (one import site, so call sites use the api.md names)."""
try:
    from calrft_kernels import (CaRotLoss, CovarianceAccumulator, contrastive_loss,  # noqa: F401
                                covariance_sigma_min)
except ImportError:  # TEMPORARY while the ops land on main; deleted before the branch is done.
    from calrft._shim import (CaRotLoss, CovarianceAccumulator, contrastive_loss,  # noqa: F401
                              covariance_sigma_min)
