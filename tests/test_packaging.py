"""What a wheel or a non-editable `pip install .` ships: every module and data file the packages
read. setuptools' build_py output is what both install (the extension is built separately and is
not needed here), so the test builds it into a temporary folder and imports from there alone."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"calrft_kernels": ROOT / "calrft_kernels", "calrft": ROOT / "python" / "calrft"}


def _source_files(package_dir: Path):
    """Every file of a package's source tree that an install must carry (caches and compiled
    extensions aside: the extension is built by build_ext, not copied)."""
    for path in package_dir.rglob("*"):
        if path.is_dir() or "__pycache__" in path.parts or path.suffix in (".so", ".pyd", ".pyc"):
            continue
        yield path.relative_to(package_dir)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("build_py")
    env = dict(os.environ, CALRFT_BUILD_CUDA="0")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("package", sorted(SOURCES))
def test_build_py_ships_every_module_and_data_file(built, package):
    shipped = {p.relative_to(built / package) for p in (built / package).rglob("*") if p.is_file()}
    wanted = set(_source_files(SOURCES[package]))
    missing = sorted(str(p) for p in wanted - shipped)
    assert not missing, f"{package}: a wheel would miss {missing}"


def test_tiny_model_config_is_shipped_and_readable(built):
    config = built / "calrft" / "model_configs" / "calrft-tiny.json"
    assert config.is_file()
    assert "vision_cfg" in json.loads(config.read_text())


def test_installed_tree_imports_and_finds_its_data(built):
    """Import the trainer's model module from the built tree only (not the repository) and read
    the tiny config through its own path logic."""
    code = ("import calrft.models as m, sys; "
            "assert m.__file__.startswith(sys.argv[1]), m.__file__; "
            "print(m.tiny_config()['embed_dim'])")
    env = dict(os.environ, PYTHONPATH=str(built))
    proc = subprocess.run([sys.executable, "-c", code, str(built)], cwd=built, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.strip().splitlines()[-1]) > 0
