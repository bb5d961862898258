"""The package's CUDA-only Python, executed before a GPU runs it (issue 26).

Every public op's CUDA branch runs here on fake CUDA tensors (calrft_kernels/testing/
fake_cuda.py): the custom ops run their implementations, every Triton launch is checked against
its kernel's launch contract (calrft_kernels/triton/launch_contract.py), the CUDA entry points of
calrft_kernels._C are doubles that check their C++ contract, the device probes are injected
(each both ways), and backward runs every backward formula without the autograd engine (which
refuses fake CUDA tensors). The sizes are the production ones where it matters (B = 65536,
d = 768): fake tensors hold no values, so they cost nothing.

What this cannot reach: values (every numeric check of the CUDA paths is in the interpreter
tests and benchmarks/gpu_suite.py), Triton kernel bodies and native CUDA code.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import pytest
import torch

import calrft_kernels as ck
from calrft_kernels import chunked, contrastive, covariance, eigen
from calrft_kernels.testing import fake_cuda
from calrft_kernels.testing.fake_cuda import FakeCuda
from calrft_kernels.triton import contrastive as tc
from calrft_kernels.triton import covariance as tcov
from calrft_kernels.triton.launch_contract import (ContractError, kernel_parameters,
                                                   python_function)

HALF = (torch.float16, torch.bfloat16)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BIG_B, BIG_D = 65536, 768


@contextlib.contextmanager
def _allow_tf32(value: bool):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = value
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _pair(fc, b, d, dtype, grad=True):
    return (fc.tensor(b, d, dtype=dtype, requires_grad=grad),
            fc.tensor(b, d, dtype=dtype, requires_grad=grad))


def _teacher_kwargs(fc, b, dt, dtype):
    return dict(teacher_image_features=fc.tensor(b, dt, dtype=dtype),
                teacher_text_features=fc.tensor(b, dt, dtype=dtype),
                teacher_logit_scale=torch.tensor(20.0, device="cuda"), distill_weight=0.5)


# ---- the harness itself ---------------------------------------------------------------------

def test_fake_cuda_tensors_take_cuda_only_overloads():
    with FakeCuda() as fc:
        a = fc.tensor(64, 32, dtype=torch.bfloat16)
        assert a.device.type == "cuda"
        # the half GEMM with an fp32 result has no CPU kernel: here it runs its meta function
        assert torch.mm(a, a.T, out_dtype=torch.float32).dtype == torch.float32
    assert torch.randn(2).device.type == "cpu"


def test_every_kernel_of_the_package_has_a_launch_contract_naming_its_parameters():
    import importlib
    import pkgutil

    import calrft_kernels.triton as triton_package
    from calrft_kernels.triton import contrastive_chunked as tcc
    from calrft_kernels.triton import sigmoid_chunked as tsc
    modules = {tc: tc.KERNELS.values(), tcc: tcc.KERNELS.values(),
               tcov: [tcov._column_sum_kernel, tcov._centred_gram_kernel],
               tsc: tsc.KERNELS.values()}
    assert {m.__name__ for m in modules} == set(fake_cuda.KERNEL_MODULES)
    # every module of calrft_kernels.triton that defines a Triton function is listed
    for info in pkgutil.iter_modules(triton_package.__path__):
        module = importlib.import_module(f"calrft_kernels.triton.{info.name}")
        jitted = [v for v in vars(module).values() if hasattr(v, "fn") and
                  getattr(python_function(v), "__module__", None) == module.__name__]
        assert bool(jitted) == (module.__name__ in fake_cuda.KERNEL_MODULES), module.__name__
    for module, kernels in modules.items():
        names = {python_function(k).__name__ for k in kernels}
        assert names == set(module.LAUNCHES), module.__name__
        for kernel in kernels:
            _, contract = fake_cuda.launch_contract_of(kernel)
            assert contract.names() == set(kernel_parameters(kernel))


def test_every_cuda_entry_point_of_the_extension_has_a_double():
    assert set(fake_cuda.cuda_entry_points()) == set(fake_cuda.CUDA_CONTRACTS)


def test_the_suite_checks_interpreted_launches_against_the_same_contracts(_launch_contracts):
    """conftest's autouse fixture: a launch whose numbers the interpreter tests verify is checked
    first; a launch that breaks the contract fails before it runs."""
    from calrft_kernels.triton import contrastive_chunked as tcc
    x = torch.randn(20, 40)
    one = torch.tensor(1.0)
    rows, cols = tcc.chunk_stats(x.clone(), None, one, one * 0, None, True)
    assert _launch_contracts[-1].name == "_chunk_stats_kernel"
    assert rows.shape == (2, 20) and cols.shape == (2, 40)
    with pytest.raises(ContractError, match="x_ptr has dtype torch.float64"):
        tcc.chunk_stats(x.double(), None, one, one * 0, None, True)
    with pytest.raises(ContractError, match="must be row-major contiguous"):
        tcc.chunk_stats(torch.randn(40, 20).T, None, one, one * 0, None, True)


def test_check_launch_names_what_it_refuses():
    import triton
    from calrft_kernels.triton.launch_contract import Launch, Ptr, check_launch, power_of_two
    contract = Launch(grid=lambda a: (triton.cdiv(a.N, a.BLOCK),), ints=("N",),
                      constexprs={"BLOCK": power_of_two},
                      pointers={"x_ptr": Ptr(lambda a: (a.N,))})
    params = ["x_ptr", "N", "BLOCK"]
    x = torch.empty(40)

    def launch(grid=(3,), args=(x, 40), kwargs=None, params=params):
        return check_launch("k", contract, params, grid, args, kwargs or {"BLOCK": 16},
                            device_type="cpu")
    assert launch().N == 40
    for call, match in [(lambda: launch(grid=(2,)), r"grid \(2,\) but the arguments need \(3,\)"),
                        (lambda: launch(args=(x, 40.0)), "N must be a Python int"),
                        (lambda: launch(kwargs={"BLOCK": 12}), "constexpr BLOCK=12"),
                        (lambda: launch(args=(x,)), r"missing arguments \['N'\]"),
                        (lambda: launch(kwargs={"BLOCK": 16, "M": 1}), "unknown argument 'M'"),
                        (lambda: launch(args=(x[:39], 40)), r"x_ptr has shape \(39,\)"),
                        (lambda: launch(args=(x.double(), 40)), "x_ptr has dtype"),
                        (lambda: launch(params=params + ["y_ptr"]), "disagree")]:
        with pytest.raises(ContractError, match=match):
            call()


def test_the_block_restores_everything():
    from triton.runtime.jit import KernelInterface
    before = (_backend_native(), torch.Tensor.backward, torch.autograd.backward,
              KernelInterface.__getitem__, torch.cuda.get_rng_state,
              dict(chunked._OUT_DTYPE_OK), os.environ.get("TRITON_INTERPRET"))
    with pytest.raises(RuntimeError, match="inside"):
        with FakeCuda() as fc:
            assert _backend_native()[0].with_cuda
            raise RuntimeError("raised inside the block")
    after = (_backend_native(), torch.Tensor.backward, torch.autograd.backward,
             KernelInterface.__getitem__, torch.cuda.get_rng_state,
             dict(chunked._OUT_DTYPE_OK), os.environ.get("TRITON_INTERPRET"))
    assert before == after and fc.mode is not None
    assert torch.empty(2).device.type == "cpu"


def _backend_native():
    from calrft_kernels import _backend
    return _backend.native()


@pytest.mark.parametrize("answer", [True, False])
def test_gemm_probes_run_on_fake_cuda_and_their_answers_are_injected(answer):
    """The probes' own code on CUDA tensors (bf16 operands, the out_dtype overloads), then each
    GEMM helper's branch for both answers of each probe."""
    with FakeCuda(host_answer=lambda t: answer if t.dtype == torch.bool else 1.0) as fc:
        dev = torch.device("cuda:0")
        chunked._OUT_DTYPE_OK.clear()
        chunked._ADDMM_OUT_DTYPE_OK.clear()
        assert chunked._out_dtype_supported(dev) is True          # the overload exists
        assert chunked._addmm_out_dtype_correct(dev) is answer    # its value check is a read
        assert fc.syncs("chunked.py")
    for mm_ok in (True, False):
        for addmm_ok in (True, False):
            with FakeCuda(mm_out_dtype=mm_ok, addmm_out_dtype=addmm_ok) as fc:
                a, b = (fc.tensor(128, 64, dtype=torch.bfloat16) for _ in range(2))
                acc = fc.tensor(64, 64)
                assert chunked.mm_acc(a, b.T).dtype == torch.float32
                assert chunked.addmm_acc(acc, a.T, b).dtype == torch.float32
                assert (fc.ops["aten.mm.dtype"] > 0) == mm_ok
                assert (fc.ops["aten.addmm.dtype"] > 0) == addmm_ok


def test_backward_without_the_engine_matches_the_engine_on_real_tensors():
    """fake_cuda.backward on ordinary CPU tensors gives the engine's gradients (broadcasts
    reduced, dtypes cast, Python Functions' nodes, several roots)."""
    torch.manual_seed(1)
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(7, 5, dtype=torch.float64)
    y = torch.randn(7, 5, dtype=torch.float64)

    def losses():
        h = torch.tanh(x @ w + b).float()
        c = ck.contrastive_loss(h.double(), (y @ w).double(), 3.0)
        return [c, (h ** 2).sum()]

    want = torch.autograd.grad(sum(losses()), (w, b))
    fake_cuda.backward(losses(), [torch.ones(()), torch.ones(())])
    for g, ref in zip((w.grad, b.grad), want):
        assert torch.allclose(g, ref, rtol=1e-6, atol=1e-8)


# ---- contrastive_loss: every backend's CUDA branch, forward and backward ---------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("teacher", [False, True])
@pytest.mark.parametrize("labels", [False, True])
def test_contrastive_chunked_default_on_cuda(dtype, teacher, labels):
    b, d = BIG_B, BIG_D
    with FakeCuda() as fc:
        x, y = _pair(fc, b, d, dtype)
        scale = torch.tensor(100.0, device="cuda", requires_grad=True)
        kw = _teacher_kwargs(fc, b, 512, dtype) if teacher else {}
        if labels:
            kw["labels"] = torch.zeros(b, dtype=torch.int64, device="cuda")
        loss = ck.contrastive_loss(x, y, scale, **kw)         # backend "auto": chunked on CUDA
        assert loss.dtype == dtype and loss.shape == ()
        forward = list(fc.launches)
        loss.backward()
        assert x.grad.dtype == y.grad.dtype == dtype and x.grad.shape == (b, d)
        assert scale.grad.dtype == torch.float32
        c = chunked.chunk_rows_for(b, b, dtype, teacher)
        n_chunks = -(-b // c)
        stats = [r for r in forward if r.name == "_chunk_stats_kernel"]
        assert len(stats) == len(forward) == n_chunks
        ds = fc.launched("_chunk_ds_kernel")
        assert len(ds) == n_chunks
        for r in stats + ds:
            assert r.args.x_ptr.shape[1] == b and r.args.HAS_TEACHER is teacher
            assert r.args.WITH_COLS is True                  # one process: both directions
        # the dtype policy on the GPU: operands stay 16-bit (no fp32 copies of the features),
        # products accumulate in fp32, and dS is written in the operands' dtype
        assert all(r.args.ds_ptr.dtype == dtype for r in ds)
        assert (fc.ops["aten.mm.dtype"] > 0) == (dtype in HALF)
        if dtype == torch.float16:
            assert all(r.args.factor == float(2 ** 16) for r in ds)   # pre-scaled fp16 dS
        # no host read of a GPU value but the one batched finiteness check of the scalars
        assert [r.site.split(" in ")[1] for r in fc.syncs()] == ["check_tensor_scalars_finite"]


def test_contrastive_under_device_checks_false_never_synchronises():
    with FakeCuda() as fc:
        x, y = _pair(fc, 4096, 512, torch.bfloat16)
        with ck.device_checks(False):
            loss = ck.contrastive_loss(x, y, torch.tensor(50.0, device="cuda"),
                                       **_teacher_kwargs(fc, 4096, 256, torch.bfloat16))
        loss.backward()
        assert fc.syncs() == []


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("teacher", [False, True])
def test_contrastive_process_group_uses_row_statistics_only(dtype, teacher):
    """Each rank's rows against the gathered batch: two statistics calls without columns, the
    gathers on the features' CUDA device, gradients of the local rows."""
    b, d = 2048, 256
    with FakeCuda() as fc:
        group = fc.process_group(rank=1, world=4)
        x, y = _pair(fc, b, d, dtype)
        kw = _teacher_kwargs(fc, b, 128, dtype) if teacher else {}
        loss = ck.contrastive_loss(x, y, torch.tensor(10.0, device="cuda"), process_group=group,
                                   chunk_rows=1000, **kw)
        loss.backward()
        assert x.grad.shape == (b, d) and x.grad.dtype == dtype
        stats = fc.launched("_chunk_stats_kernel")
        assert stats and all(r.args.WITH_COLS is False for r in stats)
        assert {tuple(r.args.x_ptr.shape) for r in stats} == {(1000, 4 * b), (48, 4 * b)}
        assert all(r.args.WITH_COLS is False for r in fc.launched("_chunk_ds_kernel"))
        gathers = [c for c in fc.collectives if c[0] == "all_gather"]
        assert len(gathers) == (4 if teacher else 2)     # image, text (+ the teacher's two)
        assert ("all_reduce", (4 * b, d), dtype, "cuda:0") in fc.collectives


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("teacher", [False, True])
@pytest.mark.parametrize("tf32", [False, True])
def test_contrastive_fused_triton_on_cuda(dtype, teacher, tf32):
    """backend="triton": every autotuning configuration of both kernels is checked; operands are
    read in their own dtype on the GPU (the interpreter's bf16 upcast does not apply)."""
    b, d = BIG_B, BIG_D
    with FakeCuda() as fc, _allow_tf32(tf32):
        x, y = _pair(fc, b, d, dtype)
        kw = _teacher_kwargs(fc, b, 512, dtype) if teacher else {}
        loss = ck.contrastive_loss(x, y, torch.tensor(30.0, device="cuda"), backend="triton",
                                   **kw)
        loss.backward()
        assert loss.dtype == dtype and x.grad.dtype == dtype
        fwd, bwd = fc.launched("_stats_fwd_kernel"), fc.launched("_stats_bwd_kernel")
        assert len(fwd) == len(tc.FORWARD_CONFIGS) and len(bwd) == len(tc.BACKWARD_CONFIGS)
        for r in fwd + bwd:
            assert r.args.q_ptr.dtype == dtype and r.args.HAS_TEACHER is teacher
            want = "tf32" if (dtype == torch.float32 and tf32) else "ieee"
            assert r.args.INPUT_PRECISION == want
            assert r.args.M_BUCKET == r.args.N_BUCKET == BIG_B
        if teacher:
            assert all(r.args.col_lock_ptr.dtype == torch.int32 for r in fwd)
        else:
            assert all(r.args.col_packed_ptr.dtype == torch.int64 for r in fwd)


def test_contrastive_backends_that_do_not_exist_on_cuda_say_so():
    with FakeCuda():
        x, y = (torch.empty(8, 4, device="cuda") for _ in range(2))
        with pytest.raises(ValueError, match="no CUDA C\\+\\+ kernel"):
            ck.contrastive_loss(x, y, 10.0, backend="cuda")
        with pytest.raises(ValueError, match="C\\+\\+ CPU kernels need CPU tensors"):
            ck.contrastive_loss(x, y, 10.0, backend="cpu")
        with pytest.raises(TypeError, match="float32 at most"):
            ck.contrastive_loss(x.double(), y.double(), 10.0, backend="triton")


def test_statistics_op_backward_formula_runs_on_cuda():
    """The registered autograd of calrft::contrastive_stats (dscale by one dot product, in-place
    scaling of dq_u / dk_u) with CUDA bf16 operands, called through the op."""
    with FakeCuda() as fc:
        q, k = _pair(fc, 300, 64, torch.bfloat16)
        scale = torch.tensor(10.0, device="cuda", requires_grad=True)
        bias = torch.tensor(-1.0, device="cuda", requires_grad=True)
        rows, cols = contrastive.contrastive_stats(q, k, scale, bias, None, None, None, True,
                                                   "chunked", 128)
        assert rows.dtype == cols.dtype == torch.float32 and rows.shape == (1, 300)
        (rows.sum() + cols.sum()).backward()
        assert q.grad.dtype == torch.bfloat16 and scale.grad.shape == () and bias.grad.shape == ()
        assert len(fc.launched("_chunk_stats_kernel")) == 3         # 300 rows in chunks of 128


def test_clip_loss_and_carot_loss_on_cuda():
    with FakeCuda() as fc:
        x, y = _pair(fc, 1024, 128, torch.bfloat16)
        scale = torch.tensor(20.0, device="cuda", requires_grad=True)
        loss = ck.ClipLoss()(x, y, scale)
        loss.backward()
        assert x.grad.dtype == torch.bfloat16 and scale.grad is not None
        n = len(fc.launches)
        proj = torch.empty(96, 128, device="cuda", requires_grad=True)
        carot = ck.CaRotLoss(distill_weight=0.5, orth_weight=0.1, cross_weight=0.1)
        out = carot(x, y, scale, visual_proj=proj, text_proj=proj,
                    **{k: v for k, v in _teacher_kwargs(fc, 1024, 64, torch.bfloat16).items()
                       if k != "distill_weight"}, output_dict=True)
        out["total"].backward()
        assert proj.grad.shape == (96, 128) and len(fc.launches) > n


# ---- covariance, sigma_min and the eigen-solver dispatch ------------------------------------

@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,))
@pytest.mark.parametrize("mm_out_dtype", [True, False])
def test_batch_covariance_cublas_path_on_cuda(dtype, mm_out_dtype):
    """"auto" on CUDA is the centred cuBLAS product: 16-bit z is centred in its own dtype and
    multiplied with an fp32 result (no fp32 copy of z) where torch has the overload."""
    with FakeCuda() as fc:
        z = fc.tensor(BIG_B, BIG_D, dtype=dtype, requires_grad=True)
        if not mm_out_dtype:   # a torch without mm(out_dtype=): the fallback copies to fp32
            real_mm = torch.mm

            def mm(*args, out_dtype=None, **kwargs):
                if out_dtype is not None:
                    raise TypeError("mm() got an unexpected keyword argument 'out_dtype'")
                return real_mm(*args, **kwargs)
            fc.patch(torch, "mm", mm)
        cov = ck.batch_covariance(z)
        cov.sum().backward()
        assert cov.dtype == dtype and cov.shape == (BIG_D, BIG_D) and fc.launches == []
        assert z.grad.dtype == dtype
        assert (fc.ops["aten.mm.dtype"] > 0) == (dtype in HALF and mm_out_dtype)


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,))
def test_batch_covariance_triton_on_cuda(dtype):
    """backend="triton": the split-K grid sized from the device's SMs, every configuration of the
    operand kind, 16-bit operands on the tensor cores, fp32 as tf32x3."""
    with FakeCuda() as fc:
        z = fc.tensor(BIG_B, BIG_D, dtype=dtype)
        cov = ck.batch_covariance(z, backend="triton")
        assert cov.dtype == dtype
        (col_sum,) = fc.launched("_column_sum_kernel")
        assert col_sum.grid[1] > 1                        # row chunks for 2 x 132 programs
        gram = fc.launched("_centred_gram_kernel")
        assert len(gram) == len(tcov.GRAM_CONFIGS[tcov.config_kind(dtype)])
        want = {torch.float64: ("fp64", "ieee"), torch.float32: ("fp32", "tf32x3"),
                torch.float16: ("fp16", "ieee"), torch.bfloat16: ("bf16", "ieee")}[dtype]
        for r in gram:
            assert (str(r.args.OPERAND), r.args.PRECISION) == want
            assert r.grid[1] > 1 and r.args.out_ptr.shape[0] == r.grid[1]


def test_covariance_sigma_min_on_cuda_drives_the_cuda_solver():
    with FakeCuda() as fc:
        z = fc.tensor(4096, 256, requires_grad=True)
        sigma = ck.covariance_sigma_min(z)
        sigma.backward()
        assert sigma.dtype == torch.float32 and z.grad.shape == (4096, 256)
        (call,) = fc.native_calls["smallest_eig_cuda"]
        matrix, v0, factor, delta, nev, tol, max_iter = call
        assert matrix.dtype == torch.float64 and matrix.shape == (256, 256)
        assert matrix.device.type == "cuda" and v0.numel() == 0 and factor.numel() == 0
        assert nev == 1 and max_iter == eigen.DEFAULT_MAX_ITER


def test_smallest_eigenvalue_warm_start_passes_vector_and_factor_on_the_device():
    with FakeCuda() as fc:
        a = fc.tensor(200, 200)
        value, vector, info = ck.smallest_eigenvalue(a, return_info=True)
        assert value.dtype == torch.float32 and vector.shape == (200,)
        ck.smallest_eigenvalue(a, v0=vector, factor=info)
        ck.smallest_eigenvalue(a.double(), v0=vector, factor=info.factor)   # bare factor
        first, warm, bare = fc.native_calls["smallest_eig_cuda"]
        for _, v0, factor, *_ in (warm, bare):
            assert v0.dtype == torch.float64 and v0.device.type == "cuda"
            assert factor.dtype == torch.float32 and factor.shape == (200, 200)


@pytest.mark.parametrize("method", ["auto", "davidson", "lanczos", "eigh"])
@pytest.mark.parametrize("native_cuda", [True, False])
def test_eigen_dispatch_on_cuda(method, native_cuda):
    """Which solver runs on CUDA: the CUDA Davidson where the extension has it (auto,
    davidson), else dense eigh; lanczos is plain PyTorch (its Cholesky on the device)."""
    with FakeCuda(native_cuda=native_cuda) as fc, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ck.smallest_eigenvalue(fc.tensor(100, 100, dtype=torch.float64), method=method)
        calls = len(fc.native_calls.get("smallest_eig_cuda", []))
        davidson = method in ("auto", "davidson") and native_cuda
        assert calls == (1 if davidson else 0)
        if method != "lanczos":      # (lanczos falls back to eigh on its injected iterates)
            assert (fc.ops["aten.linalg_eigh.default"] > 0) == (not davidson)
        else:
            assert fc.ops["aten.linalg_cholesky_ex.default"] > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_singular_value_orthogonality_and_accumulator_on_cuda(dtype):
    """smallest_singular_value (its Gram matrix on the device, the CUDA solver), the
    orthogonality loss with and without its device checks, the streaming covariance on a CUDA
    device (fp64 accumulation there is plain PyTorch; merges without the C++ kernel)."""
    with FakeCuda() as fc:
        w = fc.tensor(768, 512, dtype=dtype, requires_grad=True)
        ck.smallest_singular_value(w).backward()
        assert w.grad.dtype == dtype and len(fc.native_calls["smallest_eig_cuda"]) == 1
        ck.orthogonality_loss(w).backward()
        n = len(fc.syncs())
        with ck.device_checks(False):
            ck.orthogonality_loss(w).backward()
        assert len(fc.syncs()) == n          # no synchronisation inside device_checks(False)
        acc = ck.CovarianceAccumulator(64, device="cuda")
        acc.update(fc.tensor(300, 64, dtype=dtype)).update(fc.tensor(200, 64, dtype=dtype))
        other = ck.CovarianceAccumulator(64, device="cuda").update(fc.tensor(50, 64, dtype=dtype))
        cov = acc.merge(other).covariance()
        assert cov.dtype == torch.float64 and cov.device.type == "cuda" and acc.count == 550


def test_the_native_double_refuses_what_the_cuda_solver_would():
    with FakeCuda():
        double = fake_cuda.NativeCudaDouble("smallest_eig_cuda",
                                            fake_cuda.CUDA_CONTRACTS["smallest_eig_cuda"])
        a = torch.empty(64, 64, dtype=torch.float64, device="cuda")
        empty = a.new_empty(0)
        double(a, empty, empty, 0.0, 1, 1e-6, 100)
        with pytest.raises(TypeError, match="max_iter needs a int"):
            double(a, empty, empty, 0.0, 1, 1e-6, 100.0)
        with pytest.raises(TypeError, match="fp64"):
            double(a.float(), empty, empty, 0.0, 1, 1e-6, 100)
        with pytest.raises(TypeError, match="factor is on cpu"):
            double(a, empty, torch.empty(64, 64), 0.0, 1, 1e-6, 100)
        with pytest.raises(RuntimeError, match="v0 must be empty or hold 64"):
            double(a, a.new_empty(63), empty, 0.0, 1, 1e-6, 100)


# ---- sigmoid_loss: the chunked kernel's CUDA branch, forward and backward --------------------

def _sigmoid_kwargs(fc, b, dtype, teacher, labels):
    kw = {}
    if teacher:
        kw = _teacher_kwargs(fc, b, 512, dtype)
        kw["teacher_logit_bias"] = torch.tensor(-8.0, device="cuda")
    if labels:
        kw["labels"] = torch.zeros(b, dtype=torch.int64, device="cuda")
    return kw


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("teacher", [False, True])
@pytest.mark.parametrize("labels", [False, True])
def test_sigmoid_chunked_default_on_cuda(dtype, teacher, labels):
    """backend "auto" is the chunked kernel on CUDA: one fused pass per chunk in the forward
    (G formed there), nothing launched by the backward, which only scales dq_u / dk_u."""
    b, d = BIG_B, BIG_D
    with FakeCuda() as fc:
        x, y = _pair(fc, b, d, dtype)
        scale = torch.tensor(10.0, device="cuda", requires_grad=True)
        bias = torch.tensor(-10.0, device="cuda", requires_grad=True)
        loss = ck.sigmoid_loss(x, y, scale, bias, **_sigmoid_kwargs(fc, b, dtype, teacher, labels))
        assert loss.dtype == dtype and loss.shape == ()
        passes = list(fc.launches)
        loss.backward()
        assert len(fc.launches) == len(passes)
        assert x.grad.dtype == y.grad.dtype == dtype and y.grad.shape == (b, d)
        assert scale.grad.dtype == bias.grad.dtype == torch.float32
        c = chunked.chunk_rows_for(b, b, dtype, teacher)
        starts = list(range(0, b, c))
        assert [r.name for r in passes] == ["_sigmoid_chunk_kernel"] * len(starts)
        for r, c0 in zip(passes, starts):
            a = r.args
            assert tuple(a.x_ptr.shape) == (min(c, b - c0), b) and a.row0 == c0
            assert a.HAS_TEACHER is teacher and a.HAS_LABELS is labels and a.WITH_GRADS is True
            # the dtype policy: G in the operands' dtype (16-bit G for 16-bit features), fp16
            # pre-scaled below fp16's range (|G| < 1 + w, w = 0.5 with the teacher)
            assert a.g_ptr.dtype == dtype
            want = (2.0 ** 14 if teacher else 2.0 ** 15) if dtype == torch.float16 else 1.0
            assert a.factor == want
        # half GEMMs with fp32 results: per chunk X (and T), dq_c = G k, dk += G^T q_c
        half = dtype in HALF
        assert fc.ops["aten.mm.dtype"] == (len(starts) * (3 if teacher else 2) if half else 0)
        assert fc.ops["aten.addmm.dtype"] == (len(starts) if half else 0)
        assert [r.site.split(" in ")[1] for r in fc.syncs()] == ["check_tensor_scalars_finite"]


def test_sigmoid_under_no_grad_runs_the_forward_product_and_the_pass_only():
    b, d = BIG_B, BIG_D
    with FakeCuda() as fc, torch.no_grad():
        x, y = _pair(fc, b, d, torch.bfloat16)
        ck.sigmoid_loss(x, y, 10.0, -10.0)
        passes = fc.launched("_sigmoid_chunk_kernel")
        n_chunks = -(-b // chunked.chunk_rows_for(b, b, torch.bfloat16, False))
        assert len(passes) == n_chunks and all(r.args.WITH_GRADS is False for r in passes)
        assert fc.ops["aten.mm.dtype"] == n_chunks and fc.ops["aten.addmm.dtype"] == 0


def test_sigmoid_under_device_checks_false_never_synchronises():
    with FakeCuda() as fc:
        x, y = _pair(fc, 4096, 512, torch.bfloat16)
        with ck.device_checks(False):
            loss = ck.sigmoid_loss(x, y, torch.tensor(10.0, device="cuda"),
                                   torch.tensor(-10.0, device="cuda"),
                                   **_sigmoid_kwargs(fc, 4096, torch.bfloat16, True, True))
        loss.backward()
        assert fc.syncs() == []


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("teacher", [False, True])
@pytest.mark.parametrize("labels", [False, True])
def test_sigmoid_process_group_scores_local_rows_against_gathered_text(dtype, teacher, labels):
    """Rank 1 of 4: its rows against every rank's text rows (row-only by nature), positives at
    the local rows' place in the global batch; only the text side (and the global labels, the
    teacher's text) gathered; the text gradient all-reduced to its ranks."""
    b, d = 2048, 256
    with FakeCuda() as fc:
        group = fc.process_group(rank=1, world=4)
        x, y = _pair(fc, b, d, dtype)
        loss = ck.sigmoid_loss(x, y, torch.tensor(10.0, device="cuda"), process_group=group,
                               chunk_rows=1000, **_sigmoid_kwargs(fc, b, dtype, teacher, labels))
        loss.backward()
        assert x.grad.shape == y.grad.shape == (b, d) and x.grad.dtype == dtype
        passes = fc.launched("_sigmoid_chunk_kernel")
        assert [tuple(r.args.x_ptr.shape) for r in passes] == [(1000, 4 * b), (1000, 4 * b),
                                                                (48, 4 * b)]
        if not labels:
            assert [r.args.row0 for r in passes] == [b, b + 1000, b + 2000]
        else:
            assert all(r.args.qlabels_ptr.shape == (r.args.C,) for r in passes)
            assert all(r.args.klabels_ptr.shape == (4 * b,) for r in passes)
        gathers = [c for c in fc.collectives if c[0] == "all_gather"]
        assert len(gathers) == 1 + labels + teacher        # text (+ labels, teacher text)
        assert ("all_reduce", (4 * b, d), dtype, "cuda:0") in fc.collectives


def test_sigmoid_backends_that_do_not_exist_on_cuda_say_so():
    with FakeCuda():
        x, y = (torch.empty(8, 4, device="cuda") for _ in range(2))
        with pytest.raises(ValueError, match="C\\+\\+ CPU kernels need CPU tensors"):
            ck.sigmoid_loss(x, y, 10.0, backend="cpu")
        with pytest.raises(ValueError, match="no triton kernel"):
            ck.sigmoid_loss(x, y, 10.0, backend="triton")


def test_siglip_loss_and_carot_sigmoid_family_on_cuda():
    b, d = 8192, 512
    with FakeCuda() as fc:
        x, y = _pair(fc, b, d, torch.bfloat16)
        scale = torch.tensor(2.3, device="cuda", requires_grad=True)
        bias = torch.tensor(-10.0, device="cuda", requires_grad=True)
        ck.SigLipLoss()(x, y, scale.exp(), bias).backward()
        assert scale.grad is not None and bias.grad is not None
        assert fc.launched("_sigmoid_chunk_kernel")


# ---- the trainer: whole steps on the device ----------------------------------------------------

@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")  # deepcopy
@pytest.mark.parametrize("precision", ["auto", "fp16"])
@pytest.mark.parametrize("family", ["softmax", "sigmoid"])
def test_trainer_steps_on_fake_cuda(tmp_path, monkeypatch, family, precision):
    """A Trainer on "cuda" with the tiny model (calrft-tiny, or calrft-tiny-sigmoid: its logit
    bias picks the sigmoid family): the model moved to the device, autocast (auto:
    bf16 on CUDA; fp16 with its GradScaler), the feature-cached step (two micro-batches, the CUDA
    RNG state captured and replayed), CaRot with the EMA teacher and the sigma_min term, clipping,
    AdamW, the EMA update: two steps (the second distils). Everything of a step runs; what
    cannot run on fake tensors is what needs values: a checkpoint (torch.save), evaluation's
    accuracies. DDP needs NCCL (tests/test_trainer_distributed.py runs it on gloo)."""
    import _trainer_util as tu
    from calrft import config, models, train
    monkeypatch.setattr(config, "check_device", lambda device: device)   # a (fake) GPU is here
    name = models.TINY if family == "softmax" else models.TINY_SIGMOID
    model, tok = tu.tiny_model(name=name)
    train_set, eval_sets = tu.tiny_data(160)
    cfg = tu.tiny_config(tmp_path, model=name, device="cuda", precision=precision,
                         batch_size=80, micro_batch_size=40, sigma_min_weight=0.1, grad_clip=1.0,
                         steps=4)
    # the scaler's "found inf" (a CUDA value) is read on the host: answer "none found"
    answer = (lambda t: True if t.dtype == torch.bool else 0.0 if t.is_cuda else 1.0) \
        if precision == "fp16" else None
    with FakeCuda(host_answer=answer) as fc:
        trainer = train.Trainer(cfg, model=model, tokenizer=tok, train_set=train_set,
                                eval_sets=eval_sets, classnames=tu.CLASSES)
        assert all(p.device.type == "cuda" for p in trainer.clip.parameters())
        with fc.paused():         # the loader builds host batches, as on a GPU machine
            loader = iter(trainer.epoch_loader(0, 0))
            batches = [next(loader) for _ in range(2)]
        before = [p for p in trainer.clip.parameters()]
        for batch in batches:
            terms = trainer.train_step(batch)
            assert {"contrastive", "distillation", "orthogonality", "cross", "sigma_min",
                    "loss"} <= set(terms)
            assert all(v.device.type == "cuda" and v.shape == () for k, v in terms.items()
                       if torch.is_tensor(v))
        assert trainer.step == 2 and trainer.teacher is not None
        assert all(p.grad is not None and p.grad.dtype == p.dtype for p in before
                   if p.requires_grad)
        # the towers run under autocast, but open_clip's F.normalize (a norm: autocast runs it
        # in fp32) hands the loss fp32 features, so the fused op takes its fp32 path
        stats, ds = fc.launched("_chunk_stats_kernel"), fc.launched("_chunk_ds_kernel")
        pairs = fc.launched("_sigmoid_chunk_kernel")
        if family == "softmax":
            assert len(stats) == len(ds) == 2 and not pairs
            assert all(r.args.ds_ptr.dtype == torch.float32 for r in ds)
        else:   # one pass per step forms G; nothing launched by the backward
            assert len(pairs) == 2 and not stats and not ds
            assert all(r.args.WITH_GRADS and r.args.g_ptr.dtype == torch.float32 for r in pairs)
        passes = stats if family == "softmax" else pairs
        assert [r.args.HAS_TEACHER for r in passes] == [False, True]   # distils from step 1
        assert fc.native_calls["smallest_eig_cuda"]                     # sigma_min on the GPU
        # GPU synchronisations inside the steps: the sigma_min term's two (its CUDA solver needs
        # the matrix finite, and its value is checked) and, with fp16, the GradScaler's read of
        # "found inf" in scaler.step; none in the contrastive op or elsewhere in the trainer
        want = {"eigen.py:_check_finite_lower", "_checks.py:check_result_finite"}
        if precision == "fp16":
            want.add("train.py:train_step")
        got = {f"{r.site.split(':')[0].rsplit('/', 1)[1]}:{r.site.rsplit(' in ', 1)[1]}"
               for r in fc.syncs()}
        assert got == want
        assert len(fc.syncs()) == len(batches) * len(want)
