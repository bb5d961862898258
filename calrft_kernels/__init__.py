"""calrft-kernels: fused kernels for calibrated robust fine-tuning (CaRot) of CLIP models.

The public API of docs/api.md; every op takes CPU or CUDA tensors and picks its backend by
dispatch (backend="auto": the chunked / cuBLAS paths on CUDA, the C++ kernels on CPU).
`device_checks(False)` scopes off the argument checks that would synchronise with a GPU."""
from ._backend import device_checks  # first: it loads torch, then the native extension
from .contrastive import contrastive_loss
from .sigmoid import sigmoid_loss
from .losses import CaRotLoss, ClipLoss, DistillClipLoss, SigLipLoss
from .covariance import CovarianceAccumulator, batch_covariance
from .eigen import covariance_sigma_min, smallest_eigenvalue, smallest_singular_value
from .orthogonality import orthogonality_loss

__all__ = ["contrastive_loss", "ClipLoss", "DistillClipLoss", "CaRotLoss", "sigmoid_loss",
           "SigLipLoss", "batch_covariance", "CovarianceAccumulator", "smallest_eigenvalue",
           "covariance_sigma_min", "smallest_singular_value", "orthogonality_loss",
           "device_checks"]
__version__ = "0.1.0"
