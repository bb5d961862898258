"""The fused ops the trainer composes, from calrft_kernels (one import site, so call sites use the
api.md names and nothing here re-implements them). covariance_sigma_min enters through CaRotLoss
(its sigma_min_weight regulariser); evaluation's sigma_min of standardised features is
smallest_eigenvalue of the correlation matrix built from a CovarianceAccumulator."""
from calrft_kernels import (CaRotLoss, CovarianceAccumulator, contrastive_loss,  # noqa: F401
                            device_checks, sigmoid_loss, smallest_eigenvalue)
