"""The C++ CPU contrastive statistics kernel against the materialised float64 reference.

Forward: calrft_kernels.reference.contrastive_stats_reference. Backward: torch.autograd of the
scalar L = sum(g * row_stats) + sum(h * col_stats) on that reference (teacher rows 1 get no
gradient), so dq_u = dL/dq / scale and dk_u = dL/dk / scale.
"""
import importlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from calrft_kernels import testing
from calrft_kernels.reference import contrastive_stats_grads_reference, contrastive_stats_reference

C = importlib.import_module("calrft_kernels._C")
forward = C.contrastive_stats_forward_cpu
backward = C.contrastive_stats_backward_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def unit_rows(n, d, dtype, gen):
    x = torch.randn(n, d, dtype=torch.float64, generator=gen)
    return (x / x.norm(dim=1, keepdim=True)).to(dtype)


def make_problem(M, N, d, dtype, *, teacher_dim=None, scale=14.3, bias=-2.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p = dict(q=unit_rows(M, d, dtype, gen), k=unit_rows(N, d, dtype, gen),
             scale=torch.tensor(scale, dtype=dtype), bias=torch.tensor(bias, dtype=dtype),
             tq=None, tk=None, tscale=None)
    if teacher_dim is not None:
        p.update(tq=unit_rows(M, teacher_dim, dtype, gen), tk=unit_rows(N, teacher_dim, dtype, gen),
                 tscale=torch.tensor(scale * 0.8, dtype=dtype))
    return p


def upstream_grads(p, with_cols, seed=1):
    gen = torch.Generator().manual_seed(seed)
    R = 1 if p["tq"] is None else 3
    M, N = p["q"].shape[0], p["k"].shape[0]
    g = torch.randn(R, M, dtype=p["q"].dtype, generator=gen)
    h = torch.randn(R, N if with_cols else 0, dtype=p["q"].dtype, generator=gen)
    return g, h  # rows 1 are random on purpose: the kernel must ignore them


def args(p):
    return p["q"], p["k"], p["scale"], p["bias"], p["tq"], p["tk"], p["tscale"]


def as64(p):
    return {key: (None if v is None else v.detach().double()) for key, v in p.items()}


def reference_forward(p, with_cols):
    return contrastive_stats_reference(*args(as64(p)), with_cols=with_cols)


def reference_backward(p, with_cols, g, h):
    """(dq_u, dk_u, d scale, d bias) of L by autograd through the float64 reference."""
    p64 = as64(p)
    dq, dk, ds, db = contrastive_stats_grads_reference(*args(p64), grad_row=g.double(),
                                                       grad_col=h.double(), with_cols=with_cols)
    scale = p64["scale"]
    return dq / scale, dk / scale, ds, db


def tolerance(p):
    """Absolute tolerance on statistics: float64 ~ eps * |S|; float32 adds the fp32 products."""
    magnitude = 1.0 + abs(p["scale"].detach().item()) + abs(p["bias"].detach().item())
    return (1e-12 if p["q"].dtype == torch.float64 else 4e-6) * magnitude


def rel_err(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-300)).item()


def check_forward(p, with_cols):
    rows, cols = forward(*args(p), with_cols)
    ref_rows, ref_cols = reference_forward(p, with_cols)
    assert rows.dtype == cols.dtype == p["q"].dtype
    assert rows.shape == ref_rows.shape and cols.shape == ref_cols.shape
    tol = tolerance(p)
    torch.testing.assert_close(rows.double(), ref_rows, rtol=0, atol=tol)
    torch.testing.assert_close(cols.double(), ref_cols, rtol=0, atol=tol)
    return rows, cols


def check_backward(p, with_cols, rows, cols):
    g, h = upstream_grads(p, with_cols)
    dq, dk = backward(g, h, *args(p), rows, cols, with_cols)
    ref_dq, ref_dk, ref_ds, ref_db = reference_backward(p, with_cols, g, h)
    assert dq.dtype == dk.dtype == p["q"].dtype
    assert dq.shape == p["q"].shape and dk.shape == p["k"].shape
    rtol = 1e-10 if p["q"].dtype == torch.float64 else 2e-5
    assert rel_err(dq, ref_dq) < rtol
    assert rel_err(dk, ref_dk) < rtol
    # What the Python op derives from (dq_u, dk_u) must match autograd of scale and bias too.
    ds = (p["q"].double() * dq.double()).sum()
    torch.testing.assert_close(ds, ref_ds, rtol=rtol * 10, atol=rtol * 10)
    used = [0, 2] if p["tq"] is not None else [0]
    db = g[used].double().sum() + h[used].double().sum()
    torch.testing.assert_close(db, ref_db, rtol=1e-12, atol=1e-12)


# (M, N, d): every size of {1, 2, 3, 17, 31, 64, 97, 130, 257} as M and as N, mostly M != N,
# every d of {1, 3, 65, 128}.
SHAPES = [
    (1, 1, 1), (1, 2, 65), (2, 1, 3), (2, 3, 128), (3, 17, 1), (3, 3, 65), (17, 2, 128),
    (17, 31, 3), (31, 17, 65), (31, 64, 128), (64, 97, 1), (64, 64, 3), (97, 130, 65),
    (97, 3, 128), (130, 257, 3), (130, 31, 1), (257, 130, 128), (257, 1, 65), (1, 257, 3),
    (130, 97, 65), (257, 257, 1),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("teacher_dim", [None, 5], ids=["plain", "teacher"])
@pytest.mark.parametrize("with_cols", [True, False], ids=["cols", "rows_only"])
@pytest.mark.parametrize("M,N,d", SHAPES)
def test_matches_reference(M, N, d, with_cols, teacher_dim, dtype):
    p = make_problem(M, N, d, dtype, teacher_dim=teacher_dim, seed=M * 1000 + N)
    rows, cols = check_forward(p, with_cols)
    check_backward(p, with_cols, rows, cols)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("teacher_dim", [None, 65, 200], ids=["plain", "t65", "t200"])
def test_teacher_dim_differs_and_tiles_span_threads(teacher_dim, dtype):
    # 1100 x 700: several row panels per thread, partial last panel and partial last column tile.
    p = make_problem(1100, 700, 64, dtype, teacher_dim=teacher_dim, seed=7)
    rows, cols = check_forward(p, True)
    check_backward(p, True, rows, cols)
    rows, cols = check_forward(p, False)
    check_backward(p, False, rows, cols)


@pytest.mark.parametrize("with_cols", [True, False], ids=["cols", "rows_only"])
@pytest.mark.parametrize("M,N", [(1, 70001), (3, 30000), (513, 2077)])
def test_few_rows_against_many_columns(M, N, with_cols):
    # The distributed shape (a rank's rows against the global batch). M = 1 with enough work
    # for two threads gives fewer row panels than threads (one part in the backward schedule).
    p = make_problem(M, N, 128, torch.float32, teacher_dim=16, seed=M)
    rows, cols = check_forward(p, with_cols)
    check_backward(p, with_cols, rows, cols)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("teacher_dim", [None, 3], ids=["plain", "teacher"])
def test_scale_100_anti_aligned_stays_finite(teacher_dim, dtype):
    # q = -k row by row: the matching logits are the most negative ones.
    p = make_problem(97, 97, 65, dtype, teacher_dim=teacher_dim, scale=100.0, bias=-10.0, seed=3)
    p["q"] = -p["k"]
    rows, cols = check_forward(p, True)
    check_backward(p, True, rows, cols)
    # Every logit about -110: a kernel that assumed max = scale would underflow to log(0).
    gen = torch.Generator().manual_seed(5)
    u = unit_rows(1, 65, torch.float64, gen)
    p["q"] = (u + 1e-3 * torch.randn(130, 65, dtype=torch.float64, generator=gen)).to(dtype)
    p["k"] = (-u + 1e-3 * torch.randn(31, 65, dtype=torch.float64, generator=gen)).to(dtype)
    if teacher_dim is not None:
        p["tq"], p["tk"] = p["tq"][:1].expand(130, -1).contiguous(), -p["tk"][:31]
    rows, cols = check_forward(p, True)
    assert torch.isfinite(rows).all() and torch.isfinite(cols).all()
    assert rows[0].max() < -100
    check_backward(p, True, rows, cols)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_thread_count_does_not_change_results(dtype):
    p = make_problem(700, 600, 32, dtype, teacher_dim=8, seed=11)
    g, h = upstream_grads(p, True)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            rows, cols = forward(*args(p), True)
            results.append((rows, cols, *backward(g, h, *args(p), rows, cols, True)))
    finally:
        torch.set_num_threads(before)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_inputs_that_require_grad_are_accepted():
    # The Python op calls the kernels on autograd leaves with grad mode on.
    p = make_problem(300, 70, 16, torch.float64, teacher_dim=4, seed=4)
    for key in ("q", "k", "scale", "bias"):
        p[key].requires_grad_()
    rows, cols = check_forward(p, True)
    assert not rows.requires_grad
    check_backward(p, True, rows, cols)
    g, h = upstream_grads(p, True)
    dq, dk = backward(g, h, *args(p), rows, cols, True)
    assert not dq.requires_grad and not dk.requires_grad


def test_nan_input_gives_nan_statistics():
    p = make_problem(40, 33, 16, torch.float32, seed=2)
    p["q"][5, 3] = float("nan")
    rows, cols = forward(*args(p), True)
    assert torch.isnan(rows[0, 5]) and torch.isfinite(rows[0, :5]).all()
    assert torch.isnan(cols[0]).all()  # every column sees row 5


def test_vector_exp_accuracy():
    # Every float in [-87, 88] at a stride of ~1e-4, plus the special values.
    x = torch.arange(-87.0, 88.0, 1.2207e-4, dtype=torch.float64).float()
    x = x[: x.numel() // 8 * 8]  # vector lanes only (the scalar tail is std::exp)
    got = testing.contrastive_exp_cpu(x).double()
    want = torch.exp(x.double())
    ulp = (torch.nextafter(want.float(), torch.tensor(float("inf"))) - want.float()).double()
    max_ulps = ((got - want).abs() / ulp).max().item()
    assert max_ulps < 2.0, max_ulps
    special = torch.tensor([float("-inf"), -1e4, -88.0, 0.0, float("nan"), 1.0, -0.0, 2.0])
    out = testing.contrastive_exp_cpu(special)
    assert out[0] == 0 and out[1] == 0 and out[2] == 0 and out[3] == 1 and out[6] == 1
    assert torch.isnan(out[4])
    torch.testing.assert_close(out[[5, 7]], torch.exp(special[[5, 7]]), rtol=2e-7, atol=0)


def test_rejects_bad_inputs():
    p = make_problem(8, 6, 4, torch.float32, teacher_dim=3)
    q, k, s, b, tq, tk, ts = args(p)
    with pytest.raises(RuntimeError, match="k must have dtype"):
        forward(q, k.double(), s, b, None, None, None, True)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        forward(q.half(), k.half(), s, b, None, None, None, True)
    with pytest.raises(RuntimeError, match="contiguous"):
        forward(q.t().contiguous().t(), k, s, b, None, None, None, True)
    with pytest.raises(RuntimeError, match="feature dim"):
        forward(q, k[:, :3].contiguous(), s, b, None, None, None, True)
    with pytest.raises(RuntimeError, match="together"):
        forward(q, k, s, b, tq, None, ts, True)
    with pytest.raises(RuntimeError, match="tscale"):
        forward(q, k, s, b, tq, tk, None, True)
    with pytest.raises(RuntimeError, match="tk must have k's row count"):
        forward(q, k, s, b, tq, tk[:5].contiguous(), ts, True)
    with pytest.raises(RuntimeError, match="0-dim"):
        forward(q, k, torch.ones(2), b, None, None, None, True)
    with pytest.raises(RuntimeError, match="at least one row"):
        forward(q[:0], k, s, b, None, None, None, True)
    rows, cols = forward(q, k, s, b, tq, tk, ts, True)
    g, h = torch.ones_like(rows), torch.ones_like(cols)
    with pytest.raises(RuntimeError, match="grad_col must have shape"):
        backward(g, h, q, k, s, b, tq, tk, ts, rows, cols, False)
    with pytest.raises(RuntimeError, match="row_stats must have shape"):
        backward(g[:1], h[:1], q, k, s, b, None, None, None, rows, cols, True)


MEMORY_SCRIPT = textwrap.dedent("""
    import importlib, json, torch
    C = importlib.import_module("calrft_kernels._C")
    def hwm_kib():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1])
    B, d = 20000, 64
    q = torch.nn.functional.normalize(torch.randn(B, d), dim=1)
    k = torch.nn.functional.normalize(torch.randn(B, d), dim=1)
    s, b = torch.tensor(30.0), torch.tensor(0.0)
    small = (q[:300].contiguous(), k[:300].contiguous())  # warm up allocator, BLAS, OpenMP
    r, c = C.contrastive_stats_forward_cpu(*small, s, b, None, None, None, True)
    C.contrastive_stats_backward_cpu(r, c, *small, s, b, None, None, None, r, c, True)
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    base = hwm_kib()
    r, c = C.contrastive_stats_forward_cpu(q, k, s, b, None, None, None, True)
    dq, dk = C.contrastive_stats_backward_cpu(r, c, q, k, s, b, None, None, None, r, c, True)
    print(json.dumps({"growth_mib": (hwm_kib() - base) / 1024, "finite": bool(
        torch.isfinite(dq).all() and torch.isfinite(dk).all())}))
""")


def test_memory_is_linear_in_batch():
    # B = 20000: one B x B float32 matrix would be 1.6 GB. Outputs dq, dk are 5 MB each,
    # per-thread dk accumulators another 5 MB each.
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["finite"]
    assert result["growth_mib"] < 100, result
