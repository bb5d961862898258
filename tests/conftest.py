"""Test-wide set-up. TRITON_INTERPRET must be set before any triton kernel is decorated, so that
the Triton kernels run on CPU tensors here (no GPU on development or CI machines).

The suite runs under an address-space cap (RLIMIT_AS, inherited by every process a test starts):
a test that allocates without bound fails with a clean error (torch: RuntimeError "can't allocate
memory", Python: MemoryError) instead of exhausting the machine (24 GiB, no swap). 16 GiB by
default (the whole suite peaks far below it); CALRFT_TEST_AS_LIMIT sets another (bytes, or with a
K/M/G suffix; 0 = none). Not on a machine with an NVIDIA driver: CUDA reserves address space
for its unified memory at start-up, far beyond any cap of this kind."""
import os
import resource

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

DEFAULT_AS_LIMIT = "16G"


def address_space_limit() -> int:
    """The cap in bytes that this session applies (0: none), from CALRFT_TEST_AS_LIMIT."""
    text = os.environ.get("CALRFT_TEST_AS_LIMIT", DEFAULT_AS_LIMIT).strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    try:
        value = int(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise pytest.UsageError(f"CALRFT_TEST_AS_LIMIT: expected bytes or a K/M/G size, got {text!r}")
    return 0 if os.path.exists("/dev/nvidiactl") else value


def pytest_configure(config):
    limit = address_space_limit()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if limit and (soft == resource.RLIM_INFINITY or soft > limit):
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def pytest_report_header(config):
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    cap = "none" if soft == resource.RLIM_INFINITY else f"{soft / (1 << 30):g} GiB"
    return f"address-space cap (RLIMIT_AS, CALRFT_TEST_AS_LIMIT): {cap}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _launch_contracts():
    """Every Triton launch of every test (interpreted, on CPU tensors) is checked against its
    kernel's launch contract first (calrft_kernels/triton/launch_contract.py), so the contracts
    that tests/test_fake_cuda.py checks GPU launches against agree with launches whose numbers
    the suite verifies."""
    from calrft_kernels.testing.fake_cuda import checked_launches
    with checked_launches() as launches:
        yield launches


@pytest.fixture
def one_thread():
    """One torch thread for the test (restored after): the tiny trainer models' ops gain nothing
    from threads, and on a busy 2-core machine a second thread made each step ~20x slower.
    Modules that want it say `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
