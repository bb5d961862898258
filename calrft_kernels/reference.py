"""Plain-PyTorch references. They materialise B x B matrices on purpose: they are the ground truth
for tests (run them in float64) and the "reference" backend. Nothing here is fused or clever."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def target_matrix(labels: Optional[Tensor], n: int, label_smoothing: float = 0.0,
                  dtype=torch.float64, device=None) -> Tensor:
    """Y: identity, or the row-normalised same-label matrix; then (1 - e) Y + e / n."""
    if labels is None:
        y = torch.eye(n, dtype=dtype, device=device)
    else:
        same = (labels[:, None] == labels[None, :]).to(dtype)
        y = same / same.sum(1, keepdim=True)
    return (1.0 - label_smoothing) * y + label_smoothing / n


def contrastive_stats_reference(q: Tensor, k: Tensor, scale: Tensor, bias: Tensor,
                                tq: Optional[Tensor] = None, tk: Optional[Tensor] = None,
                                tscale: Optional[Tensor] = None, with_cols: bool = True):
    """The statistics every contrastive kernel computes, from the materialised S = scale q k^T + bias.

    row_stats[0, i] = logsumexp_j S_ij                       (column stats: the same over i)
    with a teacher T = tscale tq tk^T, also
    row_stats[1, i] = logsumexp_j T_ij
    row_stats[2, i] = sum_j softmax(T)_ij S_ij
    Returns (row_stats [R, M], col_stats [R, N] or [R, 0] when not with_cols), R = 1 or 3.
    """
    s = scale * (q @ k.T) + bias
    rows, cols = [torch.logsumexp(s, 1)], [torch.logsumexp(s, 0)]
    if tq is not None:
        t = tscale * (tq @ tk.T)
        rows += [torch.logsumexp(t, 1), (torch.softmax(t, 1) * s).sum(1)]
        cols += [torch.logsumexp(t, 0), (torch.softmax(t, 0) * s).sum(0)]
    row_stats = torch.stack(rows)
    col_stats = torch.stack(cols) if with_cols else row_stats.new_empty(len(rows), 0)
    return row_stats, col_stats


def contrastive_loss_reference(image_features: Tensor, text_features: Tensor, logit_scale,
                               logit_bias=None, *, labels: Optional[Tensor] = None,
                               label_smoothing: float = 0.0,
                               teacher_image_features: Optional[Tensor] = None,
                               teacher_text_features: Optional[Tensor] = None,
                               teacher_logit_scale=None, distill_weight: float = 0.0,
                               local_rows: Optional[slice] = None) -> Tensor:
    """The api.md formula on the materialised logits of the whole (global) batch.

    local_rows selects the rows (images) and columns (texts) whose losses are returned, as a rank
    does with a process group; the means are then over those rows only."""
    n = image_features.shape[0]
    sl = local_rows if local_rows is not None else slice(0, n)
    logits = logit_scale * image_features @ text_features.T
    if logit_bias is not None:
        logits = logits + logit_bias
    y = target_matrix(labels, n, label_smoothing, logits.dtype, logits.device)
    row_ce = -(y * torch.log_softmax(logits, 1)).sum(1)[sl]
    col_ce = -(y.T * torch.log_softmax(logits.T, 1)).sum(1)[sl]
    loss = 0.5 * (row_ce.mean() + col_ce.mean())
    if distill_weight:
        with torch.no_grad():
            t = teacher_logit_scale * teacher_image_features @ teacher_text_features.T
            p_row, p_col = torch.softmax(t, 1), torch.softmax(t.T, 1)
        row_sd = -(p_row * torch.log_softmax(logits, 1)).sum(1)[sl]
        col_sd = -(p_col * torch.log_softmax(logits.T, 1)).sum(1)[sl]
        loss = loss + distill_weight * (row_sd.mean() + col_sd.mean())
    return loss


def contrastive_stats_backward_reference(grad_row: Tensor, grad_col: Tensor, q: Tensor, k: Tensor,
                                         scale: Tensor, bias: Tensor, tq=None, tk=None,
                                         tscale=None, row_stats=None, col_stats=None,
                                         with_cols: bool = True):
    """(dS k, dS^T q) of the kernel contract from the materialised softmax matrices:
    dS = g0 softmax_row(S) + g2 softmax_row(T) + h0 softmax_col(S) + h2 softmax_col(T).
    Teacher statistics (index 1) get no gradient, as in the kernels."""
    s = scale * (q @ k.T) + bias
    ds = grad_row[0][:, None] * torch.softmax(s, 1)
    if with_cols:
        ds = ds + grad_col[0][None, :] * torch.softmax(s, 0)
    if tq is not None:
        t = tscale * (tq @ tk.T)
        ds = ds + grad_row[2][:, None] * torch.softmax(t, 1)
        if with_cols:
            ds = ds + grad_col[2][None, :] * torch.softmax(t, 0)
    return ds @ k, ds.T @ q


# ----------------------------------------------------------------------------------------------
# The sigmoid (SigLIP) loss: one plain reference (tests and benchmarks import it) and the
# "reference" kernel of calrft::sigmoid_pairs built on it.
# ----------------------------------------------------------------------------------------------
def sigmoid_positives(rows: int, cols: int, row_labels: Optional[Tensor] = None,
                      col_labels: Optional[Tensor] = None, offset: int = 0,
                      device=None) -> Tensor:
    """[rows, cols] bool: the positive pairs. With labels, labels equal; without, the diagonal
    shifted by offset (row i is the global row i + offset)."""
    if row_labels is not None:
        return row_labels[:, None] == col_labels[None, :]
    i = torch.arange(rows, device=device)[:, None] + offset
    return i == torch.arange(cols, device=device)[None, :]


def sigmoid_pair_terms_reference(s: Tensor, positive: Tensor, t: Optional[Tensor] = None):
    """Per-pair terms on materialised logits: (loss = -log sigmoid(z S) with z = +1 on positive
    pairs and -1 elsewhere, distillation = BCE(sigmoid(S), sigmoid(T)) in cross-entropy form, or
    None without teacher logits T; the targets sigmoid(T) get no gradient)."""
    z = positive.to(s.dtype) * 2 - 1
    loss = -torch.nn.functional.logsigmoid(z * s)
    if t is None:
        return loss, None
    target = torch.sigmoid(t.detach())
    return loss, torch.nn.functional.binary_cross_entropy_with_logits(s, target, reduction="none")


def sigmoid_loss_reference(image_features: Tensor, text_features: Tensor, logit_scale,
                           logit_bias=None, *, labels: Optional[Tensor] = None,
                           teacher_image_features: Optional[Tensor] = None,
                           teacher_text_features: Optional[Tensor] = None,
                           teacher_logit_scale=None, teacher_logit_bias=None,
                           distill_weight: float = 0.0) -> Tensor:
    """The api.md formula of sigmoid_loss on the materialised B x B logits (run it in float64):
    (1/B) sum_ij [-log sigmoid(z_ij S_ij) + distill_weight BCE(sigmoid(S_ij), sigmoid(T_ij))]."""
    n = image_features.shape[0]
    s = logit_scale * image_features @ text_features.T
    if logit_bias is not None:
        s = s + logit_bias
    positive = sigmoid_positives(n, n, labels, labels, device=s.device)
    t = None
    if distill_weight:
        with torch.no_grad():
            t = teacher_logit_scale * teacher_image_features @ teacher_text_features.T
            if teacher_logit_bias is not None:
                t = t + teacher_logit_bias
    loss, sd = sigmoid_pair_terms_reference(s, positive, t)
    total = loss.sum() / n
    return total if sd is None else total + distill_weight * sd.sum() / n


def sigmoid_pair_grad_reference(s: Tensor, positive: Tensor, t: Optional[Tensor] = None,
                                distill_weight: float = 0.0) -> Tensor:
    """G = d(l + w SD)/dS per pair, written out: -z sigmoid(-z S) + w (sigmoid(S) - sigmoid(T))
    (the kernels run below autograd; the tests hold G against autograd of
    sigmoid_loss_reference)."""
    g = torch.where(positive, -torch.sigmoid(-s), torch.sigmoid(s))
    if t is not None:
        g = g + distill_weight * (torch.sigmoid(s) - torch.sigmoid(t))
    return g


def sigmoid_pairs_kernel(q: Tensor, k: Tensor, scale, bias, qlabels=None, klabels=None,
                         offset: int = 0, tq=None, tk=None, tscale=None, tbias=None,
                         distill_weight: float = 0.0, with_grads: bool = True,
                         chunk_rows: int = 0):
    """The "reference" kernel of calrft::sigmoid_pairs (docs/design.md): the kernel contract on
    materialised M x N logits, with the pair terms of sigmoid_pair_terms_reference and their
    derivative G (sigmoid_pair_grad_reference). Returns (parts [5] = (sum l + w SD, sum l,
    sum SD, sum G, sum G X) with X = q k^T (0 without with_grads), dq_u = G k, dk_u = G^T q),
    the gradients [0, d] without with_grads; float32, or float64 for float64 inputs.
    chunk_rows is the other kernels' tiling: no meaning here."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, scale, bias, tq, tk, tscale, tbias = (_as_stats(x, dtype) for x in
                                                (q, k, scale, bias, tq, tk, tscale, tbias))
    x = q @ k.T
    s = scale * x + bias
    t = None if tq is None else tscale * (tq @ tk.T) + (0.0 if tbias is None else tbias)
    positive = sigmoid_positives(q.shape[0], k.shape[0], qlabels, klabels, offset, q.device)
    loss, sd = sigmoid_pair_terms_reference(s, positive, t)
    loss_sum = loss.sum()
    sd_sum = loss_sum.new_zeros(()) if sd is None else sd.sum()
    g = sigmoid_pair_grad_reference(s, positive, t, distill_weight)
    gx = (g * x).sum() if with_grads else loss_sum.new_zeros(())
    parts = torch.stack([loss_sum + distill_weight * sd_sum, loss_sum, sd_sum, g.sum(), gx])
    if not with_grads:
        return parts, q.new_empty(0, q.shape[1]), k.new_empty(0, k.shape[1])
    return parts, (g @ k).contiguous(), (g.T @ q).contiguous()


def covariance_reference(z: Tensor, correction: float = 1):
    """Two-pass centred covariance of the rows of z [B, d] in z's dtype (run it on float64 input
    for the ground truth): (Sigma = (z - mean)^T (z - mean) / (B - correction), mean)."""
    mean = z.mean(0)
    centred = z - mean
    return centred.T @ centred / (z.shape[0] - correction), mean


# ----------------------------------------------------------------------------------------------
# The "reference" kernel of calrft::contrastive_stats: the two references above behind the
# kernel contract of docs/design.md (statistics float32, or float64 for float64 inputs).
# ----------------------------------------------------------------------------------------------
def _as_stats(x, dtype):
    return None if x is None else torch.as_tensor(x).to(dtype)


def contrastive_stats_kernel(q: Tensor, k: Tensor, scale, bias, tq=None, tk=None, tscale=None,
                             with_cols: bool = True):
    """contrastive_stats_reference with the kernel contract's dtypes (materialises M x N)."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    rows, cols = contrastive_stats_reference(
        *(_as_stats(x, dtype) for x in (q, k, scale, bias, tq, tk, tscale)), with_cols=with_cols)
    return rows.contiguous(), cols.contiguous()


def contrastive_stats_backward_kernel(grad_row, grad_col, q, k, scale, bias, tq=None, tk=None,
                                      tscale=None, row_stats=None, col_stats=None,
                                      with_cols: bool = True):
    """contrastive_stats_backward_reference with the kernel contract's dtypes."""
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    args = (_as_stats(x, dtype) for x in (grad_row, grad_col, q, k, scale, bias, tq, tk, tscale))
    dq, dk = contrastive_stats_backward_reference(*args, with_cols=with_cols)
    return dq.contiguous(), dk.contiguous()


def naive_carot_loss(image_features: Tensor, text_features: Tensor, logit_scale,
                     teacher_image_features: Tensor, teacher_text_features: Tensor,
                     teacher_logit_scale, distill_weight: float = 1.0) -> Tensor:
    """The naive CaRot loss the fused op replaces (the CaRot reference code's pattern): open_clip's
    two logits matrices (image->text and text->image, two products), cross entropy against the
    diagonal, plus distill_weight x the soft cross entropy against the teacher's softmax targets
    of both directions. Materialises several B x B matrices; the baseline of the benchmarks."""
    labels = torch.arange(image_features.shape[0], device=image_features.device)
    logits_i = logit_scale * image_features @ text_features.T
    logits_t = logit_scale * text_features @ image_features.T
    loss = 0.5 * (torch.nn.functional.cross_entropy(logits_i, labels)
                  + torch.nn.functional.cross_entropy(logits_t, labels))
    with torch.no_grad():
        t = teacher_logit_scale * teacher_image_features @ teacher_text_features.T
        p_i, p_t = t.softmax(1), t.T.softmax(1)
    soft = (-(p_i * logits_i.log_softmax(1)).sum(1).mean()
            - (p_t * logits_t.log_softmax(1)).sum(1).mean())
    return loss + distill_weight * soft


def contrastive_stats_grads_reference(q: Tensor, k: Tensor, scale: Tensor, bias: Tensor,
                                      tq=None, tk=None, tscale=None, *, grad_row: Tensor,
                                      grad_col: Tensor, with_cols: bool = True):
    """Gradients (d q, d k, d scale, d bias) of L = sum(grad_row * row_stats) +
    sum(grad_col * col_stats) by autograd through contrastive_stats_reference, the teacher
    log-sum-exps (statistic 1) excluded, as the kernel contract defines them. Run it in float64.
    The kernels' (dq_u, dk_u) are d q / scale and d k / scale."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, scale, bias)]
    rows, cols = contrastive_stats_reference(*leaves, tq, tk, tscale, with_cols=with_cols)
    g = grad_row.to(rows.dtype).clone()
    h = grad_col.to(rows.dtype).clone()
    if tq is not None:
        g[1] = 0
        if with_cols:
            h[1] = 0
    loss = (g * rows).sum() + ((h * cols).sum() if with_cols else 0.0)
    return torch.autograd.grad(loss, leaves)
