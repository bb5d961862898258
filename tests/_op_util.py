"""Small operands for the opcheck tests of both pair-loss ops (calrft::contrastive_stats and
calrft::sigmoid_pairs): q [7, 3] and k [5, 3] (M != N), scale, bias and, with a teacher, its
features [7, 4] / [5, 4], scale and bias; seeded."""
from dataclasses import dataclass
from typing import Optional

import torch

M, N, D, TEACHER_D = 7, 5, 3, 4


@dataclass
class PairOperands:
    q: torch.Tensor
    k: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor
    tq: Optional[torch.Tensor]
    tk: Optional[torch.Tensor]
    tscale: Optional[torch.Tensor]
    tbias: Optional[torch.Tensor]
    gen: torch.Generator  # for further seeded draws (labels)


def pair_operands(teacher: bool, dtype=torch.float32, requires_grad=True) -> PairOperands:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(M, D, generator=gen, dtype=dtype).requires_grad_(requires_grad)
    k = torch.randn(N, D, generator=gen, dtype=dtype).requires_grad_(requires_grad)
    scale = torch.tensor(2.5, dtype=dtype).requires_grad_(requires_grad)
    bias = torch.tensor(-0.5, dtype=dtype).requires_grad_(requires_grad)
    tq = tk = tscale = tbias = None
    if teacher:
        tq = torch.randn(M, TEACHER_D, generator=gen, dtype=dtype)
        tk = torch.randn(N, TEACHER_D, generator=gen, dtype=dtype)
        tscale, tbias = torch.tensor(1.5, dtype=dtype), torch.tensor(-1.0, dtype=dtype)
    return PairOperands(q, k, scale, bias, tq, tk, tscale, tbias, gen)
