"""Test and benchmark hooks: native entry points that are not part of the public API.

Production code never imports this module. Tests and benchmarks reach the kernels' internal
pieces (a thin-block kernel, the preconditioner's Cholesky, an element-wise exp, ...) through the
functions here, so the production surface of calrft_kernels._C stays the ops the package calls.
Each op family keeps its own section below.
"""
from __future__ import annotations

from .. import _backend


def native_testing():
    """The compiled test-only submodule ``calrft_kernels._C.testing``, or raise with the reason
    it is unavailable (the extension is not built)."""
    mod, why = _backend.native()
    if mod is None:
        raise RuntimeError(why)
    return getattr(mod, "testing", mod)


def available() -> bool:
    """Whether the native test hooks can be called on this machine."""
    return _backend.native()[0] is not None


# ----------------------------------------------------------------------------------------------
# Contrastive (csrc/cpu/contrastive.cpp, calrft_kernels/chunked.py)
# ----------------------------------------------------------------------------------------------
def contrastive_exp_cpu(x):
    """The C++ contrastive kernel's elementwise exp (vector lanes for the bulk, scalar tail), so
    tests can measure its error against float64 directly. x: float32/float64 CPU tensor."""
    return native_testing().contrastive_exp_cpu(x)


def sigmoid_log1p_cpu(x):
    """The C++ sigmoid kernel's (exp(-|x|), log(1 + exp(-|x|))) (vector lanes for the bulk,
    scalar tail), so tests can measure its error against float64. x: float32/float64 CPU tensor."""
    return native_testing().sigmoid_log1p_cpu(x)


# ---- spectral (covariance + eigen-solver families) -------------------------------------------

def spectral_hooks():
    """The eigen-solver's test-only kernels (csrc/cpu/davidson.cpp, submodule _C.testing):
    dense_block_cpu, jacobi_eigh_cpu, cholesky_cpu, covariance_times_cpu, factor_fits_cpu."""
    return native_testing()


# ---- CUDA binding seams: pybind signatures checked without a GPU ----------------------------
# The CUDA bindings cannot run here, but the Python code that builds their arguments can: a
# BindingStub parses the bound C++ function's parameter list from its source file, converts the
# arguments the way pybind11 does (an int64_t parameter refuses a Python float, a Tensor
# parameter refuses None, ...) and then calls a CPU stand-in. A call that the real binding would
# reject (the class of bug of issue 12: float(correction) into an int parameter) fails here.

_CPP_TYPES = {
    "at::Tensor": "tensor", "torch::Tensor": "tensor", "double": "float", "float": "float",
    "int64_t": "int", "int": "int", "long": "int", "bool": "bool", "std::string": "str",
}


def cpp_signature(source: str, function: str) -> list[tuple[str, str]]:
    """[(kind, name)] of `function`'s parameters in the C++ source text (kind: tensor, float,
    int, bool, str). Raises ValueError when the definition is not found or a type is unknown."""
    import re
    match = re.search(r"\b" + re.escape(function) + r"\s*\(([^)]*)\)\s*\{", source)
    if match is None:
        raise ValueError(f"no definition of {function} found")
    params = []
    for raw in match.group(1).split(","):
        raw = " ".join(raw.replace("&", " ").split())
        if not raw:
            continue
        words = raw.replace("const ", "").split()
        cpp_type, name = " ".join(words[:-1]), words[-1]
        if cpp_type not in _CPP_TYPES:
            raise ValueError(f"{function}: unsupported parameter type {cpp_type!r}")
        params.append((_CPP_TYPES[cpp_type], name))
    return params


def _pybind_accepts(kind: str, value) -> bool:
    import numbers
    import torch
    if kind == "tensor":
        return isinstance(value, torch.Tensor)
    if kind == "int":      # pybind11 refuses floats (and anything without __index__)
        return isinstance(value, numbers.Integral) and not isinstance(value, float)
    if kind == "float":    # ints convert, floats pass
        return isinstance(value, (numbers.Real,)) and not isinstance(value, torch.Tensor)
    if kind == "bool":
        return isinstance(value, bool)
    return isinstance(value, str)


class BindingStub:
    """Stands in for a pybind11-bound C++ function: checks each call against the parameter list
    parsed from the C++ source, then returns impl(*args). `calls` records the checked calls."""

    def __init__(self, source: str, function: str, impl):
        self.function, self.impl = function, impl
        self.params = cpp_signature(source, function)
        self.calls: list[tuple] = []

    def __call__(self, *args, **kwargs):
        if kwargs:
            raise TypeError(f"{self.function}: keyword arguments are not used by the callers")
        if len(args) != len(self.params):
            raise TypeError(f"{self.function}() takes {len(self.params)} arguments "
                            f"({', '.join(n for _, n in self.params)}), got {len(args)}")
        for (kind, name), value in zip(self.params, args):
            if not _pybind_accepts(kind, value):
                raise TypeError(f"{self.function}(): incompatible function arguments: "
                                f"{name} needs a {kind}, got {type(value).__name__} {value!r}"[:300])
        self.calls.append(args)
        return self.impl(*args)


def count_flops_through_custom_ops() -> None:
    """Let torch.utils.flop_counter.FlopCounterMode see the GEMMs inside the pair-loss custom ops
    (contrastive and sigmoid; a torch dispatch mode otherwise treats a custom op as opaque and
    counts nothing in it): under that mode the ops run their implementation with the mode
    active. The C++ kernels' tile products are seen where they run on the calling thread (small
    problems run on one thread). Idempotent."""
    import torch.utils.flop_counter as fc

    from .. import contrastive, sigmoid
    mode_type = getattr(fc, "_FlopCounterMode", fc.FlopCounterMode)
    for op in (contrastive.contrastive_stats, contrastive.contrastive_stats_backward,
               sigmoid.sigmoid_pairs):
        if mode_type in getattr(op, "_torch_dispatch_fns", {}):
            continue

        def through(mode, func, types, args, kwargs, op=op):
            with mode:
                return op._init_fn(*args, **kwargs)
        op.register_torch_dispatch(mode_type, through)
