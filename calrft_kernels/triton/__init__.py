"""Triton GPU kernels (they also run on CPU tensors under TRITON_INTERPRET=1, for tests)."""
from .contrastive import stats_backward, stats_forward

__all__ = ["stats_forward", "stats_backward"]
