"""The contrastive composition's typed seams: ContrastiveInputs (validated once, frozen, the one
distillation decision), contrastive_terms / ContrastiveTerms, and the three public callers
(contrastive_loss, ClipLoss, CaRotLoss) sharing them."""
import dataclasses

import pytest
import torch

from calrft_kernels import CaRotLoss, ClipLoss, contrastive_loss, pairs
from calrft_kernels.contrastive import ContrastiveInputs, ContrastiveTerms, contrastive_terms


def _batch(b=9, d=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    f = lambda: torch.nn.functional.normalize(torch.randn(b, d, generator=gen,  # noqa: E731
                                                          dtype=torch.float64), dim=1)
    return f(), f(), f(), f()


def test_inputs_are_frozen_concrete_and_decide_distillation_once():
    img, txt, timg, ttxt = _batch()
    without = ContrastiveInputs.validate(img, txt, 3.0, teacher_image_features=timg,
                                         teacher_text_features=ttxt, teacher_logit_scale=2.0)
    assert without.teacher is None and without.distill_weight == 0.0  # weight 0: no teacher
    assert without.backend == "cpu"  # "auto" resolved for CPU tensors
    with pytest.raises(dataclasses.FrozenInstanceError):
        without.scale = 4.0
    with_teacher = ContrastiveInputs.validate(img, txt, 3.0, teacher_image_features=timg,
                                              teacher_text_features=ttxt,
                                              teacher_logit_scale=2.0, distill_weight=0.5)
    assert with_teacher.teacher is not None and with_teacher.distill_weight == 0.5
    assert not with_teacher.teacher.image.requires_grad


def test_terms_compose_the_loss():
    img, txt, timg, ttxt = _batch(seed=1)
    kw = dict(teacher_image_features=timg, teacher_text_features=ttxt, teacher_logit_scale=2.0,
              distill_weight=0.7)
    inputs = ContrastiveInputs.validate(img, txt, 3.0, **kw)
    terms = contrastive_terms(inputs)
    assert isinstance(terms, ContrastiveTerms) and terms.distillation is not None
    torch.testing.assert_close(terms.total(0.7), contrastive_loss(img, txt, 3.0, **kw),
                               rtol=1e-14, atol=1e-14)
    plain = contrastive_terms(ContrastiveInputs.validate(img, txt, 3.0))
    assert plain.distillation is None and plain.total(5.0) is plain.contrastive


@pytest.mark.parametrize("caller", ["contrastive_loss", "ClipLoss", "CaRotLoss"])
def test_each_public_caller_validates_the_features_once(caller, monkeypatch):
    img, txt, timg, ttxt = _batch(seed=2)
    calls = []
    real = pairs.check_features

    def counting(name, *args, **kwargs):
        calls.append(name)
        return real(name, *args, **kwargs)
    monkeypatch.setattr(pairs, "check_features", counting)
    if caller == "contrastive_loss":
        contrastive_loss(img, txt, 3.0)
    elif caller == "ClipLoss":
        ClipLoss()(img, txt, torch.tensor(3.0))
    else:
        w = torch.eye(4, dtype=torch.float64)
        CaRotLoss()(img, txt, 3.0, visual_proj=w, text_proj=w, teacher_image_features=timg,
                    teacher_text_features=ttxt, teacher_logit_scale=2.0)
    expected = ["image_features", "text_features"]
    if caller == "CaRotLoss":
        expected += ["teacher_image_features", "teacher_text_features"]
    assert calls == expected
