"""covariance_sigma_min(root=True): sqrt(lambda_min + eps), the smooth sigma_min option."""
import pytest
import torch

from calrft_kernels import covariance_sigma_min


def features(b, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, d, dtype=torch.float64)
    return torch.randn(b, d, generator=gen, dtype=torch.float64) * scales + 3.0


@pytest.mark.parametrize("b,d,eps", [(5, 1, 0.0), (40, 7, 1e-6), (131, 33, 1e-3)])
def test_root_matches_float64_eigvalsh(b, d, eps):
    z = features(b, d, seed=b)
    lam = torch.linalg.eigvalsh(torch.cov(z.T).reshape(d, d))[0]
    got = covariance_sigma_min(z, eps=eps, root=True)
    torch.testing.assert_close(got, torch.sqrt(lam + eps), rtol=1e-6, atol=0.0)
    plain = covariance_sigma_min(z, eps=eps)
    torch.testing.assert_close(got, torch.sqrt(plain), rtol=1e-12, atol=0.0)


def test_root_gradcheck_float64():
    z = features(12, 3, seed=1).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: covariance_sigma_min(z, eps=1e-3, root=True), (z,))


def test_root_must_be_bool():
    with pytest.raises(TypeError, match="root must be a bool"):
        covariance_sigma_min(features(9, 2), root=1)
