"""The chunked contrastive kernel (calrft_kernels/chunked.py): the public op with
backend="chunked" against the float64 reference at awkward sizes with every option and chunk
sizes that do not divide B; gradcheck; the fused Triton passes (interpreted, CPU tensors)
against their plain-torch equivalents; and the work it does, counted with FlopCounterMode.
The distributed path (process_group) is covered in tests/test_contrastive_distributed.py, and
torch.compile with this backend in tests/test_contrastive_loss.py."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from calrft_kernels import chunked, contrastive_loss, testing
from calrft_kernels.reference import (contrastive_stats_backward_reference,
                                      contrastive_stats_reference)
from calrft_kernels.triton import contrastive_chunked as tcc

from test_contrastive_loss import OPTIONS, assert_close_to_reference, make_inputs

SIZES = [(1, 1), (7, 3), (97, 65), (130, 3), (130, 65), (5, 1024)]


def _chunk_options(b):
    """Chunk sizes: one row, a size that does not divide b, and the default (whole batch)."""
    return [1, max(1, b // 3 + 1), None] if b > 1 else [1, None]


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("b,d", SIZES)
def test_float64_matches_reference_every_option(b, d, option, monkeypatch):
    inputs, kwargs = make_inputs(b, d, seed=b * 7 + d, **OPTIONS[option])
    for chunk in _chunk_options(b):
        kw = dict(kwargs, chunk_rows=chunk)
        assert_close_to_reference("chunked", inputs, kw, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("option", ["plain", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs_match_reference_on_rounded_inputs(option, dtype):
    inputs, kwargs = make_inputs(97, 65, dtype=dtype, seed=11, **OPTIONS[option])
    kwargs["chunk_rows"] = 40
    tol = dict(rtol=2e-4, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-3)
    assert_close_to_reference("chunked", inputs, kwargs, **tol)


def test_default_chunk_sizing_follows_the_buffer_budget(monkeypatch):
    # whole batch when it fits; otherwise MAX_BUFFER_BYTES // bytes per row, multiple of 128
    assert chunked.chunk_rows_for(1000, 1000, torch.float32, False) == 1000
    assert chunked.chunk_rows_for(65536, 65536, torch.bfloat16, False) == 1280
    assert chunked.chunk_rows_for(65536, 65536, torch.float32, True) == 1024
    assert chunked.chunk_rows_for(10, 10, torch.float32, False, chunk_rows=3) == 3
    monkeypatch.setattr(chunked, "MAX_BUFFER_BYTES", 4 * 100 * 7)
    assert chunked.chunk_rows_for(50, 100, torch.float32, False) == 7
    # the module setting is what the public op uses: same loss with a 7-row budget
    inputs, kwargs = make_inputs(50, 9, **OPTIONS["all"])
    assert_close_to_reference("chunked", inputs, kwargs, rtol=1e-10, atol=1e-12)


def test_gradcheck_float64_all_options():
    inputs, kwargs = make_inputs(7, 4, **OPTIONS["all"])
    leaves = [v.detach().clone().requires_grad_() for v in inputs.values()]
    fn = lambda *xs: contrastive_loss(*xs, **kwargs, backend="chunked", chunk_rows=3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)


def test_scale_100_anti_aligned_features_stay_finite():
    b, d = 40, 8
    f = torch.nn.functional.normalize(torch.randn(b, d, dtype=torch.float64), dim=1)
    inputs = {"image_features": f.float(), "text_features": (-f).float(),
              "logit_scale": torch.tensor(100.0, dtype=torch.float64)}
    assert_close_to_reference("chunked", inputs, {"chunk_rows": 7}, rtol=1e-4, atol=1e-4)


def test_bad_chunk_rows_names_the_argument():
    x = torch.randn(4, 3)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="chunk_rows"):
            contrastive_loss(x, x, 1.0, backend="chunked", chunk_rows=bad)


# ---- the fused Triton passes (interpreted on CPU tensors) against the torch equivalents -------
CHUNKS = [(1, 1), (17, 45), (33, 130), (64, 31)]


def _chunk_inputs(c, n, teacher, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(c, n, generator=gen)
    t = torch.randn(c, n, generator=gen) if teacher else None
    return x, t, torch.tensor(7.5), torch.tensor(-1.25), torch.tensor(3.0) if teacher else None


@pytest.mark.parametrize("with_cols", [True, False])
@pytest.mark.parametrize("teacher", [False, True])
@pytest.mark.parametrize("c,n", CHUNKS)
def test_triton_chunk_stats_match_torch(c, n, teacher, with_cols):
    x, t, scale, bias, tscale = _chunk_inputs(c, n, teacher)
    got_rows, got_cols = tcc.chunk_stats(x.clone(), None if t is None else t.clone(), scale,
                                         bias, tscale, with_cols)
    want_rows, want_cols = chunked.chunk_stats_torch(x.clone(), None if t is None else t.clone(),
                                                     scale, bias, tscale, with_cols)
    # partials may differ in their reference max; the finished statistics may not
    torch.testing.assert_close(chunked.finalize_partials(got_rows),
                               chunked.finalize_partials(want_rows), rtol=1e-5, atol=1e-5)
    if with_cols:
        torch.testing.assert_close(chunked.finalize_partials(got_cols),
                                   chunked.finalize_partials(want_cols), rtol=1e-5, atol=1e-5)
    else:
        assert got_cols is None and want_cols is None


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_cols", [True, False])
@pytest.mark.parametrize("teacher", [False, True])
@pytest.mark.parametrize("c,n", CHUNKS[1:])
def test_triton_chunk_ds_matches_torch(c, n, teacher, with_cols, out_dtype):
    x, t, scale, bias, tscale = _chunk_inputs(c, n, teacher, seed=1)
    gen = torch.Generator().manual_seed(2)
    vec = lambda k: torch.randn(k, generator=gen)  # noqa: E731
    rows = (vec(c), vec(c) + 9.0, vec(c) if teacher else None, vec(c) + 4.0 if teacher else None)
    cols = ((vec(n), vec(n) + 9.0, vec(n) if teacher else None, vec(n) + 4.0 if teacher else None)
            if with_cols else (None,) * 4)
    factor = 64.0 if out_dtype == torch.float16 else 1.0
    got = tcc.chunk_ds(x.clone(), None if t is None else t.clone(), scale, bias, tscale, *rows,
                       *cols, out_dtype, factor)
    want = chunked.chunk_ds_torch(x.clone(), None if t is None else t.clone(), scale, bias,
                                  tscale, *rows, *cols, out_dtype, factor)
    assert got.dtype == want.dtype == out_dtype and got.shape == (c, n)
    tol = 1e-5 if out_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("teacher", [False, True])
def test_stats_kernel_with_triton_passes_matches_reference(dtype, teacher):
    """The whole chunked kernel with the Triton passes forced on (as on a GPU), chunk rows not
    dividing M, against the float64 reference of the kernel contract."""
    gen = torch.Generator().manual_seed(3)
    m, n, d = 45, 37, 20
    q, k = (torch.randn(x, d, generator=gen).to(dtype) for x in (m, n))
    args = [q, k, torch.tensor(3.5), torch.tensor(0.25)]
    args += ([torch.randn(m, 6, generator=gen).to(dtype), torch.randn(n, 6, generator=gen)
              .to(dtype), torch.tensor(2.0)] if teacher else [None, None, None])
    ref = [None if a is None else a.double() for a in args]
    rows, cols = chunked.stats_forward(*args, True, chunk_rows=16, fused=True)
    want_rows, want_cols = contrastive_stats_reference(*ref, with_cols=True)
    torch.testing.assert_close(rows.double(), want_rows, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cols.double(), want_cols, rtol=1e-5, atol=1e-4)
    r = rows.shape[0]
    g, h = torch.randn(r, m, generator=gen) / m, torch.randn(r, n, generator=gen) / n
    dq, dk = chunked.stats_backward(g, h, *args, rows, cols, True, chunk_rows=16, fused=True)
    want_dq, want_dk = contrastive_stats_backward_reference(g.double(), h.double(), *ref)
    tol = 2e-5 if dtype == torch.float32 else 5e-3  # fp16 dS rounding (pre-scaled, no underflow)
    for got, want in ((dq, want_dq), (dk, want_dk)):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=tol * float(want.abs().max()))


def test_fp16_gradients_of_a_large_batch_do_not_underflow():
    """dS ~ 1/B is below fp16's normal range at large B: the pre-scale keeps it representable."""
    m = n = 4096
    assert chunked.fp16_factor(torch.float16, m, n) == 4096.0
    assert chunked.fp16_factor(torch.bfloat16, m, n) == 1.0
    x = torch.zeros(3, 5)
    g = torch.full((3,), 0.5 / m)
    r = torch.full((3,), float(torch.log(torch.tensor(float(n)))))  # uniform softmax: p = 1/n
    none = dict(g2=None, r1=None, h0=None, c0=None, h2=None, c1=None)
    plain = chunked.chunk_ds_torch(x.clone(), None, 1.0, 0.0, None, g, r, **none,
                                   out_dtype=torch.float16, factor=1.0)
    scaled = chunked.chunk_ds_torch(x.clone(), None, 1.0, 0.0, None, g, r, **none,
                                    out_dtype=torch.float16, factor=4096.0)
    want = 0.5 / (m * n)
    assert abs(plain.double().mean().item() - want) / want > 0.05  # unscaled: subnormal, lossy
    assert abs(scaled.double().mean().item() / 4096.0 - want) / want < 1e-3


# ---- work: 4 products without distillation, 6 with (FlopCounterMode over the public op) ------
@pytest.mark.parametrize("backend", ["chunked", "cpu"])
@pytest.mark.parametrize("distill", [False, True])
@pytest.mark.parametrize("b,d,chunk", [(37, 8, 5), (64, 16, None), (130, 3, 128)])
def test_work_is_four_units_or_six_with_distillation(b, d, chunk, distill, backend):
    """The chunked kernel and the C++ kernel (whose tile products run on the calling thread at
    these sizes, where FlopCounterMode sees them)."""
    testing.count_flops_through_custom_ops()
    inputs, kwargs = make_inputs(b, d, dtype=torch.float32, distill=distill, dt=d, bias=True,
                                 labels=True)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    with FlopCounterMode(display=False) as counter:
        loss = contrastive_loss(**leaves, **kwargs, backend=backend, chunk_rows=chunk)
        loss.backward()
    unit = 2 * b * b * d
    assert counter.get_total_flops() == (6 if distill else 4) * unit, counter.get_flop_counts()


@pytest.mark.parametrize("with_cols", [True, False])
@pytest.mark.parametrize("teacher", [False, True])
def test_reference_backward_formula_equals_autograd_of_the_reference(teacher, with_cols):
    """reference.contrastive_stats_backward_reference (the "reference" kernel's backward, an
    explicit formula) against autograd through the forward reference (the tests' ground truth)."""
    from calrft_kernels.reference import contrastive_stats_grads_reference
    gen = torch.Generator().manual_seed(4)
    m, n, d = 13, 11, 5
    q, k = (torch.randn(x, d, generator=gen, dtype=torch.float64) for x in (m, n))
    scale, bias = torch.tensor(3.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    t = ([torch.randn(m, 4, generator=gen, dtype=torch.float64),
          torch.randn(n, 4, generator=gen, dtype=torch.float64),
          torch.tensor(2.0, dtype=torch.float64)] if teacher else [None, None, None])
    r = 3 if teacher else 1
    g = torch.randn(r, m, generator=gen, dtype=torch.float64)
    h = torch.randn(r, n if with_cols else 0, generator=gen, dtype=torch.float64)
    dq_u, dk_u = contrastive_stats_backward_reference(g, h, q, k, scale, bias, *t,
                                                      with_cols=with_cols)
    dq, dk, _, _ = contrastive_stats_grads_reference(q, k, scale, bias, *t, grad_row=g,
                                                     grad_col=h, with_cols=with_cols)
    torch.testing.assert_close(dq_u * scale, dq, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dk_u * scale, dk, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_addmm_acc_accumulates_in_fp32(dtype):
    """dK's accumulation: c + a @ b with an fp32 accumulator, in place for fp32 operands and
    through the half-operand path (its CPU fallback here; the CUDA overload is probed for
    correctness before use) for 16-bit operands."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(9, 5, generator=g).to(dtype)
    b = torch.randn(5, 7, generator=g).to(dtype)
    c = torch.randn(9, 7, generator=g)
    want = c + a.float() @ b.float()
    got = chunked.addmm_acc(c.clone(), a, b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
