"""2 and 3 gloo processes on CPU: sigmoid_loss(process_group=...) and SigLipLoss(world_size > 1)
against one process over the concatenated batch, and against open_clip's own distributed
SigLipLoss in each of its dist_impl exchanges."""
import pytest
import torch
import torch.distributed as dist

from _dist_util import assert_ranks_equal_one_process, spawn_with_retry
from calrft_kernels import CaRotLoss, SigLipLoss, sigmoid_loss
from calrft_kernels.losses import SIGLIP_DIST_IMPLS

WORLDS = (2, 3)
BACKENDS = ("cpu", "chunked", "reference")
B_LOCAL, DIM = 5, 6

OPTIONS = {
    "plain": {},
    "all": {"labels": True, "distill_weight": 1.5, "bias": -2.5, "chunk_rows": 2},
}


def global_batch(world, dtype=torch.float64):
    gen = torch.Generator().manual_seed(4321 + world)
    unit = lambda: torch.nn.functional.normalize(  # noqa: E731
        torch.randn(world * B_LOCAL, DIM, generator=gen, dtype=dtype), dim=1)
    return {"image": unit(), "text": unit(), "t_image": unit(), "t_text": unit(),
            "labels": torch.randint(0, 3, (world * B_LOCAL,), generator=gen)}


def run_loss(batch, rows, option, backend, group=None):
    """(loss, [d image, d text, d scale, d bias?]) of sigmoid_loss on `rows` of the batch."""
    opt = OPTIONS[option]
    image = batch["image"][rows].clone().requires_grad_()
    text = batch["text"][rows].clone().requires_grad_()
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    bias = None
    kw = {}
    if "bias" in opt:
        bias = torch.tensor(opt["bias"], dtype=torch.float64, requires_grad=True)
    if opt.get("labels"):
        kw["labels"] = batch["labels"][rows]
    if opt.get("distill_weight"):
        kw.update(teacher_image_features=batch["t_image"][rows],
                  teacher_text_features=batch["t_text"][rows], teacher_logit_scale=5.0,
                  teacher_logit_bias=-1.5, distill_weight=opt["distill_weight"])
    if backend in ("cpu", "chunked") and "chunk_rows" in opt:
        kw["chunk_rows"] = opt["chunk_rows"]
    loss = sigmoid_loss(image, text, scale, bias, process_group=group, backend=backend, **kw)
    loss.backward()
    grads = [image.grad, text.grad, scale.grad] + ([] if bias is None else [bias.grad])
    return loss.detach(), grads


def _siglip_modes(batch, rows, rank, world):
    """Ours vs open_clip's SigLipLoss on this rank, for each dist_impl."""
    from open_clip.loss import SigLipLoss as OpenClipSigLipLoss
    out = {}
    for dist_impl in SIGLIP_DIST_IMPLS:
        results = []
        for cls in (SigLipLoss, OpenClipSigLipLoss):
            image = batch["image"][rows].clone().requires_grad_()
            text = batch["text"][rows].clone().requires_grad_()
            scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
            bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
            module = cls(rank=rank, world_size=world, dist_impl=dist_impl)
            loss = module(image, text, scale, bias)
            loss.backward()
            results.append((loss.detach(), image.grad, text.grad, scale.grad, bias.grad))
        out[dist_impl] = results
    return out


def _worker(rank, world):
    batch = global_batch(world)
    rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    losses = {(option, backend): run_loss(batch, rows, option, backend, dist.group.WORLD)
              for option in OPTIONS for backend in BACKENDS}
    return (losses, _siglip_modes(batch, rows, rank, world),
            carot_terms(batch, rows, dist.group.WORLD))


def carot_terms(batch, rows, group=None):
    """CaRotLoss(family="sigmoid") terms of `rows`, with a teacher (its own bias)."""
    gen = torch.Generator().manual_seed(7)
    proj = torch.randn(8, DIM, generator=gen, dtype=torch.float64) / 3
    loss = CaRotLoss(family="sigmoid", process_group=group)
    return loss(batch["image"][rows], batch["text"][rows], 7.0, logit_bias=-2.5,
                visual_proj=proj, text_proj=proj[:5], labels=batch["labels"][rows],
                teacher_image_features=batch["t_image"][rows],
                teacher_text_features=batch["t_text"][rows], teacher_logit_scale=5.0,
                teacher_logit_bias=-1.5, output_dict=True)


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"{w}ranks")
def ranks(request, tmp_path_factory):
    """(world, {rank: results}): one group of processes computes every case below."""
    world = request.param
    return world, spawn_with_retry(tmp_path_factory, _worker, world)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_gloo_ranks_match_one_process_over_the_global_batch(ranks, option, backend):
    world, results = ranks
    batch = global_batch(world)
    single_loss, single_grads = run_loss(batch, slice(None), option, "reference")
    per_rank = [results[r][0][(option, backend)] for r in range(world)]
    assert_ranks_equal_one_process(per_rank, single_loss, single_grads, B_LOCAL)


def test_each_rank_loss_is_its_rows_against_every_column(ranks):
    """Not just the mean: rank r's loss is the global batch's pair terms of its rows / B_local
    (the per-rank value open_clip reports), so the ranks differ."""
    from calrft_kernels.reference import sigmoid_pair_terms_reference, sigmoid_positives
    world, results = ranks
    batch = global_batch(world)
    n = world * B_LOCAL
    pair, _ = sigmoid_pair_terms_reference(batch["image"] @ batch["text"].T * 7.0,
                                           sigmoid_positives(n, n))
    losses = [results[r][0][("plain", "cpu")][0] for r in range(world)]
    for r, loss in enumerate(losses):
        want = pair[r * B_LOCAL:(r + 1) * B_LOCAL].sum() / B_LOCAL
        torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    assert len({round(float(x), 6) for x in losses}) == world


@pytest.mark.parametrize("dist_impl", SIGLIP_DIST_IMPLS)
def test_siglip_loss_matches_open_clip_in_every_dist_impl(ranks, dist_impl):
    """Value and every gradient on each rank equal open_clip's own distributed SigLipLoss."""
    world, results = ranks
    for r in range(world):
        ours, theirs = results[r][1][dist_impl]
        for name, a, b in zip(("loss", "image", "text", "scale", "bias"), ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12,
                                       msg=lambda m: f"rank {r}, {dist_impl}, {name}: {m}")


def test_carot_sigmoid_family_over_ranks_is_the_global_objective(ranks):
    """CaRotLoss(family="sigmoid", process_group=...): the ranks' mean of every term is the
    term of one process over the global batch."""
    world, results = ranks
    single = carot_terms(global_batch(world), slice(None))
    for name, value in single.items():
        mean = sum(results[r][2][name] for r in range(world)) / world
        torch.testing.assert_close(mean, value, rtol=1e-10, atol=1e-12, msg=name)
