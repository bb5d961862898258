"""Covariance family: batch_covariance, CovarianceAccumulator, all_reduce_accumulator.

Backends of the centred covariance (docs/spectral.md, "batch_covariance"):
  cpu        the fused C++ kernel (csrc/cpu/covariance.cpp): rows centred on a shift into a
             transposed chunk buffer, a block-triangle of MKL GEMMs, the shift removed exactly;
  cuda       the centred cuBLAS product (plain PyTorch ops, so it also runs on CPU tensors in
             tests): the mean in fp32 (fp64 for fp64), one centred copy of z in z's dtype, ONE
             matrix product with fp32 output (16-bit operands on the tensor cores), then an exact
             symmetrisation; the default on CUDA tensors;
  triton     calrft_kernels/triton/covariance.py: centring inside the tile loads, no copy of z;
  reference  two-pass PyTorch in the compute dtype (calrft_kernels/reference.py).
Every backend returns an exactly symmetric matrix (tests/test_spectral_covariance.py).
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from . import _backend
from ._checks import (check_correction, check_result_finite, check_tensor,
                               compute_dtype)
from .reference import covariance_reference

COVARIANCE_BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")


# ---- backends -------------------------------------------------------------------------------

def covariance_centred_mm(z: Tensor, correction: float):
    """(Sigma, mean): the "cuda" backend, device-agnostic PyTorch. One pass for the mean (fp32
    accumulation, fp64 for fp64), one pass that writes the rows centred on a shift in z's dtype
    (the only copy, B x d), one matrix product whose output is fp32 (fp64 for fp64), plus a rank-
    one correction of the shift's residual (16-bit z): on a GPU, a cuBLAS
    GEMM with 16-bit tensor-core operands and fp32 accumulation. Centring before the product
    keeps the two-pass accuracy (the centred values are O(spread), not O(mean)). Exactly
    symmetric: (C + C^T) / 2 (floating-point addition is commutative)."""
    acc = compute_dtype(z.dtype)
    n = z.shape[0]
    mean = z.sum(0, dtype=acc) / n
    if z.dtype == acc:
        cov = _product_t(z - mean, acc)
    else:
        # 16-bit z: centre on s = the mean rounded to z's dtype, in z's dtype (one read and one
        # write of B x d 16-bit values; no fp32 copy). Where the mean dominates the spread (what
        # centring is for) every entry lies within a factor 2 of s, so z - s is exact (Sterbenz);
        # elsewhere it rounds no worse than centred values stored in z's dtype would. The
        # shift's residual r = mean - s (|r| <= 2^-8 |mean| in bf16) is removed by a rank-one
        # update in fp32: sum (z - s)(z - s)^T - n r r^T = sum (z - mean)(z - mean)^T.
        shift = mean.to(z.dtype)
        residual = mean - shift.to(acc)
        cov = _product_t(z - shift, acc).addr_(residual, residual, alpha=-n)
    cov = (cov + cov.T).mul_(0.5 / (n - correction))
    return cov, mean


def _product_t(x: Tensor, out_dtype: torch.dtype) -> Tensor:
    """x^T x with out_dtype output. 16-bit x: torch.mm(..., out_dtype=float32) where this torch
    has it (cuBLAS with fp32 output, no fp32 copy of x), else an fp32 copy."""
    if x.dtype == out_dtype:
        return x.T @ x
    if x.is_cuda:
        try:
            return torch.mm(x.T, x, out_dtype=out_dtype)
        except (TypeError, RuntimeError):  # torch without mm(out_dtype=)
            pass
    xf = x.to(out_dtype)
    return xf.T @ xf


def _reference_backend(z: Tensor, correction: float):
    cov, mean = covariance_reference(z.to(compute_dtype(z.dtype)), correction)
    return (cov + cov.T) * 0.5, mean   # exactly symmetric, like every backend


def resolve_covariance_backend(backend: str, device: torch.device) -> str:
    """backend -> the one that runs: "auto" is the C++ kernel on CPU tensors and the centred
    cuBLAS product on CUDA tensors ("cuda": no custom kernel, so it needs no build)."""
    if not isinstance(backend, str) or backend not in COVARIANCE_BACKENDS:
        raise ValueError(f"backend must be one of {COVARIANCE_BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cpu":
            return "cpu" if _backend.cpu_native_usable(device)[0] else "reference"
        return "cuda" if device.type == "cuda" else "reference"
    if backend == "cpu":
        ok, why = _backend.cpu_native_usable(device)
    elif backend == "triton":
        ok, why = _backend.triton_usable(device)
    elif backend == "cuda":
        ok, why = (device.type == "cuda",
                   f"the cuda backend needs CUDA tensors, got a {device.type} tensor")
    else:
        ok, why = True, ""
    if not ok:
        raise ValueError(f"backend={backend!r} is unavailable for batch_covariance: {why}")
    return backend


def covariance_impl(z: Tensor, correction: float, which: str, fp64: bool = False,
                    lower_only: bool = False):
    """(cov [d, d] fp32/fp64, mean [d] fp64) from the RESOLVED backend `which`.
    fp64=True: accumulate in fp64 whatever z's dtype. lower_only=True: the solver's input; the
    CPU kernel then leaves the strict upper triangle zero (others return the full matrix)."""
    z = z.contiguous()
    if fp64 and z.dtype != torch.float64 and which != "cpu":
        # the GPU paths accumulate in fp32: fp64 PyTorch there (a B x d copy)
        cov, mean = _reference_backend(z.to(torch.float64), correction)
        return cov, mean
    if which == "cpu":
        cov, mean = _backend.native()[0].covariance_cpu(z, float(correction), fp64, lower_only)
    elif which == "cuda":
        cov, mean = covariance_centred_mm(z, float(correction))
    elif which == "triton":
        from .triton.covariance import covariance_triton  # lazy: needs triton
        cov, mean = covariance_triton(z, float(correction))
    elif which == "reference":
        cov, mean = _reference_backend(z, float(correction))
    else:
        raise ValueError(f"unknown covariance backend {which!r}")
    return cov, mean.to(torch.float64)


# ---- batch_covariance: custom op ------------------------------------------------------------

@torch.library.custom_op("calrft::batch_covariance", mutates_args=())
def _batch_covariance_op(z: Tensor, correction: float, backend: str) -> Tensor:
    cov, _ = covariance_impl(z, correction, resolve_covariance_backend(backend, z.device))
    return cov.to(z.dtype)


@_batch_covariance_op.register_fake
def _(z, correction, backend):
    return z.new_empty(z.shape[1], z.shape[1])


def _batch_covariance_setup(ctx, inputs, output):
    z, correction, _ = inputs
    ctx.save_for_backward(z)
    ctx.correction = correction


def _batch_covariance_backward(ctx, grad):
    (z,) = ctx.saved_tensors
    ct = compute_dtype(z.dtype)
    zc = z.to(ct) - z.to(ct).mean(0)
    g = grad.to(ct)
    # d/dz of Zc^T Zc / n with upstream G: Zc (G + G^T) / n (the mean's term vanishes: sum Zc = 0)
    dz = zc @ (g + g.T) / (z.shape[0] - ctx.correction)
    return dz.to(z.dtype), None, None


_batch_covariance_op.register_autograd(_batch_covariance_backward,
                                       setup_context=_batch_covariance_setup)


def batch_covariance(z: Tensor, correction: float = 1, *, backend: str = "auto") -> Tensor:
    """Centred covariance of the rows of z [B, d]: (z - mean)^T (z - mean) / (B - correction).

    Two-pass quality (centred before the product), so a feature mean far larger than the spread
    costs no accuracy. Accumulates in fp32 (fp64 for fp64 input); returns z's dtype, exactly
    symmetric; differentiable. backend: "auto", "cpu", "cuda", "triton", "reference" (module
    doc). A finite z whose covariance overflows z's dtype raises ValueError saying so."""
    check_tensor("z", z)
    correction = check_correction(correction, z.shape[0])
    resolve_covariance_backend(backend, z.device)   # a bad/unavailable backend fails here
    out = _batch_covariance_op(z, correction, backend)
    check_result_finite("z", z, out, "covariance")   # cheap (d x d)
    return out


# ---- streaming covariance -------------------------------------------------------------------

class CovarianceAccumulator:
    """Streaming, mergeable covariance (Chan et al. pairwise update), in float64 by default.

    State: count, mean [dim], comoment M = sum (z - mean)(z - mean)^T [dim, dim]. Each update()
    computes its batch's mean and comoment with the covariance kernel (exact for large means) and
    merges them in; merge() combines two accumulators the same way, so any split of the rows -
    across batches, ranks (all_reduce_accumulator) or checkpoints (state_dict) - gives the
    covariance of all rows seen, equal to batch_covariance of their concatenation."""

    def __init__(self, dim: int, dtype: torch.dtype = torch.float64, device=None):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.dim, self.dtype = dim, dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.count = 0
        self.mean = torch.zeros(dim, dtype=dtype, device=self.device)
        self.comoment = torch.zeros(dim, dim, dtype=dtype, device=self.device)

    @torch.no_grad()
    def update(self, z: Tensor) -> "CovarianceAccumulator":
        check_tensor("z", z)
        if z.shape[1] != self.dim:
            raise ValueError(f"z must have {self.dim} columns, got shape {tuple(z.shape)}")
        if z.shape[0] == 0:
            return self
        z = z.detach().to(self.device)
        which = resolve_covariance_backend("auto", z.device)
        cov, mean = covariance_impl(z, 0.0, which, fp64=self.dtype == torch.float64)
        check_result_finite("z", z, cov.to(self.dtype), "comoment")
        self._merge_state(z.shape[0], mean.to(self.dtype), cov.to(self.dtype) * z.shape[0])
        return self

    def _merge_state(self, n_b: int, mean_b: Tensor, comoment_b: Tensor) -> None:
        n_a = self.count
        if n_b == 0:
            return
        if n_a == 0:
            self.count, self.mean, self.comoment = n_b, mean_b.clone(), comoment_b.clone()
            return
        delta = mean_b - self.mean
        native = _backend.native()[0]
        if native is not None and self.device.type == "cpu":
            merged = native.chan_merge_cpu(self.comoment, comoment_b, delta, float(n_a),
                                           float(n_b)).to(self.dtype)
        else:
            merged = self.comoment + comoment_b + torch.outer(delta, delta) * (n_a * n_b / (n_a + n_b))
        self.mean = self.mean + delta * (n_b / (n_a + n_b))
        self.comoment = merged
        self.count = n_a + n_b

    def merge(self, other: "CovarianceAccumulator") -> "CovarianceAccumulator":
        if not isinstance(other, CovarianceAccumulator):
            raise TypeError(f"other must be a CovarianceAccumulator, got {type(other).__name__}")
        if other.dim != self.dim:
            raise ValueError(f"other has dim {other.dim}, this accumulator {self.dim}")
        self._merge_state(other.count, other.mean.to(self.device, self.dtype),
                          other.comoment.to(self.device, self.dtype))
        return self

    def covariance(self, correction: float = 1) -> Tensor:
        correction = check_correction(correction, self.count, name="the accumulator")
        return self.comoment / (self.count - correction)

    def state_dict(self) -> dict:
        return {"dim": self.dim, "count": self.count, "mean": self.mean.clone(),
                "comoment": self.comoment.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict(). The whole state is validated before anything is changed:
        dim must match, count a non-negative integer, mean [dim] and comoment [dim, dim]
        floating tensors with finite values (a corrupt state raises ValueError/TypeError naming
        the entry, and the accumulator keeps its previous state)."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict (from state_dict()), got {type(state).__name__}")
        for key in ("dim", "count", "mean", "comoment"):
            if key not in state:
                raise ValueError(f"state is missing {key!r}")
        dim = state["dim"]
        if isinstance(dim, Tensor) and dim.numel() == 1 and not dim.is_floating_point():
            dim = int(dim)
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim != self.dim:
            raise ValueError(f"state['dim'] must be {self.dim} (this accumulator's dim), "
                             f"got {state['dim']!r}")
        count = _check_count(state["count"])
        mean = _check_state_tensor("mean", state["mean"], (self.dim,))
        comoment = _check_state_tensor("comoment", state["comoment"], (self.dim, self.dim))
        if count == 0 and (bool((mean != 0).any()) or bool((comoment != 0).any())):
            raise ValueError("state['count'] is 0 but state['mean'] / state['comoment'] are not "
                             "zero: a corrupt state")
        if bool((comoment.diagonal() < 0).any()):
            raise ValueError("state['comoment'] has a negative diagonal entry: not a comoment "
                             "(sum of squares) matrix")
        self.count = count
        self.mean = mean.to(self.device, self.dtype).clone()
        self.comoment = comoment.to(self.device, self.dtype).clone()


def _check_count(count) -> int:
    if isinstance(count, Tensor):
        if count.numel() != 1:
            raise ValueError(f"state['count'] must be a scalar, got shape {tuple(count.shape)}")
        count = count.item()
    if isinstance(count, bool) or not isinstance(count, numbers.Real):
        raise TypeError(f"state['count'] must be an integer, got {type(count).__name__}")
    if not isinstance(count, numbers.Integral):
        if not (float(count) == float(count) and float(count).is_integer()):
            raise ValueError(f"state['count'] must be a non-negative integer, got {count!r}")
    if count < 0:
        raise ValueError(f"state['count'] must be a non-negative integer, got {count!r}")
    return int(count)


def _check_state_tensor(name: str, value, shape: tuple) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"state[{name!r}] must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"state[{name!r}] must be a floating-point tensor, got {value.dtype}")
    if tuple(value.shape) != shape:
        raise ValueError(f"state[{name!r}] must have shape {list(shape)}, got "
                         f"{list(value.shape)}")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"state[{name!r}] contains NaN or infinity")
    return value.detach()


def all_reduce_accumulator(acc: CovarianceAccumulator, process_group=None):
    """Merge every rank's CovarianceAccumulator in place: afterwards each rank holds the
    statistics of all rows seen by all ranks (Chan's merge, in rank order, so every rank gets
    bit-identical results). Chan's update is not a sum, so the states are gathered (count, mean
    [d], comoment [d, d] per rank: world * d^2 floats) rather than all-reduced."""
    import torch.distributed as dist
    if not isinstance(acc, CovarianceAccumulator):
        raise TypeError(f"acc must be a CovarianceAccumulator, got {type(acc).__name__}")
    size = dist.get_world_size(process_group)
    d = acc.dim
    # one flat buffer per rank: [count, mean (d), comoment (d*d)], in the accumulator's dtype
    # (float64 by default: counts are exact up to 2^53)
    flat = torch.cat([torch.tensor([float(acc.count)], dtype=acc.dtype, device=acc.device),
                      acc.mean.reshape(-1), acc.comoment.reshape(-1)])
    parts = [torch.empty_like(flat) for _ in range(size)]
    dist.all_gather(parts, flat.contiguous(), group=process_group)
    merged = CovarianceAccumulator(d, dtype=acc.dtype, device=acc.device)
    for part in parts:
        other = CovarianceAccumulator(d, dtype=acc.dtype, device=acc.device)
        other.load_state_dict({"dim": d, "count": int(round(float(part[0]))),
                               "mean": part[1:1 + d], "comoment": part[1 + d:].view(d, d)})
        merged.merge(other)
    acc.load_state_dict(merged.state_dict())
    return acc
