"""The "chunked" kernel of calrft::sigmoid_pairs: cuBLAS-rate GEMMs on bounded row chunks.

Contract: docs/design.md ("The sigmoid loss"), the same as the C++ and reference kernels. For
each chunk of C rows of q:

    X = q_c k^T          one GEMM into an fp32 [C, N] buffer (+ the teacher's T_c = tq_c tk^T)
    one pass             S = scale X + bias, the chunk's sums of l, SD, G and G X, and (with
                         gradients) G in the operands' dtype
    dq_c = G k           two GEMMs, accumulating in fp32 (chunked.gradient_gemms, the same
    dk += G^T q_c        helpers as the softmax family's chunked kernel)

Work: 3 units with gradients, 1 under no_grad (only the forward GEMM and the pass run); a
teacher adds 1 unit. The chunk size comes from chunked.chunk_rows_for (the one sizing seam of
both families: `chunk_rows`, else chunked.MAX_BUFFER_BYTES), so the buffers never exceed the
budget. Extra memory besides them: dq_u [M, d] and dk_u [N, d] in fp32 (the contract's outputs).

The pass is a fused Triton kernel on CUDA (calrft_kernels/triton/sigmoid_chunked.py) and
`chunk_pairs_torch` below on CPU tensors and for float64, with identical semantics; tests run
both on CPU tensors (Triton under TRITON_INTERPRET=1) and compare them. Precision follows the
softmax family's chunked kernel (calrft_kernels/chunked.py): fp32 operands follow torch's
matmul precision setting; fp16 / bf16 operands (CUDA) use cuBLAS's half GEMM with an fp32
result; G is rounded to the operand dtype for its two GEMMs, fp16 G pre-scaled by a power of
two (chunked.fp16_factor: |G| < 1 + distill_weight, so G x 2^15 / 2^ceil(log2(1 + w)) stays
finite while SigLIP's ~4.5e-5 negatives leave fp16's subnormal range) and the products unscaled
in fp32.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import chunked
from ._checks import compute_dtype
from .reference import sigmoid_pair_grad_reference, sigmoid_pair_terms_reference, sigmoid_positives

__all__ = ["pairs_forward", "chunk_pairs_torch"]


def chunk_pairs_torch(x: Tensor, t: Optional[Tensor], scale: Tensor, bias: Tensor,
                      tscale: Optional[Tensor], tbias: Optional[Tensor],
                      qlabels: Optional[Tensor], klabels: Optional[Tensor], row0: int,
                      weight: float, g_dtype: torch.dtype, factor: float = 1.0,
                      with_grads: bool = True):
    """One chunk's pass in plain torch: x = q_c k^T [C, N] (raw product; t = tq_c tk^T) ->
    (G times `factor` in g_dtype, or None without with_grads; sums [4] = (sum l, sum SD, sum G,
    sum G X) in float64). The pair terms and G are the reference's (calrft_kernels/reference.py).
    Positives: qlabels[i] == klabels[j], or without labels j == row0 + i."""
    s = x * scale + bias
    positive = sigmoid_positives(x.shape[0], x.shape[1], qlabels, klabels, row0, x.device)
    tt = None if t is None else t * tscale + tbias
    loss, sd = sigmoid_pair_terms_reference(s, positive, tt)
    g = sigmoid_pair_grad_reference(s, positive, tt, weight)
    zero = s.new_zeros(())
    sums = torch.stack([loss.sum(), zero if sd is None else sd.sum(), g.sum(),
                        (g * x).sum() if with_grads else zero]).double()
    if not with_grads:
        return None, sums
    if factor != 1.0:
        g.mul_(factor)
    return g.to(g_dtype), sums


def pairs_forward(q: Tensor, k: Tensor, scale, bias, qlabels: Optional[Tensor] = None,
                  klabels: Optional[Tensor] = None, offset: int = 0, tq: Optional[Tensor] = None,
                  tk: Optional[Tensor] = None, tscale=None, tbias=None,
                  distill_weight: float = 0.0, with_grads: bool = True, chunk_rows: int = 0, *,
                  fused: Optional[bool] = None):
    """The kernel contract of calrft::sigmoid_pairs, chunk by chunk: (parts [5] = (sum l + w SD,
    sum l, sum SD, sum G, sum G X), dq_u = G k [M, d], dk_u = G^T q [N, d]; [0, d] without
    with_grads), in float32 (float64 for float64 operands). chunk_rows: rows per chunk (0: from
    the buffer budget); fused: force the Triton pass on or off (default: on for CUDA fp32
    buffers)."""
    assert q.dim() == 2 and k.dim() == 2 and q.shape[1] == k.shape[1], "q, k: [M, d], [N, d]"
    m, n = q.shape[0], k.shape[0]
    teacher = tq is not None
    acc = compute_dtype(q.dtype)
    dev = q.device
    scalar = lambda v: chunked.device_scalar(0.0 if v is None else v, acc, dev)  # noqa: E731
    scale, bias = scalar(scale), scalar(bias)
    tscale, tbias = (scalar(tscale), scalar(tbias)) if teacher else (None, None)
    c = chunked.chunk_rows_for(m, n, q.dtype, teacher, chunk_rows)
    # |G| < 1 + distill_weight: fp16 G is scaled up to just below fp16's range
    factor = chunked.fp16_factor(q.dtype, m, n, bound=1.0 + distill_weight) if with_grads else 1.0
    dq = torch.empty(m if with_grads else 0, q.shape[1], dtype=acc, device=dev)
    dk = torch.zeros(n if with_grads else 0, k.shape[1], dtype=acc, device=dev)
    sums = torch.zeros(4, dtype=torch.float64, device=dev)
    triton_pass = chunked.use_triton(q, fused) and acc == torch.float32
    if triton_pass:
        from .triton.sigmoid_chunked import chunk_pairs
    else:
        chunk_pairs = chunk_pairs_torch
    for c0 in range(0, m, c):
        c1 = min(m, c0 + c)
        x = chunked.mm_acc(q[c0:c1], k.T)
        t = chunked.mm_acc(tq[c0:c1], tk.T) if teacher else None
        g, part = chunk_pairs(x, t, scale, bias, tscale, tbias,
                              None if qlabels is None else qlabels[c0:c1], klabels,
                              c0 + offset, float(distill_weight), q.dtype, factor, with_grads)
        del x, t
        sums += part
        if with_grads:
            dk = chunked.gradient_gemms(g, q[c0:c1], k, dq[c0:c1], dk)
        del g
    if factor != 1.0:
        dq.div_(factor)
        dk.div_(factor)
    loss, sd = sums[0], sums[1]
    parts = torch.stack([loss + distill_weight * sd, loss, sd, sums[2], sums[3]]).to(acc)
    return parts, dq, dk
