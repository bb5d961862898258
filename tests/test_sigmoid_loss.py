"""sigmoid_loss (SigLIP's pairwise sigmoid loss + CaRot's distillation) against the one float64
reference (calrft_kernels.reference.sigmoid_loss_reference) and against open_clip's own
SigLipLoss, for every backend that runs here: the C++ kernel ("cpu"), "chunked" (GEMMs on row
chunks with its plain-torch pass on CPU tensors; its Triton pass and CUDA branch are tested in
tests/test_sigmoid_chunked.py and tests/test_fake_cuda.py) and "reference"."""
import math

import pytest
import torch
import torch.nn.functional as F

from calrft_kernels import SigLipLoss, sigmoid_loss, testing
from calrft_kernels.reference import (sigmoid_loss_reference, sigmoid_pair_terms_reference,
                                      sigmoid_pairs_kernel, sigmoid_positives)

BACKENDS = ["cpu", "chunked", "reference"]
# (B, d): awkward sizes, one row, one column, d up to 1024, B past one 256-column tile, and
# B = 700, d = 64, large enough for the C++ kernel to run on every thread.
SIZES = [(1, 1), (2, 3), (17, 1024), (64, 16), (129, 7), (130, 257), (300, 5), (700, 64)]
OPTIONS = {
    "plain": {},
    "bias": {"bias": True},
    "labels": {"bias": True, "labels": True},
    "distill": {"distill": True},
    "all": {"bias": True, "labels": True, "distill": True},
}


def make_inputs(b, d, dtype=torch.float64, scale=10.0, bias_value=-10.0, seed=0, bias=False,
                labels=False, distill=False, dt=None):
    gen = torch.Generator().manual_seed(seed)
    unit = lambda n, m: F.normalize(  # noqa: E731
        torch.randn(n, m, generator=gen, dtype=torch.float64), dim=1).to(dtype)
    inputs = {"image_features": unit(b, d), "text_features": unit(b, d),
              "logit_scale": torch.tensor(scale, dtype=torch.float64)}
    kwargs = {}
    if bias:
        inputs["logit_bias"] = torch.tensor(bias_value, dtype=torch.float64)
    if labels:
        kwargs["labels"] = torch.randint(0, max(1, b // 3), (b,), generator=gen)
    if distill:
        dt = dt or d
        kwargs.update(teacher_image_features=unit(b, dt), teacher_text_features=unit(b, dt),
                      teacher_logit_scale=8.0, distill_weight=1.5)
        if bias:
            kwargs["teacher_logit_bias"] = -6.0
    return inputs, kwargs


def _leaves(inputs, scalar_dtype=None):
    out = {}
    for k, v in inputs.items():
        v = v.detach().clone()
        if scalar_dtype is not None and v.dim() == 0:
            v = v.to(scalar_dtype)
        out[k] = v.requires_grad_()
    return out


def loss_and_grads(fn, inputs, kwargs, **extra):
    leaves = _leaves(inputs)
    loss = fn(**leaves, **kwargs, **extra)
    return loss, dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


def reference64(inputs, kwargs):
    up = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
          for k, v in kwargs.items()}
    return loss_and_grads(sigmoid_loss_reference, {k: v.double() for k, v in inputs.items()}, up)


def assert_matches(got, want, rtol, atol):
    loss, grads = got
    ref_loss, ref_grads = want
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=atol)
    for name in ref_grads:
        torch.testing.assert_close(grads[name].double(), ref_grads[name], rtol=rtol, atol=atol,
                                   msg=lambda m: f"d/d{name}: {m}")


# ---- float64 against the reference and against open_clip ------------------------------------
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("b,d", SIZES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_matches_the_reference(backend, b, d, option):
    inputs, kwargs = make_inputs(b, d, **OPTIONS[option])
    got = loss_and_grads(sigmoid_loss, inputs, kwargs, backend=backend)
    assert got[0].dtype == torch.float64
    assert_matches(got, reference64(inputs, kwargs), rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("b,d", SIZES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_matches_open_clip_siglip_loss(backend, b, d, bias):
    from open_clip.loss import SigLipLoss as OpenClipSigLipLoss
    inputs, _ = make_inputs(b, d, bias=bias, seed=1)
    leaves = _leaves(inputs)
    theirs = OpenClipSigLipLoss()(*leaves.values(), *([] if bias else [None]))
    want = (theirs, dict(zip(leaves, torch.autograd.grad(theirs, list(leaves.values())))))
    ours = loss_and_grads(lambda **kw: SigLipLoss(backend=backend)(
        *kw.values(), *([] if bias else [None])), inputs, {})
    assert_matches(ours, want, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("chunk_rows", [1, 7, 33, 100, 256, 1000])
@pytest.mark.parametrize("backend", ["cpu", "chunked"])
def test_panels_that_do_not_divide_the_batch(backend, chunk_rows):
    """chunk_rows sets the C++ kernel's rows per panel (at most 256) and the chunked kernel's
    rows per chunk: every split gives the reference's numbers, across 256-column tiles
    (B = 300)."""
    inputs, kwargs = make_inputs(300, 9, bias=True, labels=True, distill=True, seed=2)
    got = loss_and_grads(sigmoid_loss, inputs, kwargs, backend=backend, chunk_rows=chunk_rows)
    assert_matches(got, reference64(inputs, kwargs), rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("backend,chunk_rows", [("cpu", None), ("chunked", 2500)])
def test_large_batch_against_a_row_chunked_float64_reference(backend, chunk_rows):
    """B = 20000, d = 8 (4e8 pairs) in float32 through the C++ kernel and the chunked kernel
    (chunks of 2500 rows: its fp32 sums within a chunk, float64 across) against float64
    computed in row chunks of the same reference terms (never the whole B x B)."""
    b, d = 20000, 8
    inputs, kwargs = make_inputs(b, d, dtype=torch.float32, bias=True, labels=True,
                                 distill=True, seed=3)
    loss, grads = loss_and_grads(sigmoid_loss, inputs, kwargs, backend=backend,
                                 chunk_rows=chunk_rows)
    x, y = (inputs[k].double() for k in ("image_features", "text_features"))
    tx, ty = (kwargs[k].double() for k in ("teacher_image_features", "teacher_text_features"))
    scale = inputs["logit_scale"].double().requires_grad_()
    bias = inputs["logit_bias"].double().requires_grad_()
    labels, w = kwargs["labels"], kwargs["distill_weight"]
    total = 0.0
    want = {"image_features": torch.zeros_like(x), "text_features": torch.zeros_like(y),
            "logit_scale": 0.0, "logit_bias": 0.0}
    y_leaf = y.clone().requires_grad_()
    for r0 in range(0, b, 2500):
        xc = x[r0:r0 + 2500].clone().requires_grad_()
        s = scale * xc @ y_leaf.T + bias
        t = kwargs["teacher_logit_scale"] * tx[r0:r0 + 2500] @ ty.T + kwargs["teacher_logit_bias"]
        pos = sigmoid_positives(xc.shape[0], b, labels[r0:r0 + 2500], labels)
        pair, sd = sigmoid_pair_terms_reference(s, pos, t)
        chunk = (pair.sum() + w * sd.sum()) / b
        gx, gy, gs, gb = torch.autograd.grad(chunk, (xc, y_leaf, scale, bias))
        total += chunk.item()
        want["image_features"][r0:r0 + 2500] = gx
        want["text_features"] += gy
        want["logit_scale"] += gs.item()
        want["logit_bias"] += gb.item()
    assert math.isclose(loss.item(), total, rel_tol=2e-6)
    for name, ref in want.items():
        got = grads[name].double()
        ref = torch.as_tensor(ref, dtype=torch.float64)
        err = (got - ref).abs().max().item() / ref.abs().max().item()
        assert err < 1e-4, (name, err)


# ---- gradients: gradcheck ---------------------------------------------------------------------
@pytest.mark.parametrize("option", ["bias", "labels", "distill", "all"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend, option):
    inputs, kwargs = make_inputs(11, 4, scale=3.0, bias_value=-2.0, seed=4, **OPTIONS[option])
    leaves = _leaves(inputs)
    names = list(leaves)

    def fn(*args):
        return sigmoid_loss(**dict(zip(names, args)), **kwargs, backend=backend)
    assert torch.autograd.gradcheck(fn, tuple(leaves.values()))


def test_teacher_gets_no_gradient_and_scalars_may_be_floats():
    inputs, kwargs = make_inputs(9, 4, bias=True, distill=True, seed=5)
    t_img = kwargs["teacher_image_features"].clone().requires_grad_()
    kwargs = dict(kwargs, teacher_image_features=t_img,
                  teacher_logit_scale=torch.tensor(8.0, dtype=torch.float64, requires_grad=True))
    img = inputs["image_features"].clone().requires_grad_()
    loss = sigmoid_loss(img, inputs["text_features"], 10.0, -10.0, **kwargs)
    loss.backward()
    assert img.grad is not None and t_img.grad is None
    assert kwargs["teacher_logit_scale"].grad is None


def test_double_backward_raises_a_clear_error():
    inputs, _ = make_inputs(6, 3, seed=6)
    img = inputs["image_features"].clone().requires_grad_()
    loss = sigmoid_loss(img, inputs["text_features"], 10.0)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(loss, img, create_graph=True)


# ---- half inputs, extreme scales --------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (100.0, -20.0)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_inputs_and_extreme_scales_stay_accurate(backend, dtype, scale, bias):
    """fp16/bf16 inputs accumulate in fp32: the loss and gradients match float64 on the same
    (rounded) inputs, with SigLIP's initial scale and bias and with scale 100, bias -20."""
    inputs, kwargs = make_inputs(257, 32, dtype=dtype, scale=scale, bias_value=bias,
                                 bias=True, labels=True, distill=True, seed=7)
    # anti-aligned and aligned pairs: logits reach -120 and +80
    inputs["text_features"][:8] = -inputs["image_features"][:8]
    inputs["text_features"][8:16] = inputs["image_features"][8:16]
    leaves = {k: (v.detach().clone() if v.dim() else v.detach().float()).requires_grad_()
              for k, v in inputs.items()}
    loss = sigmoid_loss(**leaves, **kwargs, backend=backend)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    assert loss.dtype == dtype and grads[0].dtype == dtype
    ref_loss, ref_grads = reference64(inputs, kwargs)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    loss_tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert abs(loss.double().item() - ref_loss.item()) <= loss_tol * abs(ref_loss.item())
    for g, (name, ref) in zip(grads, ref_grads.items()):
        err = (g.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
        grad_tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
        assert err < grad_tol, (name, err)


def test_kernel_log1p_is_accurate_to_a_few_ulps():
    x = torch.linspace(-87.0, 87.0, 200_001)
    e, l1p = testing.sigmoid_log1p_cpu(x)
    exact = torch.exp(-x.double().abs())
    assert ((e.double() - exact).abs() / exact).max().item() < 4 * 2.0 ** -24
    want = torch.log1p(exact)
    assert ((l1p.double() - want).abs() / want).max().item() < 4 * 2.0 ** -24
    e, l1p = testing.sigmoid_log1p_cpu(torch.tensor([float("nan")] * 9 + [float("inf"), 0.0]))
    assert l1p[:9].isnan().all() and l1p[9] == 0 and l1p[10].item() == pytest.approx(math.log(2))


def test_nan_features_give_a_nan_loss():
    inputs, _ = make_inputs(20, 4, dtype=torch.float32, seed=8)
    inputs["image_features"][3, 1] = float("nan")
    assert torch.isnan(sigmoid_loss(inputs["image_features"], inputs["text_features"], 10.0))


# ---- the kernel contract: row-only calls of a process group's local rows ---------------------
@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["cpu", "chunked"])
def test_kernels_match_the_reference_kernel_for_local_rows(backend, dtype, labels):
    """M local rows (global rows offset..offset+M) against N keys, labels of rows and keys
    given separately: the contract the process-group path calls (chunks of 16 rows)."""
    gen = torch.Generator().manual_seed(9)
    m, n, d, offset = 45, 310, 6, 200
    q, k = (torch.randn(x, d, generator=gen, dtype=dtype) for x in (m, n))
    tq, tk = (torch.randn(x, 3, generator=gen, dtype=dtype) for x in (m, n))
    scalar = lambda v: torch.tensor(v, dtype=dtype)  # noqa: E731
    lab = (torch.randint(0, 9, (m,), generator=gen), torch.randint(0, 9, (n,), generator=gen)) \
        if labels else (None, None)
    args = (q, k, scalar(4.0), scalar(-3.0), *lab, offset, tq, tk, scalar(2.0), scalar(-1.0),
            0.7, True, 16)
    from calrft_kernels.sigmoid import _kernel
    got = _kernel(backend)(*args)
    want = sigmoid_pairs_kernel(*args)
    assert got[0].shape == want[0].shape == (5,)
    tol = dict(rtol=1e-12, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-4)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)


def test_repeated_calls_are_bitwise_identical():
    inputs, kwargs = make_inputs(700, 64, dtype=torch.float32, bias=True, distill=True, seed=10)
    first = loss_and_grads(sigmoid_loss, inputs, kwargs, backend="cpu")
    second = loss_and_grads(sigmoid_loss, inputs, kwargs, backend="cpu")
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(first[1][k], second[1][k]) for k in first[1])


# ---- SigLipLoss: open_clip's constructor and forward ------------------------------------------
def test_siglip_loss_is_a_drop_in_for_open_clip():
    from open_clip.loss import SigLipLoss as OpenClipSigLipLoss
    inputs, _ = make_inputs(48, 32, dtype=torch.float32, bias=True, seed=11)
    args = list(inputs.values())
    args[2:] = [a.float() for a in args[2:]]
    ours = SigLipLoss(cache_labels=True, rank=0, world_size=1, dist_impl="gather")
    theirs = OpenClipSigLipLoss(cache_labels=True, rank=0, world_size=1, dist_impl="gather")
    out = ours(*args, output_dict=True)
    assert list(out) == ["contrastive_loss"]
    torch.testing.assert_close(out["contrastive_loss"], theirs(*args), rtol=1e-5, atol=1e-5)
    assert ours.dist_impl == "gather" and SigLipLoss().dist_impl == "bidir"


def test_siglip_loss_refuses_an_unknown_dist_impl():
    with pytest.raises(ValueError, match="dist_impl must be one of"):
        SigLipLoss(dist_impl="ring")


# ---- bad input --------------------------------------------------------------------------------
def _bad_call(**changes):
    inputs, kwargs = make_inputs(5, 3, bias=True, seed=12)
    args = dict(inputs, **kwargs)
    args.update(changes)
    return lambda: sigmoid_loss(**args)


def _ones(*shape, dtype=torch.float64):
    return torch.ones(*shape, dtype=dtype)


@pytest.mark.parametrize("changes,error,match", [
    ({"image_features": [[1.0]]}, TypeError, "image_features must be a torch.Tensor"),
    ({"text_features": _ones(5, 3, dtype=torch.int64)}, TypeError, "text_features must be float"),
    ({"text_features": _ones(4, 3)}, ValueError, "text_features has 4 rows"),
    ({"text_features": _ones(5, 2)}, ValueError, "text_features has width 2"),
    ({"image_features": _ones(5, 3, 1)}, ValueError, "image_features must be 2-D"),
    ({"logit_scale": float("nan")}, ValueError, "logit_scale must be finite"),
    ({"logit_bias": torch.tensor(float("inf"))}, ValueError, "logit_bias must be finite"),
    ({"logit_scale": torch.ones(2)}, ValueError, "logit_scale must be a scalar"),
    ({"logit_bias": "x"}, TypeError, "logit_bias must be a float or a 0-dim tensor"),
    ({"labels": torch.zeros(4, dtype=torch.int64)}, ValueError, r"labels must have shape \(5,\)"),
    ({"labels": torch.zeros(5)}, TypeError, "labels must be an integer tensor"),
    ({"distill_weight": -1.0}, ValueError, "distill_weight must be in"),
    ({"distill_weight": 1.0}, ValueError, "distill_weight > 0 needs teacher_image_features"),
    ({"distill_weight": 1.0, "teacher_image_features": torch.ones(5, 3, dtype=torch.float64),
      "teacher_text_features": torch.ones(5, 3, dtype=torch.float64),
      "teacher_logit_scale": 2.0}, ValueError, "teacher_logit_bias is required"),
    ({"distill_weight": 1.0, "teacher_image_features": torch.ones(5, 3, dtype=torch.float64),
      "teacher_text_features": torch.ones(5, 3, dtype=torch.float64),
      "teacher_logit_scale": 2.0, "teacher_logit_bias": float("nan")}, ValueError,
     "teacher_logit_bias must be finite"),
    ({"chunk_rows": 0}, ValueError, "chunk_rows must be a positive int"),
    ({"backend": "triton"}, ValueError, "no triton kernel"),
    ({"backend": "cuda"}, ValueError, "no cuda kernel"),
    ({"backend": "gpu"}, ValueError, "backend must be one of"),
])
def test_bad_input_names_the_argument(changes, error, match):
    with pytest.raises(error, match=match):
        _bad_call(**changes)()
