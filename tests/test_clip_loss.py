"""ClipLoss is a drop-in for open_clip.loss.ClipLoss: same constructor, forward and outputs."""
import inspect

import open_clip
import pytest
import torch

from calrft_kernels import ClipLoss, DistillClipLoss


def features(b, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.functional.normalize(torch.randn(b, d, generator=gen), dim=1).to(dtype)
            .requires_grad_() for _ in range(2)]


def test_same_constructor_and_forward_signature():
    ours, theirs = inspect.signature(ClipLoss.__init__), inspect.signature(open_clip.loss.ClipLoss.__init__)
    assert list(theirs.parameters) == [p for p in ours.parameters if p != "backend"]
    assert list(inspect.signature(ClipLoss.forward).parameters) == \
        list(inspect.signature(open_clip.loss.ClipLoss.forward).parameters)


@pytest.mark.parametrize("b,d", [(1, 4), (13, 32), (128, 64)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("output_dict", [False, True])
def test_matches_open_clip_value_and_gradients(b, d, with_bias, output_dict):
    results = []
    for cls in (ClipLoss, open_clip.loss.ClipLoss):
        image, text = features(b, d, seed=b)
        scale = torch.tensor(14.3, requires_grad=True)
        bias = torch.tensor(-2.0, requires_grad=True) if with_bias else None
        out = cls()(image, text, scale, bias, output_dict=output_dict)
        loss = out["contrastive_loss"] if output_dict else out
        assert isinstance(out, dict) == output_dict
        leaves = [image, text, scale] + ([bias] if with_bias else [])
        results.append([loss] + list(torch.autograd.grad(loss, leaves)))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-6)


def test_open_clip_scale_parameter_as_passed_by_models():
    # open_clip models return logit_scale.exp() of a 0-dim Parameter; half precision features
    image, text = features(33, 16, dtype=torch.bfloat16)
    raw = torch.nn.Parameter(torch.tensor(2.659))
    ours = ClipLoss()(image, text, raw.exp())
    theirs = open_clip.loss.ClipLoss()(image.double(), text.double(), raw.exp().double())
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-2, atol=1e-2)


def test_horovod_is_refused_clearly():
    with pytest.raises(ValueError, match="use_horovod"):
        ClipLoss(use_horovod=True)


@pytest.mark.parametrize("backend", ["cpu", "chunked", "triton", "reference"])
def test_every_backend_matches_open_clip(backend):
    image, text = features(37, 16, seed=3)
    scale = torch.tensor(14.3, requires_grad=True)
    ours = ClipLoss(backend=backend)(image, text, scale)
    grads = torch.autograd.grad(ours, [image, text, scale])
    image2, text2 = (x.detach().clone().requires_grad_() for x in (image, text))
    scale2 = scale.detach().clone().requires_grad_()
    theirs = open_clip.loss.ClipLoss()(image2, text2, scale2)
    want = torch.autograd.grad(theirs, [image2, text2, scale2])
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-6)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-6)


# ---- DistillClipLoss (open_clip_train --distill-model) ---------------------------------------

def test_distill_clip_loss_has_open_clips_signature():
    ours, theirs = DistillClipLoss, open_clip.loss.DistillClipLoss
    assert [p for p in inspect.signature(ours.__init__).parameters if p != "backend"] == \
        list(inspect.signature(theirs.__init__).parameters)
    assert list(inspect.signature(ours.forward).parameters) == \
        list(inspect.signature(theirs.forward).parameters)


@pytest.mark.parametrize("b,d,dt", [(1, 4, 3), (13, 32, 32), (70, 16, 24)])
@pytest.mark.parametrize("output_dict", [False, True])
def test_distill_clip_loss_matches_open_clip(b, d, dt, output_dict):
    """Both terms and every gradient (student features and scale), float64; the teacher has its
    own width and scale and gets no gradient."""
    gen = torch.Generator().manual_seed(b)
    unit = lambda width: torch.nn.functional.normalize(  # noqa: E731
        torch.randn(b, width, generator=gen, dtype=torch.float64), dim=1)
    image, text, t_image, t_text = unit(d), unit(d), unit(dt), unit(dt)
    results = []
    for cls in (DistillClipLoss, open_clip.loss.DistillClipLoss):
        leaves = [image.clone().requires_grad_(), text.clone().requires_grad_(),
                  torch.tensor(14.3, dtype=torch.float64, requires_grad=True)]
        out = cls()(*leaves, t_image, t_text, torch.tensor(20.0, dtype=torch.float64),
                    output_dict=output_dict)
        terms = [out["contrastive_loss"], out["distill_loss"]] if output_dict else list(out)
        assert isinstance(out, dict) == output_dict and len(terms) == 2
        results.append(terms + list(torch.autograd.grad(sum(terms), leaves)))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_distill_clip_loss_keeps_the_features_dtype():
    image, text = features(9, 8, dtype=torch.bfloat16)
    t_image, t_text = features(9, 8, dtype=torch.bfloat16, seed=1)
    ours = DistillClipLoss()(image, text, torch.tensor(10.0), t_image, t_text,
                             torch.tensor(10.0))
    theirs = open_clip.loss.DistillClipLoss()(image.double(), text.double(),
                                              torch.tensor(10.0, dtype=torch.float64),
                                              t_image.double(), t_text.double(),
                                              torch.tensor(10.0, dtype=torch.float64))
    for a, b in zip(ours, theirs):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.double(), b, rtol=1e-2, atol=1e-2)
