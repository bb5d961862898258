"""orthogonality_loss: ||W^T W - I||_F (Frobenius norm, not squared), CaRot's OC term.

Computed on the exactly rescaled matrix Ws = W / s (s = the power of two nearest max |W|, or 1
when that is smaller):
||W^T W - I||_F = s^2 ||Ws^T Ws - I / s^2||_F, so the Gram matrix of entries of any size
neither overflows nor underflows (an fp32 W of entries ~1e20 used to give NaN); near
orthogonality s is 1 or a power of two close to it, so nothing changes there. W^T W - I is formed
directly, never via ||W^T W||^2 - 2||W||^2 + n (which cancels catastrophically near
orthogonality). Forward and backward in fp32 (fp64 for fp64 input)."""
from __future__ import annotations

import torch
from torch import Tensor

from . import _backend
from ._checks import check_finite, check_tensor, compute_dtype, power_of_two_scale


def _scaled_residual(w: Tensor, scale: float):
    """(Ws, Es = Ws^T Ws - I / s^2, ||Es||_F) in the compute dtype."""
    ct = compute_dtype(w.dtype)
    ws = w.to(ct) / scale
    es = ws.T @ ws
    es.diagonal().sub_(1.0 / (scale * scale))
    return ws, es, torch.linalg.matrix_norm(es)


@torch.library.custom_op("calrft::orthogonality_loss", mutates_args=())
def _orth_op(w: Tensor, scale: float) -> Tensor:
    _, _, norm = _scaled_residual(w, scale)
    return ((norm * scale) * scale).to(w.dtype)


@_orth_op.register_fake
def _(w, scale):
    return w.new_empty(())


def _orth_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.scale = inputs[1]


def _orth_backward(ctx, grad):
    (w,) = ctx.saved_tensors
    s = ctx.scale
    ws, es, norm = _scaled_residual(w, s)
    ct = es.dtype
    # d||E||_F / dW = 2 W E / ||E||_F with E = s^2 Es, W = s Ws: = 2 s Ws Es / ||Es||_F.
    # At E = 0 the norm has no gradient: use 0.
    factor = torch.where(norm > 0, grad.to(ct) / norm.clamp_min(torch.finfo(ct).tiny),
                         torch.zeros_like(norm))
    return (2 * s * factor * (ws @ es)).to(w.dtype), None


_orth_op.register_autograd(_orth_backward, setup_context=_orth_setup)


def orthogonality_loss(w: Tensor) -> Tensor:
    """||w^T w - I||_F (Frobenius norm, not squared): CaRot's OC term for w [m, n] (e.g. the
    visual projection, 768 x 512). Differentiable. Raises ValueError naming w if w holds a NaN
    or infinity, or if the loss itself (finite w) exceeds the range of w's dtype (checks that a
    GPU tensor skips inside calrft_kernels.device_checks(False))."""
    check_tensor("w", w)
    if min(w.shape) == 0:
        raise ValueError(f"w must be non-empty, got shape {tuple(w.shape)}")
    checked = _backend.host_checks_for(w)
    if not checked:
        # inside device_checks(False) on a GPU: no host synchronisation, so no finiteness checks
        # and no data-dependent scale (a weight beyond ~1e19 then gives an inf loss, not an error)
        return _orth_op(w, 1.0)
    check_finite("w", w)
    # scale down only: a small w needs none (its Gram matrix vanishes against I, and the loss is
    # sqrt(n) to full precision), while I / s^2 would overflow for s < 2^-63 in fp32
    out = _orth_op(w, max(power_of_two_scale(w), 1.0))
    if not bool(torch.isfinite(out)):
        raise ValueError(f"w is finite but ||w^T w - I||_F overflows {w.dtype} (max |w| = "
                         f"{float(w.detach().abs().max().double()):.3g}): rescale w or pass it "
                         f"in float64")
    return out
