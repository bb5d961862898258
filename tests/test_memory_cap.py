"""The suite's address-space cap (tests/conftest.py, issue 22): an unbounded allocation in a test
fails as an error instead of taking the 24 GiB machine down."""
import os
import resource
import subprocess
import sys

import pytest
import torch

from conftest import address_space_limit

LIMIT = address_space_limit()
pytestmark = pytest.mark.skipif(LIMIT == 0, reason="cap turned off (CALRFT_TEST_AS_LIMIT=0 or a CUDA machine)")


def test_the_cap_is_set_for_this_process():
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    assert soft == LIMIT and LIMIT <= 16 << 30


def test_an_allocation_past_the_cap_is_an_error():
    """18 GiB: above the 16 GiB cap, below the machine's 24 GiB (so without the cap it would only
    reserve address space, never touch it)."""
    with pytest.raises(RuntimeError, match="allocate"):
        torch.empty(18 << 30, dtype=torch.uint8)


def test_processes_a_test_starts_inherit_the_cap():
    code = "import resource; print(resource.getrlimit(resource.RLIMIT_AS)[0])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ))
    assert int(out.stdout) == LIMIT
