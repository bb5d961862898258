"""The GPU-suite sections of the spectral family (benchmarks/gpu/covariance.py, spectral.py) run
their every code path here on CPU tensors at small sizes (quick=True), so that the first run on a
lent GPU does not spend its minutes on a crash; every check row must pass."""
import warnings

import pytest
import torch

from benchmarks.gpu import covariance, spectral


def _assert_rows(rows):
    assert rows
    bad = [r for r in rows if "ERROR" in str(r["check"]) + str(r["note"])
           or "FAIL" in str(r["check"])]
    assert not bad, bad


def test_covariance_section_on_cpu():
    rows = covariance.run(device="cpu", quick=True)
    _assert_rows(rows)
    assert any("exactly symmetric" in r["check"] for r in rows)
    assert any("x torch.mm" in r["note"] for r in rows)


def test_spectral_section_on_cpu():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = spectral.run(device="cpu", quick=True)
    _assert_rows(rows)
    ops = {r["op"] for r in rows}
    for op in ("batch_covariance", "CovarianceAccumulator", "covariance_sigma_min",
               "smallest_singular_value", "orthogonality_loss", "smallest_eigenvalue lanczos",
               "smallest_eigenvalue davidson cold", "smallest_eigenvalue lanczos cold"):
        assert any(o.startswith(op) for o in ops), op
    configs = {r["config"] for r in rows}
    for dtype in ("fp64", "fp32", "bf16", "fp16"):
        assert any(dtype in c for c in configs)


def test_sections_skip_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert "UNRUN" in spectral.run()[0]["check"]
    assert "skipped" in covariance.run()[0]["check"]
