"""A user's first import (issue 22): each public entry point, as the first import of a fresh
interpreter, leaves the C++ kernels usable; a built extension that fails to load says "failed to
load" with the loader's reason, and "not built" is said only when there is no extension file.

Every other test imports torch first (conftest), so only fresh interpreters see this."""
import importlib.machinery
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# After the entry point: a CPU op that must run on the C++ backend (backend="cpu" raises
# ValueError with the reason when the extension is unusable) and matches the reference.
CPU_OP = """
import torch
import calrft_kernels as ck
from calrft_kernels import _backend
assert _backend.native()[0] is not None, _backend.native()[1]
z = torch.randn(33, 7, dtype=torch.float64)
a = torch.nn.functional.normalize(torch.randn(9, 5, dtype=torch.float64), dim=1)
b = torch.nn.functional.normalize(torch.randn(9, 5, dtype=torch.float64), dim=1)
torch.testing.assert_close(ck.batch_covariance(z, backend="cpu"), ck.batch_covariance(z, backend="reference"))
torch.testing.assert_close(ck.contrastive_loss(a, b, 10.0, backend="cpu"),
                           ck.contrastive_loss(a, b, 10.0, backend="reference"))
print("cpu backend ok")
"""

FIRST_IMPORTS = {
    "import calrft_kernels": "import calrft_kernels",
    "from calrft_kernels import ClipLoss": "from calrft_kernels import ClipLoss\nClipLoss(backend='cpu')",
    "import calrft": "import calrft",
    "from calrft.ops import CaRotLoss": "from calrft.ops import CaRotLoss",
}


def _run(code, env=None, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


@pytest.mark.parametrize("first", sorted(FIRST_IMPORTS))
def test_entry_point_as_first_import_keeps_the_cpu_kernels(first, tmp_path):
    code = FIRST_IMPORTS[first] + "\n" + CPU_OP
    proc = _run(code, cwd=tmp_path)  # a folder with nothing importable in it
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cpu backend ok" in proc.stdout


def test_console_command_runs_the_cpu_kernels(tmp_path):
    """`calrft env`, the console script as a user runs it: loads the extension and checks the
    C++ kernels against the float64 reference."""
    script = shutil.which("calrft", path=os.path.dirname(sys.executable))
    assert script is not None, "the calrft console script is not installed beside this python"
    proc = subprocess.run([script, "env"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "native extension calrft_kernels._C: loaded" in proc.stdout
    for op in ("contrastive_loss(backend='cpu') on cpu", "sigmoid_loss(backend='cpu') on cpu",
               "batch_covariance(backend='cpu') on cpu"):
        assert f"ok   {op}:" in proc.stdout, proc.stdout


def _package_copy(tmp_path, extension_bytes=None):
    """calrft_kernels' Python files in a fresh folder, with a given extension file or none."""
    src = ROOT / "calrft_kernels"
    dst = tmp_path / "calrft_kernels"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    if extension_bytes is not None:
        suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
        (dst / f"_C{suffix}").write_bytes(extension_bytes)
    return tmp_path


# The development install's editable finder maps calrft_kernels._C to the repository's build:
# drop it, so the copy is all there is (as in an installation without that file).
PROBE = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
import calrft_kernels as ck, torch
from calrft_kernels import _backend
assert ck.__file__.startswith(%r), ck.__file__
print("REASON:", _backend.native()[1])
try:
    ck.batch_covariance(torch.randn(5, 3), backend="cpu")
except ValueError as exc:
    print("ERROR:", exc)
"""


def test_a_broken_extension_says_failed_to_load_with_the_loaders_reason(tmp_path):
    root = _package_copy(tmp_path, extension_bytes=b"not an ELF file " * 256)
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = _run(PROBE % str(root), env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REASON: the native extension calrft_kernels._C failed to load (" in proc.stdout
    assert "invalid ELF header" in proc.stdout   # the loader's own words
    assert "not built" not in proc.stdout
    assert "ERROR: backend='cpu' is unavailable" in proc.stdout, proc.stdout
    assert "failed to load" in proc.stdout.split("ERROR:")[1]


def test_an_absent_extension_says_not_built(tmp_path):
    root = _package_copy(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = _run(PROBE % str(root), env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REASON: the native extension calrft_kernels._C is not built" in proc.stdout
    assert "failed to load" not in proc.stdout
    assert "ERROR: backend='cpu' is unavailable" in proc.stdout
