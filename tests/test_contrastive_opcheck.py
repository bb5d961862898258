"""torch.library.opcheck of the contrastive custom ops (schema, fake kernel, autograd
registration, AOT dispatch) on small CPU inputs, for every kernel that runs here: the C++ kernel,
the fused Triton kernels (interpreted), the chunked kernel and the reference."""
import pytest
import torch

import calrft_kernels.contrastive  # noqa: F401  (registers the ops)

BACKENDS = ["cpu", "triton", "chunked", "reference"]


def _args(teacher, with_cols, backend, dtype=torch.float32, requires_grad=True):
    gen = torch.Generator().manual_seed(0)
    m, n, d = 7, 5, 3
    q = torch.randn(m, d, generator=gen, dtype=dtype).requires_grad_(requires_grad)
    k = torch.randn(n, d, generator=gen, dtype=dtype).requires_grad_(requires_grad)
    scale = torch.tensor(2.5, dtype=dtype).requires_grad_(requires_grad)
    bias = torch.tensor(-0.5, dtype=dtype).requires_grad_(requires_grad)
    if teacher:
        tq, tk = torch.randn(m, 4, generator=gen, dtype=dtype), torch.randn(n, 4, generator=gen,
                                                                          dtype=dtype)
        tscale = torch.tensor(1.5, dtype=dtype)
    else:
        tq = tk = tscale = None
    return (q, k, scale, bias, tq, tk, tscale, with_cols, backend, 3 if backend == "chunked" else 0)


@pytest.mark.parametrize("with_cols", [True, False])
@pytest.mark.parametrize("teacher", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_contrastive_stats(backend, teacher, with_cols):
    torch.library.opcheck(torch.ops.calrft.contrastive_stats.default,
                          _args(teacher, with_cols, backend))


@pytest.mark.parametrize("teacher", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_contrastive_stats_backward(backend, teacher):
    q, k, scale, bias, tq, tk, tscale, _, _, chunk = _args(teacher, True, backend,
                                                           requires_grad=False)
    rows, cols = torch.ops.calrft.contrastive_stats(q, k, scale, bias, tq, tk, tscale, True,
                                                    backend, chunk)
    gen = torch.Generator().manual_seed(1)
    grad_row, grad_col = torch.randn(rows.shape, generator=gen), torch.randn(cols.shape,
                                                                             generator=gen)
    torch.library.opcheck(torch.ops.calrft.contrastive_stats_backward.default,
                          (grad_row, grad_col, q, k, scale, bias, tq, tk, tscale, rows, cols,
                           True, backend, chunk))


def test_opcheck_float64_chunked_and_reference():
    for backend in ("chunked", "reference", "cpu"):
        torch.library.opcheck(torch.ops.calrft.contrastive_stats.default,
                              _args(True, True, backend, dtype=torch.float64))
