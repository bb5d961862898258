"""GPU kernels of the centred batch covariance, verified without a GPU (kernels.md section 3).

* Triton: the kernels run on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py) and are
  compared with a float64 two-pass reference at awkward sizes; they are also compiled ahead of
  time for sm_90 (every autotune config, every dtype) in a subprocess without the interpreter.
* The CUDA C++ covariance kernel (csrc/cuda/covariance.cu) is gone (issue 12: 3-5x slower than
  the Triton one and than cuBLAS on the H200, and not exactly symmetric): CUDA tensors use the
  centred cuBLAS product by default (calrft_kernels/covariance.py, tested on CPU tensors in
  tests/test_spectral_seams.py) and this Triton kernel with backend="triton".
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from calrft_kernels.reference import covariance_reference
from calrft_kernels.triton.covariance import _upper_tile_pair, covariance_triton

ROOT = Path(__file__).resolve().parents[1]
SIZES_B = (1, 2, 3, 17, 97, 130)
SIZES_D = (1, 2, 3, 33, 65, 130)
# Error bound relative to max |Sigma|: fp32 operands are exact in the interpreter; fp16
# operands round each centred value to 11 bits.
TOLERANCE = {torch.float32: 2e-6, torch.float16: 1e-3, torch.float64: 1e-13}


def reference_covariance(z: torch.Tensor, correction: int):
    """Two-pass float64: the ground truth (calrft_kernels/reference.py)."""
    return covariance_reference(z.to(torch.float64), correction)


def features(n_rows: int, n_cols: int, dtype, mean_over_spread: float = 3.0, generator=None):
    """Rows with a per-feature mean mean_over_spread times larger than the spread (~1)."""
    g = generator or torch.Generator().manual_seed(n_rows * 1000 + n_cols)
    mu = mean_over_spread * (0.5 + torch.rand(n_cols, generator=g))
    scales = 0.2 + torch.rand(n_cols, generator=g)  # anisotropic: a non-trivial spectrum
    return (mu + scales * torch.randn(n_rows, n_cols, generator=g, dtype=torch.float64)).to(dtype)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 when both vanish, as for a single row)."""
    err = (actual.to(torch.float64) - expected).abs().max().item()
    scale = expected.abs().max().item()
    return err / scale if scale > 0 else err


def assert_close_covariance(cov, mean, z, correction, dtype):
    ref_cov, ref_mean = reference_covariance(z, correction)
    tol = TOLERANCE[dtype]
    assert cov.shape == ref_cov.shape and mean.shape == ref_mean.shape
    assert torch.equal(cov, cov.T), "Sigma must be exactly symmetric"
    cov_err = relative_error(cov, ref_cov)
    assert cov_err <= tol, f"Sigma max rel err {cov_err:.3g} > {tol:g}"
    mean_err = relative_error(mean, ref_mean)
    assert mean_err <= 4 * (1e-13 if dtype == torch.float64 else 1e-6), f"mean rel err {mean_err}"


# ---------------------------------------------------------------- Triton, interpreted on CPU

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n_cols", SIZES_D)
@pytest.mark.parametrize("n_rows", SIZES_B)
def test_triton_matches_float64_two_pass(n_rows, n_cols, dtype):
    z = features(n_rows, n_cols, dtype)
    correction = 1 if n_rows > 1 else 0
    cov, mean = covariance_triton(z, correction)
    assert cov.dtype == torch.float32 and mean.dtype == torch.float32
    assert_close_covariance(cov, mean, z, correction, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n_rows,n_cols", [(130, 65), (97, 130), (250, 33)])
def test_triton_large_mean_stays_two_pass_accurate(n_rows, n_cols, dtype):
    z = features(n_rows, n_cols, dtype, mean_over_spread=50.0)
    cov, mean = covariance_triton(z, 1)
    assert_close_covariance(cov, mean, z, 1, dtype)


def test_large_mean_defeats_the_one_pass_formula():
    """The tolerance above is meaningful: the one-pass fp32 formula misses it by far."""
    z = features(250, 33, torch.float32, mean_over_spread=50.0)
    ref, _ = reference_covariance(z, 1)
    m = z.mean(0)
    one_pass = (z.T @ z - z.shape[0] * torch.outer(m, m)) / (z.shape[0] - 1)
    assert relative_error(one_pass, ref) > 50 * TOLERANCE[torch.float32]


@pytest.mark.parametrize("row_chunks", [2, 3, 7])
def test_triton_row_chunks_sum_to_the_same_covariance(row_chunks):
    z = features(130, 65, torch.float32, mean_over_spread=50.0)
    cov, mean = covariance_triton(z, 1, row_chunks=row_chunks)
    assert_close_covariance(cov, mean, z, 1, torch.float32)


@pytest.mark.parametrize("correction", [0, 1, 2])
def test_triton_correction(correction):
    z = features(17, 33, torch.float32)
    cov, mean = covariance_triton(z, correction)
    assert_close_covariance(cov, mean, z, correction, torch.float32)


def test_triton_non_contiguous_input():
    base = features(65, 97, torch.float32)  # z = base.T is [97, 65] with strides (1, 97)
    z = base.T
    assert not z.is_contiguous()
    cov, mean = covariance_triton(z, 1)
    assert_close_covariance(cov, mean, z, 1, torch.float32)
    sliced = features(97, 130, torch.float32)[::2, 1::3]  # both strides != natural
    cov, mean = covariance_triton(sliced, 1)
    assert_close_covariance(cov, mean, sliced, 1, torch.float32)


def test_triton_float64_accumulates_in_float64():
    z = features(97, 65, torch.float64, mean_over_spread=50.0)
    cov, mean = covariance_triton(z, 1)
    assert cov.dtype == torch.float64 and mean.dtype == torch.float64
    assert_close_covariance(cov, mean, z, 1, torch.float64)


def test_triton_bfloat16_input_is_exact_after_upcast_in_the_interpreter():
    """Under the interpreter bf16 operands are upcast to fp32 (its bf16 dot is broken), so the
    result equals the fp32 result on the upcast values; on a GPU bf16 operands go to wgmma."""
    z = features(97, 65, torch.bfloat16, mean_over_spread=50.0)
    cov, mean = covariance_triton(z, 1)
    assert_close_covariance(cov, mean, z, 1, torch.float32)


@triton.jit
def map_pairs(out_i, out_j, BLOCK: tl.constexpr):
    """The kernel's pair -> (i, j) helper, applied to a block of pair ids at once."""
    pair = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    i, j = _upper_tile_pair(pair)
    tl.store(out_i + pair, i)
    tl.store(out_j + pair, j)


def test_triton_tile_pair_mapping_covers_the_upper_triangle_once():
    tiles = 90
    count = tiles * (tiles + 1) // 2  # 4095 pairs
    block = 1024
    out_i = torch.full((triton.cdiv(count, block) * block,), -1, dtype=torch.int32)
    out_j = torch.full_like(out_i, -1)
    map_pairs[(triton.cdiv(count, block),)](out_i, out_j, BLOCK=block)
    pairs = {(int(i), int(j)) for i, j in zip(out_i[:count], out_j[:count])}
    assert pairs == {(i, j) for j in range(tiles) for i in range(j + 1)}
    # Consecutive ids walk down a column of the triangle (shared tile j: L2 reuse).
    assert [(int(i), int(j)) for i, j in zip(out_i[:6], out_j[:6])] == [
        (0, 0), (0, 1), (1, 1), (0, 2), (1, 2), (2, 2)]


@pytest.mark.parametrize("bad,match,error", [
    (lambda: covariance_triton([[1.0]], 1), "z must be a torch.Tensor", TypeError),
    (lambda: covariance_triton(torch.ones(4, 3, dtype=torch.int32), 1), "z must be float",
     TypeError),
    (lambda: covariance_triton(torch.ones(4), 1), "z must be 2-D", ValueError),
    (lambda: covariance_triton(torch.ones(0, 3), 0), "at least one row", ValueError),
    (lambda: covariance_triton(torch.ones(3, 2), 3), "correction", ValueError),
    (lambda: covariance_triton(torch.ones(3, 2), -1), "correction", ValueError),
    # issue 12: the launcher refused float corrections (the public op passes a float)
    (lambda: covariance_triton(torch.ones(3, 2), True), "correction must be a number", TypeError),
    (lambda: covariance_triton(torch.ones(3, 2), float("nan")), "correction", ValueError),
    (lambda: covariance_triton(torch.ones(3, 2), 1, row_chunks=0), "row_chunks", ValueError),
])
def test_triton_rejects_bad_input(bad, match, error):
    with pytest.raises(error, match=match):
        bad()


# ------------------------------------------------- Triton, compiled ahead of time for sm_90

AOT_SCRIPT = ROOT / "tests" / "aot" / "covariance_triton_sm90.py"


HOPPER_MAX_SHARED = 227 * 1024


def aot_compile_all() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(AOT_SCRIPT)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_triton_kernels_compile_for_sm90_every_config_and_dtype():
    rows = aot_compile_all()
    gram = [r for r in rows if r["kernel"] == "centred_gram"]
    assert len(gram) == 4 * 4 and len(rows) == 4 * 5
    for row in rows:
        assert 0 < row["shared_meta"] <= HOPPER_MAX_SHARED, row
        assert row.get("reg", 0) > 0, row
        assert row.get("stack", 0) == 0, f"register spills (stack frame): {row}"
    for row in gram:
        if row["dtype"] == "torch.float64":
            assert row["mma_sync"], row  # DMMA
        else:  # fp16/bf16 operands, and fp32 as tf32x3: Hopper warpgroup MMA
            assert row["wgmma"], row


if __name__ == "__main__" and "--aot-report" in sys.argv:
    # Resource table for benchmarks/results/covariance_gpu.md.
    for r in aot_compile_all():
        print(f"| {r['kernel']} | {r['dtype'].replace('torch.', '')} | {r['config']} | "
              f"{r.get('reg')} | {r['shared_meta']} | {r.get('stack', 0)} | {r.get('local', 0)} | "
              f"{'wgmma' if r['wgmma'] else ('mma.sync' if r['mma_sync'] else 'fma')} |")
