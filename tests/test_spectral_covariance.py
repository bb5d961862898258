"""batch_covariance and CovarianceAccumulator against float64 references."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from calrft_kernels import _backend
from calrft_kernels.covariance import CovarianceAccumulator, batch_covariance
from calrft_kernels.reference import covariance_reference


def reference_cov(z, correction=1):
    return covariance_reference(z.double(), correction)[0]


def features(b, d, mean_ratio=50.0, dtype=torch.float32):
    spread = torch.logspace(-1, 0, d)
    z = torch.randn(b, d) * spread + mean_ratio * torch.randn(d)
    return z.to(dtype)


def rel_err(a, b):
    return float((a.double() - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("b,d", [(2, 1), (3, 2), (50, 7), (300, 257), (4099, 64)])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_large_mean_two_pass_quality(b, d, backend):
    z = features(b, d)
    got = batch_covariance(z, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (d, d)
    # one-pass fp32 (Z^T Z - B m m^T) would be off by ~50^2 * 1e-7 relative here
    assert rel_err(got, reference_cov(z)) < 2e-5


@pytest.mark.skipif(_backend.native()[0] is None, reason="native extension not built")
@pytest.mark.parametrize("fp64", [False, True])
def test_native_chunks_blocks_and_lower_only(fp64):
    """The CPU kernel past one chunk of rows (4068 at d = 1031: two chunks) and over seventeen
    64-wide Gram blocks, the last one 7 wide; fp64 accumulation of fp32 input; and the solver's
    lower_only form: the same lower triangle, exact zeros above it."""
    z = features(4500, 1031)
    ref = reference_cov(z)
    native = _backend.native()[0]
    full, mean = native.covariance_cpu(z, 1.0, fp64, False)
    assert full.dtype == (torch.float64 if fp64 else torch.float32)
    assert rel_err(full, ref) < (1e-12 if fp64 else 2e-5)
    assert torch.equal(full, full.T)
    assert float((mean - z.double().mean(0)).abs().max()) < 1e-9 * 50
    lower, _ = native.covariance_cpu(z, 1.0, fp64, True)
    assert torch.equal(lower, full.tril())


@pytest.mark.skipif(_backend.native()[0] is None, reason="native extension not built")
def test_native_rows_whose_mean_drifts():
    """The CPU kernel centres on the mean of the first chunk of rows and corrects the offset in
    fp64. Rows whose mean drifts by 3 spreads after the first 300 (sorted by class, say), over
    3 chunks: 4e-7..7e-7 measured; a shift from the first 256 rows alone gave 6e-6 (the
    B e e^T correction then cancels most of the shifted Gram)."""
    b, d = 9000, 700
    z = features(b, d)
    z[300:] += 3.0 * torch.randn(d).abs()
    got, mean = _backend.native()[0].covariance_cpu(z, 1.0, False, False)
    assert rel_err(got, reference_cov(z)) < 2e-6
    assert float((mean - z.double().mean(0)).abs().max()) < 1e-7


def test_one_pass_formula_would_fail():
    """The test above can fail: the naive fp32 one-pass formula misses the bound by far."""
    z = features(4099, 64)
    m = z.mean(0)
    naive = (z.T @ z - z.shape[0] * torch.outer(m, m)) / (z.shape[0] - 1)
    assert rel_err(naive, reference_cov(z)) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype):
    z = features(200, 33, mean_ratio=5.0, dtype=dtype)
    got = batch_covariance(z)
    assert got.dtype == dtype
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}[dtype]
    assert rel_err(got, reference_cov(z)) < tol


@pytest.mark.parametrize("correction", [0, 1, 2.5])
def test_correction_and_noncontiguous(correction):
    base = features(64, 90)
    z = base[::2, ::3]            # strided rows and columns
    assert not z.is_contiguous()
    assert rel_err(batch_covariance(z, correction), reference_cov(z, correction)) < 2e-5


def test_gradcheck():
    z = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: batch_covariance(t), (z,))
    assert torch.autograd.gradcheck(lambda t: batch_covariance(t, 0), (z,))


@pytest.mark.parametrize("bad,exc,name", [
    (torch.randn(4), ValueError, "z"),
    (torch.randint(0, 3, (4, 3)), TypeError, "z"),
    ([[1.0, 2.0]], TypeError, "z"),
])
def test_bad_input(bad, exc, name):
    with pytest.raises(exc, match=name):
        batch_covariance(bad)


def test_bad_values():
    z = torch.randn(10, 4)
    z[3, 1] = float("nan")
    with pytest.raises(ValueError, match="z"):
        batch_covariance(z)
    with pytest.raises(ValueError, match="correction"):
        batch_covariance(torch.randn(3, 4), correction=3)


# ---- accumulator ----------------------------------------------------------------------------

@pytest.mark.parametrize("splits", [[1, 1, 298], [100, 100, 100], [7, 0, 150, 143], [300]])
def test_accumulator_equals_batch(splits):
    z = features(300, 17)
    acc = CovarianceAccumulator(17)
    for part in z.split(splits):
        acc.update(part)
    assert acc.count == 300
    ref = reference_cov(z)
    assert rel_err(acc.covariance(), ref) < 2e-6
    assert rel_err(acc.covariance(0), reference_cov(z, 0)) < 2e-6
    assert float((acc.mean - z.double().mean(0)).abs().max()) < 1e-4


def test_merge_and_state_dict():
    z = features(257, 12, dtype=torch.float64)
    a, b = CovarianceAccumulator(12), CovarianceAccumulator(12)
    a.update(z[:100])
    b.update(z[100:])
    restored = CovarianceAccumulator(12)
    restored.load_state_dict(a.state_dict())     # checkpoint round trip
    restored.merge(b)
    assert rel_err(restored.covariance(), reference_cov(z)) < 1e-12
    with pytest.raises(ValueError, match="dim"):
        a.merge(CovarianceAccumulator(5))
    with pytest.raises(ValueError, match="columns"):
        a.update(torch.randn(3, 5))
    with pytest.raises(ValueError, match="the accumulator has 0 rows: a covariance needs at least two rows"):
        CovarianceAccumulator(3).covariance()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, z, out):
    from calrft_kernels.distributed import all_reduce_accumulator
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        acc = CovarianceAccumulator(z.shape[1])
        rows = z[:37] if rank == 0 else z[37:]       # unequal shards
        acc.update(rows)
        all_reduce_accumulator(acc)
        out[rank] = acc.covariance()
    finally:
        dist.destroy_process_group()


def test_all_reduce_two_gloo_processes():
    z = features(120, 9, dtype=torch.float64)
    out = torch.zeros(2, 9, 9, dtype=torch.float64).share_memory_()
    mp.spawn(_worker, args=(2, _free_port(), z, out), nprocs=2, join=True)
    ref = reference_cov(z)
    assert rel_err(out[0], ref) < 1e-12
    assert torch.equal(out[0], out[1])
