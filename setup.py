"""Build calrft_kernels._C: the C++ CPU kernels always, the CUDA kernels when this machine can.

Environment:
  CALRFT_BUILD_CUDA=1  force the CUDA sources (fail if nvcc/torch-CUDA is missing)
  CALRFT_BUILD_CUDA=0  skip them (fast CPU-only builds while developing)
  unset                build them whenever torch has CUDA and nvcc is found
  CUDA_HOME            toolkit root; when unset we derive it from the nvcc on PATH
                       (torch's own guess is wrong on machines where nvcc is a wrapper script)
"""
import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _toolkit_root_from_nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
        return root
    # nvcc may be a wrapper script that execs the real one: read the path out of it.
    try:
        text = open(nvcc, errors="ignore").read(4096)
    except OSError:
        return None
    match = re.search(r"(/\S+)/bin/nvcc", text)
    return match.group(1) if match else None


if "CUDA_HOME" not in os.environ:
    root = _toolkit_root_from_nvcc()
    if root:
        os.environ["CUDA_HOME"] = root
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

import torch  # noqa: E402  (CUDA_HOME must be set before cpp_extension is imported)
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME, BuildExtension, CppExtension, CUDAExtension)


def _want_cuda():
    flag = os.environ.get("CALRFT_BUILD_CUDA", "").strip().lower()
    reasons = []
    if torch.version.cuda is None:
        reasons.append("torch was built without CUDA")
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        reasons.append("nvcc not found (set CUDA_HOME)")
    if flag in ("0", "false", "no", "off"):
        return False, "CALRFT_BUILD_CUDA=0"
    if flag in ("1", "true", "yes", "on") and reasons:
        sys.exit("CALRFT_BUILD_CUDA=1 but CUDA cannot be built: " + "; ".join(reasons))
    return not reasons, "; ".join(reasons)


def _nvidia_include_dirs():
    """cuBLAS/cuSOLVER headers ship in the nvidia-* wheels, not in a bare toolkit."""
    dirs = []
    for site in sys.path:
        dirs += glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(site, "nvidia", "*", "include"))
    return sorted({d for d in dirs if os.path.isdir(d)})


def _extension():
    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    include_dirs = [os.path.join(HERE, "csrc")]
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-march=native" if os.environ.get(
        "CALRFT_NATIVE", "0") == "1" else "-mavx2", "-mfma"]
    build_cuda, why_not = _want_cuda()
    if build_cuda:
        print(f"[calrft] building CPU kernels {cpu_sources} and CUDA kernels {cuda_sources} "
              f"for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} with {CUDA_HOME}")
        nvcc_flags = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "-Xptxas", "-v",
                      "--expt-relaxed-constexpr"]
        return CUDAExtension(
            "calrft_kernels._C", cpu_sources + cuda_sources,
            include_dirs=include_dirs + _nvidia_include_dirs(),
            define_macros=[("CALRFT_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"])
    print(f"[calrft] building CPU kernels {cpu_sources}; SKIPPED CUDA kernels ({why_not})")
    return CppExtension(
        "calrft_kernels._C", cpu_sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])


def _torch_requirement():
    """The extension is compiled against this torch's C++ ABI: a wheel needs exactly it (a local
    build tag such as +cu130 is left out, so any build of that version satisfies it)."""
    return "torch==" + torch.__version__.split("+")[0]


# What the two packages import at run time (tests/test_packaging.py walks their imports and fails
# on one that no requirement here declares). Lower bounds are the versions the test suite runs
# (requirements.txt pins them exactly for development); torch is pinned to the build's.
INSTALL_REQUIRES = [
    _torch_requirement(),
    "triton; platform_system == 'Linux'",   # the GPU kernels (torch brings the matching one)
    "open_clip_torch>=3.3",                   # models, tokenizers, ClipLoss semantics
    "numpy>=2.4",
    "pillow>=11",
    "PyYAML>=6.0",                            # --config files
    "tqdm>=4.66",                             # progress bars
    "scikit-learn>=1.5",                      # the demo's digits data
    "safetensors>=0.4",                       # .safetensors weights (calrft eval / wise-ft)
    "matplotlib>=3.9",                        # report and WiSE-FT plots
]
# Optional parts: `pip install calrft-kernels[webdataset]`, `calrft-kernels[open-clip-train]`,
# `calrft-kernels[transformers]`.
EXTRAS_REQUIRE = {
    "webdataset": ["webdataset>=1.0"],        # --train-data shards; shard evaluation sets
    # calrft-open-clip-train: open_clip_train's data loading imports pandas and webdataset,
    # which open_clip_torch's base install does not bring
    "open-clip-train": ["pandas>=2.2", "webdataset>=1.0"],
    # calrft_kernels.integrations.transformers: pinned to the version its tests ran on (the
    # integration checks the models' forward layout); accelerate is what transformers.Trainer needs
    "transformers": ["transformers==5.18.0", "accelerate>=1.1.0"],
}

packages = find_packages(include=["calrft_kernels", "calrft_kernels.*"])
package_dir = {}
if os.path.isdir(os.path.join(HERE, "python", "calrft")):
    packages += ["calrft"] + ["calrft." + p for p in find_packages("python/calrft")]
    package_dir["calrft"] = "python/calrft"

setup(
    name="calrft-kernels",
    version="0.1.0",
    description="Fused kernels for calibrated robust fine-tuning (CaRot) of CLIP models",
    packages=packages,
    package_dir=package_dir,
    # Data files the packages read at run time (a wheel or a non-editable install must carry
    # them: tests/test_packaging.py checks what build_py ships against what the code opens).
    package_data={"calrft": ["model_configs/*.json"]},
    include_package_data=False,
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.11",                  # tomllib (--config FILE.toml)
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": [
        "calrft=calrft.cli:main",
        "calrft-open-clip-train=calrft_kernels.integrations.open_clip_train:main",
    ]},
)
