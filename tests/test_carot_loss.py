"""CaRotLoss: the whole per-step CaRot objective, term by term, against a float64 composition of
the references and against the formula of objective.md written out with plain PyTorch."""
import pytest
import torch
import torch.nn.functional as F

from calrft_kernels import CaRotLoss
from calrft_kernels.reference import contrastive_loss_reference


def make_batch(b=12, d=8, width_v=10, width_t=9, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    unit = lambda *s: F.normalize(rand(*s), dim=1)  # noqa: E731
    return dict(image_features=unit(b, d), text_features=unit(b, d),
                logit_scale=torch.tensor(9.0, dtype=dtype),
                visual_proj=rand(width_v, d) / width_v ** 0.5,
                text_proj=rand(width_t, d) / width_t ** 0.5,
                teacher_image_features=unit(b, d), teacher_text_features=unit(b, d),
                teacher_logit_scale=torch.tensor(7.0, dtype=dtype))


def official_formula(batch, distill_weight=1.5, orth_weight=0.2, cross_weight=0.05):
    """objective.md, as the official code writes it (with log_softmax instead of log(softmax))."""
    s = batch["logit_scale"] * batch["image_features"] @ batch["text_features"].T
    target = torch.arange(s.shape[0])
    mcl = 0.5 * (F.cross_entropy(s, target) + F.cross_entropy(s.T, target))
    t = batch["teacher_logit_scale"] * batch["teacher_image_features"] @ batch["teacher_text_features"].T
    sd = (-(t.softmax(1) * s.log_softmax(1)).sum(1).mean()
          - (t.T.softmax(1) * s.T.log_softmax(1)).sum(1).mean())
    w_v, w_t = batch["visual_proj"], batch["text_proj"]
    eye = torch.eye(w_v.shape[1], dtype=w_v.dtype)
    oc = torch.norm(w_v.T @ w_v - eye)
    cf = torch.norm(w_v @ w_t.T)
    return mcl + cross_weight * cf + orth_weight * oc + distill_weight * sd


def test_default_weights_match_the_official_formula():
    batch = make_batch()
    total = CaRotLoss()(**{k: v for k, v in batch.items()})
    torch.testing.assert_close(total, official_formula(batch), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("b,d", [(2, 1), (7, 5), (37, 16)])
def test_every_term_against_float64_references(b, d):
    batch = make_batch(b, d, seed=b)
    labels = torch.arange(b) % 3
    loss = CaRotLoss(distill_weight=0.7, orth_weight=0.3, cross_weight=0.1, sigma_min_weight=0.5,
                     sigma_min_eps=1e-4)
    out = loss(**batch, labels=labels, output_dict=True)
    ref_mcl = contrastive_loss_reference(batch["image_features"], batch["text_features"],
                                         batch["logit_scale"], labels=labels)
    ref_sd = contrastive_loss_reference(
        batch["image_features"], batch["text_features"], batch["logit_scale"], labels=labels,
        teacher_image_features=batch["teacher_image_features"],
        teacher_text_features=batch["teacher_text_features"],
        teacher_logit_scale=batch["teacher_logit_scale"], distill_weight=1.0) - ref_mcl
    w_v, w_t = batch["visual_proj"], batch["text_proj"]
    ref_oc = torch.linalg.matrix_norm(w_v.T @ w_v - torch.eye(d, dtype=torch.float64))
    ref_cf = torch.linalg.matrix_norm(w_v @ w_t.T)
    cov = torch.cov(batch["image_features"].T).reshape(d, d)
    ref_sigma = torch.linalg.eigvalsh(cov)[0] + 1e-4  # lambda_min of Sigma + eps I
    expected = {"contrastive": ref_mcl, "distillation": ref_sd, "orthogonality": ref_oc,
                "cross": ref_cf}
    for name, value in expected.items():
        torch.testing.assert_close(out[name], value, rtol=1e-9, atol=1e-11, msg=name)
    torch.testing.assert_close(out["sigma_min"], ref_sigma, rtol=1e-6, atol=1e-9)
    total = (out["contrastive"] + 0.7 * out["distillation"] + 0.3 * out["orthogonality"]
             + 0.1 * out["cross"] - 0.5 * out["sigma_min"])
    torch.testing.assert_close(out["total"], total, rtol=1e-12, atol=1e-12)


def test_no_teacher_means_no_distillation_term():
    batch = make_batch()
    for key in ("teacher_image_features", "teacher_text_features", "teacher_logit_scale"):
        batch.pop(key)
    out = CaRotLoss()(**batch, output_dict=True)
    assert out["distillation"] == 0
    torch.testing.assert_close(out["total"], out["contrastive"] + 0.2 * out["orthogonality"]
                               + 0.05 * out["cross"])


def test_gradcheck_float64_through_every_term():
    batch = make_batch(b=9, d=4, width_v=5, width_t=6)
    names = ["image_features", "text_features", "logit_scale", "visual_proj", "text_proj"]
    leaves = [batch[n].clone().requires_grad_() for n in names]
    rest = {k: v for k, v in batch.items() if k not in names}
    loss = CaRotLoss(sigma_min_weight=0.3, sigma_min_eps=1e-3)

    def fn(*xs):
        return loss(**dict(zip(names, xs)), **rest)

    assert torch.autograd.gradcheck(fn, leaves)


def test_low_precision_features_return_their_dtype():
    batch = make_batch(b=16, d=8, dtype=torch.bfloat16)
    out = CaRotLoss()(**batch, output_dict=True)
    assert all(v.dtype == torch.bfloat16 for v in out.values())
    ref = official_formula({k: v.double() for k, v in batch.items()})
    torch.testing.assert_close(out["total"].double(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(visual_proj=torch.ones(3)), ValueError, "visual_proj must be 2-D"),
    (dict(text_proj=[[1.0]]), TypeError, "text_proj must be a torch.Tensor"),
    (dict(text_proj=torch.ones(9, 5, dtype=torch.float64)), ValueError, "same embedding width"),
])
def test_bad_input_names_the_argument(kwargs, error, match):
    batch = dict(make_batch(), **kwargs)
    with pytest.raises(error, match=match):
        CaRotLoss()(**batch)


def test_bad_weight_is_refused():
    with pytest.raises(ValueError, match="orth_weight"):
        CaRotLoss(orth_weight=-1.0)


@pytest.mark.parametrize("name", ["distill_weight", "orth_weight", "cross_weight",
                                  "sigma_min_weight", "sigma_min_eps"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.5])
def test_non_finite_or_negative_weights_name_the_argument(name, value):
    with pytest.raises(ValueError, match=name):
        CaRotLoss(**{name: value})


def test_bad_label_smoothing_and_non_finite_tensor_scale_are_refused():
    with pytest.raises(ValueError, match="label_smoothing"):
        CaRotLoss(label_smoothing=1.0)
    batch = make_batch()
    batch["logit_scale"] = torch.tensor(float("inf"), dtype=torch.float64)
    with pytest.raises(ValueError, match="logit_scale must be finite"):
        CaRotLoss()(**batch)
    batch = make_batch()
    batch["teacher_logit_scale"] = torch.tensor(float("nan"), dtype=torch.float64)
    with pytest.raises(ValueError, match="teacher_logit_scale must be finite"):
        CaRotLoss()(**batch)


def test_naive_carot_reference_matches_the_official_formula():
    """reference.naive_carot_loss (the benchmarks' baseline) is the objective's MCL + SD."""
    from calrft_kernels.reference import naive_carot_loss
    batch = make_batch()
    got = naive_carot_loss(batch["image_features"], batch["text_features"], batch["logit_scale"],
                           batch["teacher_image_features"], batch["teacher_text_features"],
                           batch["teacher_logit_scale"], distill_weight=1.5)
    want = official_formula(batch, orth_weight=0.0, cross_weight=0.0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["cpu", "chunked", "reference"])
def test_every_backend_gives_the_same_terms(backend):
    batch = make_batch(b=13, d=6, seed=2)
    out = CaRotLoss(backend=backend)(**batch, output_dict=True)
    ref = CaRotLoss(backend="reference")(**batch, output_dict=True)
    for key, value in ref.items():
        torch.testing.assert_close(out[key], value, rtol=1e-10, atol=1e-12, msg=key)


# ---- the sigmoid family (CaRot on a SigLIP backbone) ------------------------------------------
def sigmoid_batch(b=12, d=8, seed=0, dtype=torch.float64):
    batch = make_batch(b, d, seed=seed, dtype=dtype)
    batch.update(logit_bias=torch.tensor(-4.0, dtype=dtype),
                 teacher_logit_bias=torch.tensor(-3.0, dtype=dtype))
    return batch


def sigmoid_formula(batch, labels=None, distill_weight=1.5, orth_weight=0.2, cross_weight=0.05,
                    sigma_min_weight=0.0, eps=0.0):
    """objective.md with SigLIP's loss, written out in plain float64 PyTorch: the pairwise
    sigmoid loss, the pairwise BCE to sigmoid(T) (T with the teacher's bias), the parameter
    terms and the sigma_min regulariser."""
    x, y = batch["image_features"], batch["text_features"]
    b = x.shape[0]
    s = batch["logit_scale"] * x @ y.T + batch["logit_bias"]
    positive = (torch.eye(b, dtype=torch.bool) if labels is None
                else labels[:, None] == labels[None, :])
    z = torch.where(positive, 1.0, -1.0).to(s.dtype)
    mcl = -F.logsigmoid(z * s).sum() / b
    t = (batch["teacher_logit_scale"] * batch["teacher_image_features"]
         @ batch["teacher_text_features"].T + batch["teacher_logit_bias"])
    p = torch.sigmoid(t)
    sd = -(p * F.logsigmoid(s) + (1 - p) * F.logsigmoid(-s)).sum() / b
    w_v, w_t = batch["visual_proj"], batch["text_proj"]
    oc = torch.norm(w_v.T @ w_v - torch.eye(w_v.shape[1], dtype=w_v.dtype))
    cf = torch.norm(w_v @ w_t.T)
    sigma = torch.linalg.eigvalsh(torch.cov(x.T).reshape(x.shape[1], -1))[0] + eps
    terms = {"contrastive": mcl, "distillation": sd, "orthogonality": oc, "cross": cf,
             "sigma_min": sigma}
    terms["total"] = (mcl + distill_weight * sd + orth_weight * oc + cross_weight * cf
                      - sigma_min_weight * sigma)
    return terms


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("b,d", [(2, 1), (7, 5), (37, 16)])
def test_sigmoid_family_every_term_against_float64_formula(b, d, backend):
    batch = sigmoid_batch(b, d, seed=b)
    labels = torch.arange(b) % 3
    loss = CaRotLoss(distill_weight=0.7, orth_weight=0.3, cross_weight=0.1, sigma_min_weight=0.5,
                     sigma_min_eps=1e-4, family="sigmoid", backend=backend)
    out = loss(**batch, labels=labels, output_dict=True)
    want = sigmoid_formula(batch, labels, 0.7, 0.3, 0.1, 0.5, 1e-4)
    for name, value in want.items():
        tol = 1e-6 if name in ("sigma_min", "total") else 1e-10
        torch.testing.assert_close(out[name], value, rtol=tol, atol=tol * 1e-3, msg=name)


def test_sigmoid_family_gradients_equal_the_formula_and_gradcheck():
    batch = sigmoid_batch(b=9, d=4)
    names = ["image_features", "text_features", "logit_scale", "logit_bias", "visual_proj",
             "text_proj"]
    leaves = [batch[n].clone().requires_grad_() for n in names]
    rest = {k: v for k, v in batch.items() if k not in names}
    loss = CaRotLoss(family="sigmoid")

    def fn(*xs):
        return loss(**dict(zip(names, xs)), **rest)

    got = torch.autograd.grad(fn(*leaves), leaves)
    want = torch.autograd.grad(sigmoid_formula({**rest, **dict(zip(names, leaves))})["total"],
                               leaves)
    for name, a, w in zip(names, got, want):
        torch.testing.assert_close(a, w, rtol=1e-10, atol=1e-12, msg=name)
    assert torch.autograd.gradcheck(fn, leaves)


def test_sigmoid_family_without_teacher_and_in_low_precision():
    batch = sigmoid_batch()
    for key in ("teacher_image_features", "teacher_text_features", "teacher_logit_scale",
                "teacher_logit_bias"):
        batch.pop(key)
    out = CaRotLoss(family="sigmoid")(**batch, output_dict=True)
    assert out["distillation"] == 0
    torch.testing.assert_close(out["total"], out["contrastive"] + 0.2 * out["orthogonality"]
                               + 0.05 * out["cross"])
    low = CaRotLoss(family="sigmoid")(**sigmoid_batch(b=16, dtype=torch.bfloat16),
                                      output_dict=True)
    assert all(v.dtype == torch.bfloat16 for v in low.values())
    ref = sigmoid_formula(sigmoid_batch(b=16))["total"]
    torch.testing.assert_close(low["total"].double(), ref, rtol=3e-2, atol=3e-2)


def test_sigmoid_family_bad_use_is_refused():
    with pytest.raises(ValueError, match="family must be one of"):
        CaRotLoss(family="sigmoidal")
    with pytest.raises(ValueError, match="label_smoothing applies to the softmax family"):
        CaRotLoss(family="sigmoid", label_smoothing=0.1)
    batch = sigmoid_batch()
    batch.pop("teacher_logit_bias")  # the soft targets need the teacher's own bias
    with pytest.raises(ValueError, match="teacher_logit_bias is required"):
        CaRotLoss(family="sigmoid")(**batch)
