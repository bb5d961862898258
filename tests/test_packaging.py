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


@pytest.mark.parametrize("name", ["calrft-tiny", "calrft-tiny-sigmoid"])
def test_tiny_model_configs_are_shipped_and_readable(built, name):
    config = json.loads((built / "calrft" / "model_configs" / f"{name}.json").read_text())
    assert "vision_cfg" in config
    assert ("init_logit_bias" in config) == (name == "calrft-tiny-sigmoid")  # the SigLIP-style one


def test_installed_tree_imports_and_finds_its_data(built):
    """Import the trainer's model module from the built tree only (not the repository) and read
    the tiny config through its own path logic."""
    code = ("import calrft.models as m, sys; "
            "assert m.__file__.startswith(sys.argv[1]), m.__file__; "
            "print(m.tiny_config()['embed_dim'] + m.tiny_config(m.TINY_SIGMOID)['embed_dim'])")
    env = dict(os.environ, PYTHONPATH=str(built))
    proc = subprocess.run([sys.executable, "-c", code, str(built)], cwd=built, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.strip().splitlines()[-1]) > 0


# ---- issue 22: what `pip install` brings ---------------------------------------------------------

# Imported only by an optional part, which says how to install it when it is missing.
OPTIONAL = {"webdataset": "webdataset",      # top-level module -> the extra that declares it
            "transformers": "transformers"}
FIRST_PARTY = {"calrft", "calrft_kernels"}


def _imported_top_level_modules(package_dir: Path) -> dict:
    """{top-level module: first file importing it} over every import of a package's sources,
    lazy ones in functions included (relative imports are first-party)."""
    import ast
    found = {}
    for path in sorted(package_dir.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def _third_party_imports() -> dict:
    found = {}
    for package_dir in SOURCES.values():
        for module, where in _imported_top_level_modules(package_dir).items():
            if module not in sys.stdlib_module_names and module not in FIRST_PARTY:
                found.setdefault(module, where)
    return found


def _canonical(name: str) -> str:
    import re
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def metadata(tmp_path_factory):
    """The METADATA a wheel of this tree carries (setuptools' PEP 517 hook; no compilation)."""
    import email.parser
    out = tmp_path_factory.mktemp("metadata")
    code = ("import sys; from setuptools import build_meta; "
            "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))")
    env = dict(os.environ, CALRFT_BUILD_CUDA="0")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist_info = out / proc.stdout.strip().splitlines()[-1]
    return email.parser.Parser().parsestr((dist_info / "METADATA").read_text())


def _requirements(metadata):
    """({distribution: Requirement} of the base install, {extra: {distribution, ...}})."""
    from packaging.requirements import Requirement
    base, extras = {}, {}
    for line in metadata.get_all("Requires-Dist") or []:
        req = Requirement(line)
        marker = str(req.marker or "")
        if "extra ==" in marker:
            extra = marker.split("extra ==")[1].strip().strip("'\"")
            extras.setdefault(extra, set()).add(_canonical(req.name))
        else:
            base[_canonical(req.name)] = req
    return base, extras


def test_every_third_party_import_is_declared(metadata):
    """Each third-party top-level module either package imports maps (through the installed
    distributions' own file lists) to a distribution the wheel requires, or, for an optional part,
    to one of its extras: a new import without a declaration fails here."""
    from importlib.metadata import packages_distributions
    owners = packages_distributions()
    base, extras = _requirements(metadata)
    imports = _third_party_imports()
    assert {"torch", "open_clip", "numpy", "PIL"} <= set(imports)   # the walk sees the imports
    problems = []
    for module, where in sorted(imports.items()):
        dists = {_canonical(d) for d in owners.get(module, [])}
        if not dists:
            problems.append(f"{module} (imported by {where}) belongs to no installed distribution")
        elif module in OPTIONAL:
            if not dists & extras.get(OPTIONAL[module], set()):
                problems.append(f"{module} (imported by {where}): extra [{OPTIONAL[module]}] lacks {dists}")
            if dists & set(base):
                problems.append(f"{module} is optional but a base requirement")
        elif not dists & set(base):
            problems.append(f"{module} (imported by {where}) needs one of {sorted(dists)} in install_requires")
    assert not problems, problems


def test_torch_is_pinned_to_the_build_and_versions_match_the_development_pins(metadata):
    """torch == the version the extension is compiled against (its C++ ABI); every lower bound is
    met by requirements.txt's pins, so the suite tests what a user may install."""
    import torch
    from packaging.requirements import Requirement
    base, _ = _requirements(metadata)
    assert str(base["torch"].specifier) == "==" + torch.__version__.split("+")[0]
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            pins[_canonical(req.name)] = next(iter(req.specifier)).version
    for name, req in base.items():
        if name in pins:
            assert req.specifier.contains(pins[name]), f"{req} excludes requirements.txt's {name}=={pins[name]}"
    assert metadata["Requires-Python"] == ">=3.11"
