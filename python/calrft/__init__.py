"""calrft: a thin trainer for calibrated robust fine-tuning (CaRot) of open_clip models.

It composes the fused ops of `calrft_kernels` with open_clip, PyTorch and a few well-kept
libraries; it never re-implements a kernel."""
__version__ = "0.1.0"
