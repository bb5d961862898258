"""Compatibility module: the spectral ops now live by family.

  calrft_kernels.covariance     batch_covariance, CovarianceAccumulator, all_reduce_accumulator
  calrft_kernels.eigen          smallest_eigenvalue, covariance_sigma_min, smallest_singular_value,
                                EigenInfo (block Davidson, shift-invert Lanczos, dense eigh)
  calrft_kernels.orthogonality  orthogonality_loss
Import from those (or from calrft_kernels); this module only re-exports their public names."""
from .covariance import CovarianceAccumulator, all_reduce_accumulator, batch_covariance
from .eigen import EigenInfo, covariance_sigma_min, smallest_eigenvalue, smallest_singular_value
from .orthogonality import orthogonality_loss

__all__ = ["batch_covariance", "CovarianceAccumulator", "all_reduce_accumulator",
           "smallest_eigenvalue", "covariance_sigma_min", "smallest_singular_value",
           "orthogonality_loss", "EigenInfo"]
