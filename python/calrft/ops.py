"""The fused ops the trainer composes, from calrft_kernels (one import site, so call sites use the
api.md names and nothing here re-implements them)."""
from calrft_kernels import (CaRotLoss, CovarianceAccumulator, contrastive_loss,  # noqa: F401
                            covariance_sigma_min)
