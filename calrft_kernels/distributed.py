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


# The accumulator's all-reduce lives beside it (calrft_kernels/covariance.py); this name stays
# importable from here.
from .covariance import all_reduce_accumulator  # noqa: E402,F401
