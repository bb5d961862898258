"""torch.library.opcheck of the contrastive custom ops (schema, fake kernel, autograd
registration, AOT dispatch) on small CPU inputs, for every kernel that runs here: the C++ kernel,
the fused Triton kernels (interpreted), the chunked kernel and the reference."""
import pytest
import torch

import calrft_kernels.contrastive  # noqa: F401  (registers the ops)
from _op_util import pair_operands

BACKENDS = ["cpu", "triton", "chunked", "reference"]


def _args(teacher, with_cols, backend, dtype=torch.float32, requires_grad=True):
    x = pair_operands(teacher, dtype, requires_grad)
    return (x.q, x.k, x.scale, x.bias, x.tq, x.tk, x.tscale, with_cols, backend,
            3 if backend == "chunked" else 0)


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
