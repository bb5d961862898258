"""Two gloo processes on CPU: contrastive_loss(process_group=...) and ClipLoss against the
single-process loss on the concatenated batch, and against open_clip's own distributed ClipLoss
and DistillClipLoss."""
import pytest
import torch
import torch.distributed as dist

from _dist_util import assert_ranks_equal_one_process, spawn_with_retry
from calrft_kernels import ClipLoss, DistillClipLoss, contrastive_loss

WORLD = 2
BACKENDS = ("cpu", "chunked", "reference")
B_LOCAL, DIM = 5, 6


def global_batch(dtype=torch.float64):
    gen = torch.Generator().manual_seed(1234)
    unit = lambda: torch.nn.functional.normalize(  # noqa: E731
        torch.randn(WORLD * B_LOCAL, DIM, generator=gen, dtype=dtype), dim=1)
    return {"image": unit(), "text": unit(), "t_image": unit(), "t_text": unit(),
            "labels": torch.randint(0, 3, (WORLD * B_LOCAL,), generator=gen)}


OPTIONS = {
    "plain": {},
    "all": {"labels": True, "label_smoothing": 0.1, "distill_weight": 1.5, "bias": -0.7},
}


def loss_kwargs(batch, rows, option):
    opt = OPTIONS[option]
    kw = {"label_smoothing": opt.get("label_smoothing", 0.0)}
    if opt.get("labels"):
        kw["labels"] = batch["labels"][rows]
    if opt.get("distill_weight"):
        kw.update(teacher_image_features=batch["t_image"][rows],
                  teacher_text_features=batch["t_text"][rows], teacher_logit_scale=4.0,
                  distill_weight=opt["distill_weight"])
    return kw


def run_loss(batch, rows, option, backend, group=None):
    image = batch["image"][rows].clone().requires_grad_()
    text = batch["text"][rows].clone().requires_grad_()
    scale = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
    bias = OPTIONS[option].get("bias")
    bias_t = None if bias is None else torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    loss = contrastive_loss(image, text, scale, bias_t, **loss_kwargs(batch, rows, option),
                            process_group=group, backend=backend)
    loss.backward()
    grads = [image.grad, text.grad, scale.grad] + ([] if bias_t is None else [bias_t.grad])
    return loss.detach(), grads


def _worker(rank, world):
    batch = global_batch()
    rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    losses = {(option, backend): run_loss(batch, rows, option, backend, dist.group.WORLD)
              for option in OPTIONS for backend in BACKENDS}
    return losses, _clip_loss_modes(batch, rows, rank)


def _clip_loss_modes(batch, rows, rank):
    """Our ClipLoss and DistillClipLoss vs open_clip's, on this rank, in each of open_clip's
    gather modes: {(loss name, local_loss, gather_with_grad): [ours, theirs]}, each (terms...,
    d image, d text, d scale)."""
    import open_clip
    out = {}
    pairs = {"ClipLoss": (ClipLoss, open_clip.loss.ClipLoss),
             "DistillClipLoss": (DistillClipLoss, open_clip.loss.DistillClipLoss)}
    for name, classes in pairs.items():
        teacher = () if name == "ClipLoss" else (batch["t_image"][rows], batch["t_text"][rows],
                                                 torch.tensor(4.0, dtype=torch.float64))
        for local_loss in (False, True):
            for gather_with_grad in (False, True):
                results = []
                for cls in classes:
                    image = batch["image"][rows].clone().requires_grad_()
                    text = batch["text"][rows].clone().requires_grad_()
                    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
                    module = cls(local_loss=local_loss, gather_with_grad=gather_with_grad,
                                 rank=rank, world_size=WORLD)
                    terms = module(image, text, scale, *teacher)
                    terms = list(terms) if isinstance(terms, tuple) else [terms]
                    sum(terms).backward()
                    results.append([t.detach() for t in terms]
                                   + [image.grad, text.grad, scale.grad])
                out[(name, local_loss, gather_with_grad)] = results
    return out


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    """One pair of processes computes every case below (spawning costs more than the cases)."""
    return spawn_with_retry(tmp_path_factory, _worker, WORLD)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_two_gloo_ranks_match_single_process(two_rank_results, option, backend):
    batch = global_batch()
    single_loss, single_grads = run_loss(batch, slice(None), option, "reference")
    ranks = [two_rank_results[r][0][(option, backend)] for r in range(WORLD)]
    assert_ranks_equal_one_process(ranks, single_loss, single_grads, B_LOCAL)


def test_clip_losses_match_open_clip_in_every_gather_mode(two_rank_results):
    """Values and gradients on each rank equal open_clip's own distributed ClipLoss and
    DistillClipLoss (whose teacher features are gathered as the student's)."""
    assert len(two_rank_results[0][1]) == 8
    for r in range(WORLD):
        for mode, (ours, theirs) in two_rank_results[r][1].items():
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12,
                                           msg=lambda m: f"rank {r}, {mode}: {m}")
