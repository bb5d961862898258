"""contrastive_loss against the float64 materialising reference, for every backend that runs here:
the C++ CPU kernel ("cpu") and the Triton kernels under TRITON_INTERPRET=1 ("triton")."""
import itertools
import os
import subprocess
import sys

import pytest
import torch

from calrft_kernels import contrastive_loss
from calrft_kernels.reference import contrastive_loss_reference

BACKENDS = ["cpu", "triton", "chunked"]
OPTIONS = {
    "plain": {},
    "bias": {"bias": True},
    "labels": {"labels": True},
    "smoothing": {"label_smoothing": 0.1},
    "distill": {"distill": True},
    "all": {"bias": True, "labels": True, "label_smoothing": 0.2, "distill": True},
}


def make_inputs(b, d, dtype=torch.float64, scale=7.0, seed=0, bias=False, labels=False,
                distill=False, label_smoothing=0.0, dt=None):
    gen = torch.Generator().manual_seed(seed)
    unit = lambda n, m: torch.nn.functional.normalize(  # noqa: E731
        torch.randn(n, m, generator=gen, dtype=torch.float64), dim=1)
    inputs = {"image_features": unit(b, d).to(dtype), "text_features": unit(b, d).to(dtype),
              "logit_scale": torch.tensor(scale, dtype=torch.float64)}
    kwargs = {"label_smoothing": label_smoothing}
    if bias:
        inputs["logit_bias"] = torch.tensor(-1.3, dtype=torch.float64)
    if labels:
        kwargs["labels"] = torch.randint(0, max(1, b // 3), (b,), generator=gen)
    if distill:
        dt = dt or d
        kwargs.update(teacher_image_features=unit(b, dt).to(dtype),
                      teacher_text_features=unit(b, dt).to(dtype), teacher_logit_scale=5.0,
                      distill_weight=1.5)
    return inputs, kwargs


def loss_and_grads(backend, inputs, kwargs, grad_dtype=None):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    if grad_dtype is not None:
        leaves = {k: (v.detach().to(grad_dtype).requires_grad_() if v.dim() == 0 else v)
                  for k, v in leaves.items()}
    if backend == "reference64":
        up = {k: v.double() for k, v in leaves.items()}
        kw = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
              for k, v in kwargs.items()}
        loss = contrastive_loss(**up, **kw, backend="reference")
    else:
        loss = contrastive_loss(**leaves, **kwargs, backend=backend)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return loss, dict(zip(leaves, grads))


def assert_close_to_reference(backend, inputs, kwargs, rtol, atol):
    loss, grads = loss_and_grads(backend, inputs, kwargs)
    ref_loss, ref_grads = loss_and_grads("reference64", inputs, kwargs)
    assert loss.dtype == inputs["image_features"].dtype
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=atol)
    for name, grad in grads.items():
        torch.testing.assert_close(grad.double(), ref_grads[name].double(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"grad of {name}: {m}")


SIZES_CPU = [(1, 1), (2, 3), (5, 65), (37, 16), (130, 3), (257, 33)]
SIZES_TRITON = [(1, 1), (2, 3), (37, 16), (97, 65)]


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("b,d", SIZES_CPU)
def test_cpu_float64_matches_reference(b, d, option):
    inputs, kwargs = make_inputs(b, d, seed=b * 100 + d, **OPTIONS[option])
    assert_close_to_reference("cpu", inputs, kwargs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("b,d", SIZES_CPU[:4])
def test_cpu_float32_matches_reference(b, d, option):
    inputs, kwargs = make_inputs(b, d, dtype=torch.float32, seed=b + d, **OPTIONS[option])
    assert_close_to_reference("cpu", inputs, kwargs, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("option", ["plain", "all"])
@pytest.mark.parametrize("b,d", SIZES_TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_interpreted_matches_reference(b, d, option, dtype):
    inputs, kwargs = make_inputs(b, d, dtype=dtype, seed=b + d, **OPTIONS[option])
    tol = dict(rtol=2e-4, atol=2e-5) if dtype == torch.float32 else dict(rtol=5e-3, atol=2e-3)
    assert_close_to_reference("triton", inputs, kwargs, **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_low_precision_inputs_match_reference_on_rounded_inputs(dtype):
    inputs, kwargs = make_inputs(67, 24, dtype=dtype, seed=3, **OPTIONS["all"])
    # the reference sees the same rounded inputs in float64; only accumulation error remains
    assert_close_to_reference("cpu", inputs, kwargs, rtol=1e-2, atol=2e-3)


def test_teacher_width_may_differ_from_student_width():
    inputs, kwargs = make_inputs(19, 8, distill=True, dt=13, seed=5)
    assert_close_to_reference("cpu", inputs, kwargs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_100_anti_aligned_features_stay_finite_and_exact(backend):
    # every off-diagonal logit is +100, the diagonal -100: a fixed max of +scale would be fine
    # here, but the columns/rows of the anti-aligned block below underflow without an online max
    b, d = 40, 8
    f = torch.nn.functional.normalize(torch.randn(b, d, dtype=torch.float64), dim=1)
    inputs = {"image_features": f.float(), "text_features": (-f).float(),
              "logit_scale": torch.tensor(100.0, dtype=torch.float64)}
    loss, grads = loss_and_grads(backend, inputs, {})
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    assert_close_to_reference(backend, inputs, {}, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    inputs, kwargs = make_inputs(31, 40, dtype=torch.float32, seed=9, **OPTIONS["all"])
    strided = {k: (v.T.contiguous().T[:, ::2] if v.dim() == 2 else v) for k, v in inputs.items()}
    kw = {k: (v.T.contiguous().T[:, ::2] if torch.is_tensor(v) and v.dim() == 2 else v)
          for k, v in kwargs.items()}
    assert not strided["image_features"].is_contiguous()
    assert_close_to_reference(backend, strided, kw, rtol=2e-4, atol=2e-5)


def test_gradcheck_float64_all_options():
    inputs, kwargs = make_inputs(6, 4, **OPTIONS["all"])
    leaves = [v.detach().clone().requires_grad_() for v in inputs.values()]
    fn = lambda *xs: contrastive_loss(*xs, **kwargs, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)


def test_gradcheck_float64_float_scale_and_no_bias():
    inputs, kwargs = make_inputs(5, 3, labels=True, label_smoothing=0.3)
    f, g = (inputs[k].detach().clone().requires_grad_() for k in ("image_features", "text_features"))
    fn = lambda f, g: contrastive_loss(f, g, 4.5, **kwargs, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (f, g))


def test_teacher_gets_no_gradient_and_scale_grad_flows():
    inputs, kwargs = make_inputs(9, 5, distill=True)
    teacher = kwargs["teacher_image_features"].clone().requires_grad_()
    kwargs["teacher_image_features"] = teacher
    scale = inputs.pop("logit_scale").clone().requires_grad_()
    loss = contrastive_loss(**inputs, logit_scale=scale, **kwargs, backend="cpu")
    loss.backward()
    assert teacher.grad is None and scale.grad is not None and scale.grad != 0


def test_auto_picks_cpu_kernel_on_cpu_tensors():
    inputs, kwargs = make_inputs(11, 7, **OPTIONS["all"])
    auto = contrastive_loss(**inputs, **kwargs)
    cpu = contrastive_loss(**inputs, **kwargs, backend="cpu")
    assert torch.equal(auto, cpu)


def test_cuda_backend_is_unavailable_for_this_op():
    inputs, _ = make_inputs(3, 2)
    with pytest.raises(ValueError, match="backend='cuda' is unavailable"):
        contrastive_loss(**inputs, backend="cuda")


def test_triton_on_cpu_tensors_without_interpreter_raises():
    code = ("import torch; from calrft_kernels import contrastive_loss\n"
            "x = torch.randn(3, 2)\n"
            "try:\n    contrastive_loss(x, x, 1.0, backend='triton')\n"
            "except ValueError as e:\n    print('ValueError:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "ValueError: backend='triton' is unavailable" in out.stdout, out.stderr


def _bad_cases():
    x = torch.randn(4, 3)
    ok = dict(image_features=x, text_features=x, logit_scale=1.0)
    teacher = dict(teacher_image_features=x, teacher_text_features=x, teacher_logit_scale=1.0)
    return [
        (dict(ok, image_features=x[0]), ValueError, "image_features must be 2-D"),
        (dict(ok, image_features=x.numpy()), TypeError, "image_features must be a torch.Tensor"),
        (dict(ok, text_features=torch.randn(5, 3)), ValueError, "text_features has 5 rows"),
        (dict(ok, text_features=torch.randn(4, 2)), ValueError, "text_features has width"),
        (dict(ok, text_features=x.double()), TypeError, "text_features has dtype"),
        (dict(ok, image_features=x.int(), text_features=x.int()), TypeError, "image_features must be float"),
        (dict(ok, image_features=x[:0], text_features=x[:0]), ValueError, "at least one row"),
        (dict(ok, logit_scale=torch.ones(2)), ValueError, "logit_scale must be a scalar"),
        (dict(ok, logit_scale="2"), TypeError, "logit_scale must be a float"),
        (dict(ok, logit_scale=float("nan")), ValueError, "logit_scale must be finite"),
        (dict(ok, logit_bias=torch.ones(3)), ValueError, "logit_bias must be a scalar"),
        (dict(ok, labels=torch.zeros(3, dtype=torch.long)), ValueError, "labels must have shape"),
        (dict(ok, labels=torch.zeros(4)), TypeError, "labels must be an integer tensor"),
        (dict(ok, label_smoothing=1.0), ValueError, "label_smoothing must be in"),
        (dict(ok, distill_weight=-1.0), ValueError, "distill_weight must be in"),
        (dict(ok, distill_weight=1.0), ValueError, "needs teacher_image_features"),
        (dict(ok, distill_weight=1.0, **dict(teacher, teacher_text_features=torch.randn(4, 2))),
         ValueError, "differ in width"),
        (dict(ok, distill_weight=1.0, **dict(teacher, teacher_image_features=torch.randn(2, 3))),
         ValueError, "teacher_image_features has 2 rows"),
        (dict(ok, backend="gpu"), ValueError, "backend must be one of"),
    ]


@pytest.mark.parametrize("kwargs,error,match", _bad_cases())
def test_bad_input_names_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        contrastive_loss(**kwargs)


def test_float64_on_triton_is_refused_clearly():
    x = torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend='triton'"):
        contrastive_loss(x, x, 1.0, backend="triton")


@pytest.mark.parametrize("option,compiler,backend", [("plain", "aot_eager", "cpu"),
                                                     ("all", "aot_eager", "cpu"),
                                                     ("all", "inductor", "cpu"),
                                                     ("all", "aot_eager", "chunked")])
def test_torch_compile_fullgraph_matches_eager(option, compiler, backend):
    """The op's fake kernels and registered autograd let torch.compile trace forward and
    backward in one graph (fullgraph: no graph break) with the same results as eager."""
    inputs, kwargs = make_inputs(23, 9, dtype=torch.float32, seed=4, **OPTIONS[option])

    def loss_fn(image, text, scale):
        # chunk_rows: several chunks, the last one short (23 rows)
        return contrastive_loss(image, text, scale, inputs.get("logit_bias"), **kwargs,
                                backend=backend, **({"chunk_rows": 10} if backend == "chunked" else {}))

    def run(fn):
        leaves = [inputs[k].detach().clone().requires_grad_()
                  for k in ("image_features", "text_features", "logit_scale")]
        loss = fn(*leaves)
        loss.backward()
        return [loss] + [leaf.grad for leaf in leaves]

    eager = run(loss_fn)
    compiled = run(torch.compile(loss_fn, fullgraph=True, backend=compiler))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_memory_stays_far_below_one_b_by_b_matrix():
    """B = 20000, d = 64: forward+backward must grow peak RSS far less than one B x B fp32 matrix
    (1.6 GB). Run in a fresh process so the measurement is this op's alone."""
    code = r"""
import resource, torch
from calrft_kernels import contrastive_loss
torch.manual_seed(0)
b, d = 20000, 64
f = torch.nn.functional.normalize(torch.randn(b, d), dim=1).requires_grad_()
g = torch.nn.functional.normalize(torch.randn(b, d), dim=1).requires_grad_()
contrastive_loss(f[:64], g[:64], 10.0).backward()   # warm up allocator and thread pool
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
contrastive_loss(f, g, 10.0, labels=torch.arange(b) % 100).backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    grown = int(out.stdout.split()[-1])
    assert grown < 200e6, f"peak RSS grew by {grown / 1e6:.0f} MB (one B x B fp32 matrix is 1600 MB)"


@pytest.mark.parametrize("backend", ["cpu", "chunked", "reference"])
@pytest.mark.parametrize("name,value", [("logit_scale", float("inf")),
                                        ("logit_scale", float("nan")),
                                        ("logit_bias", float("-inf")),
                                        ("teacher_logit_scale", float("inf"))])
def test_non_finite_tensor_scalars_name_the_argument(backend, name, value):
    """A tensor scalar that is not finite is refused like a float one (not a silent NaN)."""
    x = torch.randn(4, 3)
    kw = dict(image_features=x, text_features=x, logit_scale=torch.tensor(2.0),
              teacher_image_features=x, teacher_text_features=x,
              teacher_logit_scale=torch.tensor(1.0), distill_weight=1.0, backend=backend)
    kw[name] = torch.tensor(value)
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        contrastive_loss(**kw)


def test_finite_scalars_pass_and_the_check_can_be_skipped_for_device_tensors():
    from calrft_kernels import _backend, device_checks
    x = torch.randn(4, 3)
    assert torch.isfinite(contrastive_loss(x, x, torch.tensor(3.0), torch.tensor(-1.0)))
    # the opt-out only concerns GPU tensors (the check is free on CPU tensors): still raises
    off_cpu = torch.empty((), device="meta")
    with device_checks(False):
        assert not _backend.host_checks_for(off_cpu)
        with pytest.raises(ValueError, match="logit_scale must be finite"):
            contrastive_loss(x, x, torch.tensor(float("inf")))
    assert _backend.host_checks_for(off_cpu)                # restored on exit
