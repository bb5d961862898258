"""Triton contrastive statistics kernels, run on CPU tensors under TRITON_INTERPRET=1 (set by
conftest.py), against the float64 reference on the same (dtype-rounded) inputs.

The interpreter runs the programs one after another, so the atomic column merges never race
here; tests/test_triton_aot.py compiles the kernels for sm_90 and benchmarks/gpu/loss.py checks
them on a GPU."""
import pytest
import torch

from calrft_kernels.reference import contrastive_stats_grads_reference, contrastive_stats_reference
from calrft_kernels.triton import stats_backward, stats_forward

SHAPES = [(1, 1, 1), (2, 17, 3), (17, 2, 65), (31, 97, 3), (64, 64, 1), (97, 31, 65),
          (130, 130, 3), (1, 130, 65), (130, 1, 1)]


def _make(m, n, d, dtype, teacher, dt=7, scale=3.5, bias=-1.25, tscale=2.5):
    """Inputs rounded to dtype, plus their float64 copies for the reference."""
    q = torch.randn(m, d).to(dtype)
    k = torch.randn(n, d).to(dtype)
    args = dict(q=q, k=k, scale=torch.tensor(scale), bias=torch.tensor(bias))
    if teacher:
        args.update(tq=torch.randn(m, dt).to(dtype), tk=torch.randn(n, dt).to(dtype),
                    tscale=torch.tensor(tscale))
    ref = {name: v.double() for name, v in args.items()}
    return args, ref


def _bound(ref):
    """Size of the largest logit (student or teacher): absolute errors scale with it."""
    b = ref["scale"].abs() * ref["q"].norm(dim=1).max() * ref["k"].norm(dim=1).max()
    b = b + ref["bias"].abs() + 1.0
    if "tq" in ref:
        b = b + ref["tscale"].abs() * ref["tq"].norm(dim=1).max() * ref["tk"].norm(dim=1).max()
    return float(b)


def _reference_grads(ref, grad_row, grad_col, with_cols):
    """d/dq, d/dk of L = sum(g * row_stats) + sum(h * col_stats), teacher lse rows excluded."""
    dq, dk, _, _ = contrastive_stats_grads_reference(
        ref["q"], ref["k"], ref["scale"], ref["bias"], ref.get("tq"), ref.get("tk"),
        ref.get("tscale"), grad_row=grad_row.double(), grad_col=grad_col.double(),
        with_cols=with_cols)
    return dq, dk


def _check(m, n, d, dtype, teacher, with_cols, grad_rtol, **kw):
    args, ref = _make(m, n, d, dtype, teacher, **kw)
    rows, cols = stats_forward(args["q"], args["k"], args["scale"], args["bias"], args.get("tq"),
                               args.get("tk"), args.get("tscale"), with_cols)
    ref_rows, ref_cols = contrastive_stats_reference(ref["q"], ref["k"], ref["scale"],
                                                     ref["bias"], ref.get("tq"), ref.get("tk"),
                                                     ref.get("tscale"), with_cols)
    r = 3 if teacher else 1
    assert rows.dtype == cols.dtype == torch.float32
    assert rows.shape == (r, m) and cols.shape == ((r, n) if with_cols else (r, 0))
    atol = 2e-6 * _bound(ref)
    torch.testing.assert_close(rows.double(), ref_rows, rtol=1e-5, atol=atol)
    torch.testing.assert_close(cols.double(), ref_cols, rtol=1e-5, atol=atol)

    grad_row = torch.randn(r, m)
    grad_col = torch.randn(r, n) if with_cols else torch.empty(r, 0)
    dq_u, dk_u = stats_backward(grad_row, grad_col, args["q"], args["k"], args["scale"],
                                args["bias"], args.get("tq"), args.get("tk"), args.get("tscale"),
                                rows, cols, with_cols)
    assert dq_u.shape == (m, d) and dk_u.shape == (n, d) and dq_u.dtype == torch.float32
    gq, gk = _reference_grads(ref, grad_row, grad_col, with_cols)
    s = ref["scale"]
    for got, want in ((dq_u, gq), (dk_u, gk)):
        tol = grad_rtol * float(want.abs().max()) + 1e-9
        torch.testing.assert_close(s * got.double(), want, rtol=0, atol=tol)
    return rows, cols, dq_u, dk_u


@pytest.mark.parametrize("with_cols", [True, False])
@pytest.mark.parametrize("teacher", [False, True])
@pytest.mark.parametrize("m,n,d", SHAPES)
def test_fp32_matches_float64_reference(m, n, d, teacher, with_cols):
    _check(m, n, d, torch.float32, teacher, with_cols, grad_rtol=2e-5)


@pytest.mark.parametrize("with_cols", [True, False])
@pytest.mark.parametrize("teacher", [False, True])
@pytest.mark.parametrize("m,n,d", [(2, 17, 3), (97, 31, 65), (130, 130, 3), (64, 64, 1)])
def test_fp16_matches_float64_reference(m, n, d, teacher, with_cols):
    # The backward rounds dS to fp16 for the tensor-core product: ~1e-3 relative error.
    _check(m, n, d, torch.float16, teacher, with_cols, grad_rtol=5e-3)


@pytest.mark.parametrize("teacher", [False, True])
@pytest.mark.parametrize("m,n,d", [(31, 97, 65), (130, 17, 3)])
def test_bf16_upcast_path_matches_float64_reference(m, n, d, teacher):
    # Under the interpreter bf16 operands are upcast to fp32 (its bf16 dot is broken); on a GPU
    # bf16 runs natively (benchmarks/gpu/loss.py checks it).
    _check(m, n, d, torch.bfloat16, teacher, True, grad_rtol=2e-5)


@pytest.mark.parametrize("teacher", [False, True])
def test_scale_100_anti_aligned_features_stay_finite(teacher):
    """Logits in [-100, 100] (no fixed max can be assumed): every statistic finite and exact."""
    m, d = 97, 65
    f = torch.nn.functional.normalize(torch.randn(m, d), dim=1)
    q = f.clone()
    k = f.clone()
    k[::2] = -k[::2]  # every other pair anti-aligned: S_ii = -100 + bias
    args = dict(q=q, k=k, scale=torch.tensor(100.0), bias=torch.tensor(-10.0))
    if teacher:
        args.update(tq=-k.clone(), tk=q.clone(), tscale=torch.tensor(100.0))
    ref = {name: v.double() for name, v in args.items()}
    rows, cols = stats_forward(args["q"], args["k"], args["scale"], args["bias"], args.get("tq"),
                               args.get("tk"), args.get("tscale"), True)
    ref_rows, ref_cols = contrastive_stats_reference(ref["q"], ref["k"], ref["scale"],
                                                     ref["bias"], ref.get("tq"), ref.get("tk"),
                                                     ref.get("tscale"))
    assert torch.isfinite(rows).all() and torch.isfinite(cols).all()
    torch.testing.assert_close(rows.double(), ref_rows, rtol=1e-5, atol=2e-4)
    torch.testing.assert_close(cols.double(), ref_cols, rtol=1e-5, atol=2e-4)
    r = rows.shape[0]
    grad_row, grad_col = torch.randn(r, m), torch.randn(r, m)
    dq_u, dk_u = stats_backward(grad_row, grad_col, args["q"], args["k"], args["scale"],
                                args["bias"], args.get("tq"), args.get("tk"), args.get("tscale"),
                                rows, cols, True)
    gq, gk = _reference_grads(ref, grad_row, grad_col, True)
    assert torch.isfinite(dq_u).all() and torch.isfinite(dk_u).all()
    torch.testing.assert_close(100.0 * dq_u.double(), gq, rtol=0,
                               atol=1e-4 * float(gq.abs().max()))
    torch.testing.assert_close(100.0 * dk_u.double(), gk, rtol=0,
                               atol=1e-4 * float(gk.abs().max()))


def test_teacher_lse_gradients_are_ignored():
    args, _ = _make(31, 17, 3, torch.float32, True)
    a = [args[x] for x in ("q", "k", "scale", "bias", "tq", "tk", "tscale")]
    rows, cols = stats_forward(*a, True)
    g_row, g_col = torch.randn(3, 31), torch.randn(3, 17)
    base = stats_backward(g_row, g_col, *a, rows, cols, True)
    g_row[1], g_col[1] = 1e3, -1e3
    moved = stats_backward(g_row, g_col, *a, rows, cols, True)
    for x, y in zip(base, moved):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_distinct_teacher_width_and_bias_enter():
    # dt != d, and bias shifts every lse by exactly bias, leaves the teacher stats but row 2.
    args, _ = _make(17, 31, 65, torch.float32, True, dt=3)
    a = [args[x] for x in ("q", "k", "scale", "bias", "tq", "tk", "tscale")]
    rows, cols = stats_forward(*a, True)
    a[3] = args["bias"] + 2.0
    rows2, cols2 = stats_forward(*a, True)
    shift = torch.tensor([2.0, 0.0, 2.0])[:, None]
    torch.testing.assert_close(rows2, rows + shift, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(cols2, cols + shift, rtol=1e-6, atol=1e-5)


def test_bad_inputs_raise():
    q, k, s, b = torch.randn(4, 3), torch.randn(5, 3), torch.tensor(1.0), torch.tensor(0.0)
    with pytest.raises(TypeError, match="float64"):
        stats_forward(q.double(), k.double(), s, b)
    with pytest.raises(TypeError, match="q and k"):
        stats_forward(q, k.half(), s, b)
    with pytest.raises(TypeError, match="q must be"):
        stats_forward(q.long(), k.long(), s, b)
    with pytest.raises(ValueError, match="feature size"):
        stats_forward(q, torch.randn(5, 4), s, b)
    with pytest.raises(ValueError, match="q must be a 2-D"):
        stats_forward(q[0], k, s, b)
    with pytest.raises(ValueError, match="scale"):
        stats_forward(q, k, torch.ones(2), b)
    with pytest.raises(ValueError, match="together"):
        stats_forward(q, k, s, b, tq=q)
    with pytest.raises(ValueError, match="teacher rows"):
        stats_forward(q, k, s, b, torch.randn(3, 2), torch.randn(5, 2), s)
    with pytest.raises(ValueError, match="at least one row"):
        stats_forward(q[:0], k, s, b)
    rows, cols = stats_forward(q, k, s, b)
    with pytest.raises(ValueError, match="grad_row"):
        stats_backward(torch.ones(3, 4), torch.ones(1, 5), q, k, s, b, None, None, None,
                       rows, cols, True)
    with pytest.raises(ValueError, match="col_stats"):
        stats_backward(torch.ones(1, 4), torch.ones(1, 5), q, k, s, b, None, None, None,
                       rows, cols[:, :2], True)


def test_python_float_scalars_accepted():
    q, k = torch.randn(4, 3), torch.randn(5, 3)
    rows, cols = stats_forward(q, k, torch.tensor(2.0), torch.tensor(0.5))
    rows_f, cols_f = stats_forward(q, k, 2.0, 0.5)
    torch.testing.assert_close(rows, rows_f, rtol=0, atol=0)
    torch.testing.assert_close(cols, cols_f, rtol=0, atol=0)


# ---- the GPU suite section's CPU-side code paths --------------------------------------------
def test_gpu_loss_section_thin_composition_matches_reference():
    from benchmarks.gpu import loss as section
    from calrft_kernels.reference import contrastive_loss_reference
    img, txt = torch.randn(37, 5), torch.randn(37, 5)
    scale, bias = torch.tensor(4.0), torch.tensor(0.3)
    loss, d_img, d_txt = section.thin_loss_and_grads(img, txt, scale, bias, stats_forward,
                                                     stats_backward)
    i64, t64 = img.double().requires_grad_(), txt.double().requires_grad_()
    want = contrastive_loss_reference(i64, t64, scale.double(), bias.double())
    g_img, g_txt = torch.autograd.grad(want, (i64, t64))
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d_img.double(), g_img, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(d_txt.double(), g_txt, rtol=1e-4, atol=1e-6)


def test_gpu_loss_section_bookkeeping():
    from benchmarks.gpu import loss as section
    assert section.units_flops(4096, 512) == 8 * 4096 ** 2 * 512
    assert section.tflops(1e12, 1000.0) == pytest.approx(1.0)
    assert section.tflops(1e12, None) is None
    cases = section.timed_cases({})
    assert {(b, d) for b, d, _ in cases} == {(b, d) for b in section.TIMED_B
                                             for d in section.TIMED_D}
    assert {dt for _, _, dt in cases} == {"bf16", "fp32"}
    assert {b for b, _, _ in section.timed_cases({"CALRFT_LOSS_SIZES": "128,256"})} == {128, 256}
    assert len(section.check_precisions({})) == 3
    assert [p[0] for p in section.check_precisions({"CALRFT_LOSS_QUICK": "1"})] == [
        "fp32-tf32", "bf16"]
    if not torch.cuda.is_available():
        rows = section.run()
        assert len(rows) == 1 and rows[0]["check"].startswith("UNRUN")
        assert set(rows[0]) == {"op", "config", "check", "ms", "tflops", "note"}


def test_gpu_loss_section_config_checks_run_under_interpreter(monkeypatch):
    # Exercises every shipped config through the launchers' `config=` path (the GPU suite's
    # check), on CPU tensors: one small awkward size instead of the suite's.
    from benchmarks.gpu import loss as section
    monkeypatch.setattr(section, "CHECK_SIZES", ((37, 45, 20),))
    rows = section.check_configs(device="cpu")
    from calrft_kernels.triton import contrastive as tc
    assert len(rows) == 3 * 2 * (len(tc.FORWARD_CONFIGS) + len(tc.BACKWARD_CONFIGS))
    assert all(r["check"].endswith(": ok") for r in rows), [r for r in rows
                                                            if not r["check"].endswith(": ok")]


def test_teacher_dtype_may_differ_from_student():
    args, ref = _make(31, 45, 20, torch.float16, True, dt=9)
    args["tq"], args["tk"] = ref["tq"].float(), ref["tk"].float()  # fp32 teacher, fp16 student
    rows, cols = stats_forward(*(args[x] for x in ("q", "k", "scale", "bias", "tq", "tk",
                                                   "tscale")), True)
    ref_rows, ref_cols = contrastive_stats_reference(*(ref[x] for x in (
        "q", "k", "scale", "bias", "tq", "tk", "tscale")))
    atol = 2e-6 * _bound(ref)
    torch.testing.assert_close(rows.double(), ref_rows, rtol=1e-5, atol=atol)
    torch.testing.assert_close(cols.double(), ref_cols, rtol=1e-5, atol=atol)


def test_autotuning_key_buckets_batch_sizes():
    """A new batch size in a tuned power-of-two bucket reuses the tuned configuration (first
    call <= 1 s on a GPU): the key holds the buckets, not M and N."""
    from calrft_kernels.triton import contrastive as tc
    assert [tc._bucket(x) for x in (1, 2, 3, 4096, 4097, 24576, 32768)] == [
        1, 2, 4, 4096, 8192, 32768, 32768]
    for tuner in (tc._stats_fwd, tc._stats_bwd):
        assert "M_BUCKET" in tuner.keys and "N_BUCKET" in tuner.keys
        assert "M" not in tuner.keys and "N" not in tuner.keys
