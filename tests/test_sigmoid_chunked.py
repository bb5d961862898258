"""The sigmoid family's chunked kernel (calrft_kernels/sigmoid_chunked.py): its fused Triton pass
(interpreted, CPU tensors) against the plain-torch pass and both against the float64 reference
kernel, fp32 and fp16 operands, chunks that do not divide the batch, local rows of a process
group (offset, labels), a teacher with and without a bias, the no-gradient path, extreme
logits; the fp16 pre-scale; the sizing and GEMM seams it shares with the softmax family's
chunked kernel. The public op with backend="chunked" is in tests/test_sigmoid_loss.py (every
option, float64 against the reference, gradcheck, gloo ranks), its CUDA branch in
tests/test_fake_cuda.py, its sm_90 compile in tests/test_triton_aot.py."""
import pytest
import torch

from calrft_kernels import chunked, sigmoid_chunked, sigmoid_loss
from calrft_kernels.reference import sigmoid_pairs_kernel
from calrft_kernels.triton import sigmoid_chunked as tsc

CHUNKS = [(1, 1), (17, 45), (33, 130), (64, 31)]


def _chunk_inputs(c, n, teacher, labels, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(c, n, generator=gen)
    t = torch.randn(c, n, generator=gen) if teacher else None
    lab = ((torch.randint(0, 4, (c,), generator=gen), torch.randint(0, 4, (n,), generator=gen))
           if labels else (None, None))
    scalars = (torch.tensor(7.5), torch.tensor(-4.25),
               torch.tensor(3.0) if teacher else None, torch.tensor(-1.5) if teacher else None)
    return x, t, scalars, lab


@pytest.mark.parametrize("g_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_grads", [True, False])
@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("teacher", [False, True])
@pytest.mark.parametrize("c,n", CHUNKS)
def test_triton_pass_matches_the_torch_pass(c, n, teacher, labels, with_grads, g_dtype):
    """One chunk: G (written in the operands' dtype, times the factor) and the four sums. The
    positives of an unlabelled chunk sit at column row0 + row (row0 = 5: off the diagonal)."""
    x, t, scalars, lab = _chunk_inputs(c, n, teacher, labels, seed=c + n)
    factor = 1024.0 if g_dtype == torch.float16 else 1.0
    args = (*scalars, *lab, 5, 0.75, g_dtype, factor, with_grads)
    got_g, got = tsc.chunk_pairs(x.clone(), None if t is None else t.clone(), *args)
    want_g, want = sigmoid_chunked.chunk_pairs_torch(x.clone(), t, *args)
    assert got.dtype == want.dtype == torch.float64 and got.shape == (4,)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-5)
    if not with_grads:
        assert got_g is None and want_g is None and got[3] == 0
        return
    assert got_g.dtype == want_g.dtype == g_dtype and got_g.shape == (c, n)
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[g_dtype]
    torch.testing.assert_close(got_g.float(), want_g.float(), rtol=tol, atol=tol * factor)


def test_triton_pass_writes_fp32_g_over_the_buffer():
    x, _, scalars, lab = _chunk_inputs(20, 40, False, False)
    buf = x.clone()
    g, _ = tsc.chunk_pairs(buf, None, *scalars, *lab, 0, 0.0, torch.float32)
    assert g is buf                                  # no second [C, N] buffer for fp32
    want, _ = sigmoid_chunked.chunk_pairs_torch(x, None, *scalars, *lab, 0, 0.0, torch.float32)
    torch.testing.assert_close(g, want, rtol=1e-6, atol=1e-7)


def _kernel_args(m, n, d, dtype, teacher, labels, offset=0, tbias=True, seed=3):
    gen = torch.Generator().manual_seed(seed)
    unit = lambda rows, width: torch.nn.functional.normalize(  # noqa: E731
        torch.randn(rows, width, generator=gen), dim=1).to(dtype)
    q, k = unit(m, d), unit(n, d)
    lab = ((torch.randint(0, 5, (m,), generator=gen), torch.randint(0, 5, (n,), generator=gen))
           if labels else (None, None))
    teach = ((unit(m, 6), unit(n, 6), torch.tensor(9.0), torch.tensor(-6.0) if tbias else None)
             if teacher else (None,) * 4)
    return (q, k, torch.tensor(10.0), torch.tensor(-10.0), *lab, offset, *teach,
            1.5 if teacher else 0.0)


def _as64(args):
    return tuple(a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("teacher,labels,offset,tbias", [
    (False, False, 0, True), (False, False, 70, True), (False, True, 0, True),
    (True, False, 20, True), (True, True, 0, False)])
def test_kernel_matches_the_float64_reference_kernel(dtype, teacher, labels, offset, tbias,
                                                     fused):
    """The whole chunked kernel, Triton pass forced on (as on a GPU) or the torch pass, chunks of
    16 rows that do not divide M = 45, against the float64 reference kernel on the same rounded
    inputs. offset > 0 with M < N is a rank's local rows against the gathered columns. fp16
    operands (a CPU caller upcasts them; here they reach the kernel as on a GPU) round G to
    fp16 with the pre-scale."""
    args = _kernel_args(45, 130, 24, dtype, teacher, labels, offset, tbias)
    parts, dq, dk = sigmoid_chunked.pairs_forward(*args, True, 16, fused=fused)
    want_parts, want_dq, want_dk = sigmoid_pairs_kernel(*_as64(args), True)
    assert parts.dtype == dq.dtype == dk.dtype == torch.float32
    torch.testing.assert_close(parts.double(), want_parts, rtol=1e-5, atol=1e-4)
    tol = 2e-6 if dtype == torch.float32 else 2e-3   # fp16 G rounding
    for got, want in ((dq, want_dq), (dk, want_dk)):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=tol * float(want.abs().max()))


@pytest.mark.parametrize("fused", [True, False])
def test_no_gradients_runs_the_forward_product_and_the_pass_only(fused, monkeypatch):
    args = _kernel_args(40, 50, 8, torch.float32, True, True)
    calls = []
    monkeypatch.setattr(chunked, "gradient_gemms", lambda *a: calls.append(a))
    parts, dq, dk = sigmoid_chunked.pairs_forward(*args, False, 16, fused=fused)
    assert calls == [] and dq.shape == dk.shape == (0, 8)
    want, _, _ = sigmoid_pairs_kernel(*_as64(args), False)
    torch.testing.assert_close(parts.double(), want, rtol=1e-5, atol=1e-4)
    assert parts[4] == 0


@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (100.0, -20.0)])
def test_extreme_logits_keep_every_term_accurate(scale, bias):
    """SigLIP's start (each negative term ~4.5e-5, together the loss) and scale 100 / bias -20
    with aligned and anti-aligned pairs (S from -120 to +80): the Triton pass's sums match
    float64 to fp32 rounding, and nothing overflows."""
    q, k = (torch.nn.functional.normalize(torch.randn(70, 16, generator=torch.Generator()
                                                      .manual_seed(s)), dim=1) for s in (5, 6))
    k[:10] = -q[:10]
    k[10:20] = q[10:20]
    args = (q, k, torch.tensor(scale), torch.tensor(bias), None, None, 0, None, None, None,
            None, 0.0)
    parts, dq, dk = sigmoid_chunked.pairs_forward(*args, True, 32, fused=True)
    want, want_dq, _ = sigmoid_pairs_kernel(*_as64(args), True)
    assert torch.isfinite(parts).all() and torch.isfinite(dq).all() and torch.isfinite(dk).all()
    torch.testing.assert_close(parts.double(), want, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(dq.double(), want_dq, rtol=1e-5, atol=1e-6)


def test_fp16_prescale_keeps_g_normal_and_finite():
    """fp16 G: |G| < 1 + w, so G x 2^15 / 2^ceil(log2(1 + w)) stays below fp16's largest value,
    while SigLIP's ~4.5e-5 negatives (subnormal in fp16) become normal numbers."""
    assert chunked.fp16_factor(torch.float16, 8, 8, bound=1.0) == 2.0 ** 15
    assert chunked.fp16_factor(torch.float16, 8, 8, bound=2.5) == 2.0 ** 13
    assert chunked.fp16_factor(torch.bfloat16, 8, 8, bound=1.0) == 1.0
    x = torch.full((4, 6), 0.0)
    x[0, 0] = 1e4                                     # a positive with sigmoid(-S) ~ 0
    x[1, 1] = -1e4                                    # a positive with G = -1
    args = (torch.tensor(1.0), torch.tensor(-10.0), None, None, None, None, 0, 0.0,
            torch.float16)
    plain, _ = sigmoid_chunked.chunk_pairs_torch(x, None, *args, 1.0)
    factor = chunked.fp16_factor(torch.float16, 4, 6, bound=1.0)
    scaled, _ = tsc.chunk_pairs(x.clone(), None, *args, factor)
    assert torch.isfinite(scaled).all() and scaled.float().abs().max() <= factor
    want = torch.sigmoid(torch.tensor(-10.0, dtype=torch.float64))     # a negative's G
    assert abs(plain[0, 1].double() - want) / want > 1e-4             # subnormal: lossy
    assert abs(scaled[0, 1].double() / factor - want) / want < 1e-3   # pre-scaled: normal


def test_chunks_follow_the_shared_sizing_seam(monkeypatch):
    """The chunk size is chunked.chunk_rows_for (with the teacher's second buffer counted), the
    module budget is what the public op uses, and the two gradient GEMMs per chunk are the
    softmax family's helper (chunked.gradient_gemms)."""
    shapes, gemms = [], []
    mm_acc, gradient_gemms = chunked.mm_acc, chunked.gradient_gemms
    monkeypatch.setattr(chunked, "mm_acc", lambda a, b: shapes.append(a.shape[0]) or mm_acc(a, b))
    monkeypatch.setattr(chunked, "gradient_gemms",
                        lambda g, *a: gemms.append(g.shape) or gradient_gemms(g, *a))
    monkeypatch.setattr(chunked, "MAX_BUFFER_BYTES", 4 * 2 * 30 * 7)  # 7 rows of two buffers
    assert chunked.chunk_rows_for(30, 30, torch.float32, True) == 7
    args = _kernel_args(30, 30, 8, torch.float32, True, False)
    x, y = (a.clone().requires_grad_() for a in args[:2])
    loss = sigmoid_loss(x, y, args[2], args[3], teacher_image_features=args[7],
                        teacher_text_features=args[8], teacher_logit_scale=args[9],
                        teacher_logit_bias=args[10], distill_weight=args[11], backend="chunked")
    loss.backward()
    assert shapes == [7, 7] * 4 + [2, 2]             # X and T per chunk of 7 rows
    assert [s[0] for s in gemms] == [7] * 4 + [2]
    want = sigmoid_loss(*(a.detach() for a in (x, y)), args[2], args[3],
                        teacher_image_features=args[7], teacher_text_features=args[8],
                        teacher_logit_scale=args[9], teacher_logit_bias=args[10],
                        distill_weight=args[11], backend="reference")
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
