"""torch.distributed helpers: gathers that keep autograd, and accumulator reductions."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world(process_group) -> tuple[int, int]:
    """(rank, world_size) of this process in `process_group`."""
    return dist.get_rank(process_group), dist.get_world_size(process_group)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradients of every rank's copy and returns this rank's
    slice: with DDP's gradient averaging, parameters then get the single-process gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, process_group):
        ctx.process_group = process_group
        rank, size = world(process_group)
        ctx.rank = rank
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=process_group)
        ctx.sizes = [p.shape[0] for p in parts]
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.process_group)
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None


def gather_with_grad(x: Tensor, process_group) -> Tensor:
    """Concatenate every rank's rows of x (equal row counts), differentiably."""
    return _GatherWithGrad.apply(x, process_group)


@torch.no_grad()
def gather_no_grad(x: Tensor, process_group) -> Tensor:
    _, size = world(process_group)
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=process_group)
    return torch.cat(parts, 0)


# ---- accumulator reductions (spectral ops) below ----


def all_reduce_accumulator(acc, process_group=None):
    """Merge every rank's CovarianceAccumulator in place: afterwards each rank holds the
    statistics of all rows seen by all ranks (Chan's merge, in rank order, so every rank gets
    bit-identical results). Chan's update is not a sum, so the states are gathered (count, mean
    [d], comoment [d, d] per rank: world * d^2 floats) rather than all-reduced."""
    from .spectral import CovarianceAccumulator
    if not isinstance(acc, CovarianceAccumulator):
        raise TypeError(f"acc must be a CovarianceAccumulator, got {type(acc).__name__}")
    _, size = world(process_group)
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
