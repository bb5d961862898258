"""Test-wide set-up. TRITON_INTERPRET must be set before any triton kernel is decorated, so that
the Triton kernels run on CPU tensors here (no GPU on development or CI machines)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One torch thread for the test (restored after): the tiny trainer models' ops gain nothing
    from threads, and on a busy 2-core machine a second thread made each step ~20x slower.
    Modules that want it say `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
