"""Test-wide set-up. TRITON_INTERPRET must be set before any triton kernel is decorated, so that
the Triton kernels run on CPU tensors here (no GPU on development or CI machines)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
