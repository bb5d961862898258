"""pytest-benchmark timings of the spectral ops (no assertions on speed; numbers only).

    PYTHONPATH=. python -m pytest benchmarks/test_bench_spectral.py --benchmark-only
The goal ratios are computed by benchmarks/bench_spectral.py (interleaved, one run)."""
import pytest
import torch

from benchmarks._common import spectrum_matrix
from calrft_kernels import batch_covariance, covariance_sigma_min, smallest_eigenvalue


def _matrix(d, kappa=1e4):
    return spectrum_matrix(d, kappa, seed=0)


@pytest.mark.parametrize("d", [512])
def test_eigvalsh_fp64(benchmark, d):
    a = _matrix(d)
    benchmark(torch.linalg.eigvalsh, a)


@pytest.mark.parametrize("d", [512])
def test_smallest_eigenvalue_cold(benchmark, d):
    a = _matrix(d)
    value, _ = benchmark(smallest_eigenvalue, a)
    ref = torch.linalg.eigvalsh(a)[0]
    assert abs(float(value - ref)) <= 1e-4 * float(ref)


@pytest.mark.parametrize("d", [512])
def test_smallest_eigenvalue_warm(benchmark, d):
    a = _matrix(d)
    _, v, info = smallest_eigenvalue(a, return_info=True)
    b = a * (1 + 1e-4)
    benchmark(lambda: smallest_eigenvalue(b, v0=v, factor=info))


def test_covariance_sigma_min(benchmark):
    z = torch.randn(2048, 512) * torch.logspace(-2, 0, 512) + 50
    benchmark(covariance_sigma_min, z)


def test_batch_covariance(benchmark):
    z = torch.randn(16384, 512) + 50
    benchmark(batch_covariance, z)
