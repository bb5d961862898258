"""TEMPORARY stand-ins for calrft_kernels ops (plain PyTorch) until they land on main. DELETE."""
import torch
import torch.distributed as dist
from calrft_kernels.reference import contrastive_loss_reference
from calrft_kernels.distributed import gather_with_grad, gather_no_grad


def contrastive_loss(i, t, s, logit_bias=None, *, labels=None, teacher_image_features=None,
                     teacher_text_features=None, teacher_logit_scale=None, distill_weight=0.0,
                     process_group=None, **_):
    sl = None
    if process_group is not None:
        r, w = dist.get_rank(process_group), dist.get_world_size(process_group)
        b = i.shape[0]
        sl = slice(r * b, (r + 1) * b)
        i, t = gather_with_grad(i, process_group), gather_with_grad(t, process_group)
        if teacher_image_features is not None:
            teacher_image_features = gather_no_grad(teacher_image_features, process_group)
            teacher_text_features = gather_no_grad(teacher_text_features, process_group)
        if labels is not None:
            labels = gather_no_grad(labels, process_group)
    return contrastive_loss_reference(i, t, s, logit_bias, labels=labels,
                                      teacher_image_features=teacher_image_features,
                                      teacher_text_features=teacher_text_features,
                                      teacher_logit_scale=teacher_logit_scale,
                                      distill_weight=distill_weight, local_rows=sl)


def covariance_sigma_min(z, **_):
    zc = z - z.mean(0)
    c = zc.T @ zc / (z.shape[0] - 1)
    return torch.linalg.eigvalsh(c)[0]


class CovarianceAccumulator:
    def __init__(self, dim, dtype=torch.float64, device=None):
        self.rows = []

    def update(self, z):
        self.rows.append(z.detach().to(torch.float64))

    def merge(self, other):
        self.rows += other.rows

    @property
    def count(self):
        return sum(r.shape[0] for r in self.rows)

    def covariance(self, correction=1):
        z = torch.cat(self.rows)
        zc = z - z.mean(0)
        return zc.T @ zc / (z.shape[0] - correction)

    def state_dict(self):
        return {"rows": torch.cat(self.rows)}

    def load_state_dict(self, sd):
        self.rows = [sd["rows"]]


class CaRotLoss(torch.nn.Module):
    def __init__(self, distill_weight=1.5, orth_weight=0.2, cross_weight=0.05, sigma_min_weight=0.0,
                 process_group=None):
        super().__init__()
        self.w = (distill_weight, orth_weight, cross_weight, sigma_min_weight)
        self.process_group = process_group

    def forward(self, i, t, s, *, visual_proj, text_proj, teacher_image_features=None,
                teacher_text_features=None, teacher_logit_scale=None, labels=None,
                logit_bias=None, output_dict=False):
        sd_w = self.w[0] if teacher_image_features is not None else 0.0
        c = contrastive_loss(i, t, s, logit_bias, labels=labels,
                             teacher_image_features=teacher_image_features,
                             teacher_text_features=teacher_text_features,
                             teacher_logit_scale=teacher_logit_scale, distill_weight=sd_w,
                             process_group=self.process_group)
        wv = visual_proj
        oc = torch.linalg.matrix_norm(wv.T @ wv - torch.eye(wv.shape[1], dtype=wv.dtype))
        cf = torch.linalg.matrix_norm(wv @ text_proj.T) if self.w[2] else 0 * oc
        total = c + self.w[1] * oc + self.w[2] * cf
        out = {"contrastive": c, "orthogonality": oc, "cross": cf, "total": total}
        if self.w[3]:
            sm = covariance_sigma_min(i.float())
            out["sigma_min"] = sm
            total = total - self.w[3] * sm
            out["total"] = total
        return out if output_dict else total
