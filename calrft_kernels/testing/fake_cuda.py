"""Fake CUDA: the package's CUDA-only Python, executed on a machine without a GPU.

`FakeCuda()` is a context manager under which `torch.randn(8, 4, device="cuda")` gives a fake
CUDA tensor (torch's FakeTensorMode: shapes, dtypes, devices and strides, no values; aten ops
run their meta functions, including CUDA-only overloads such as torch.mm(a, b,
out_dtype=torch.float32) on bf16), and the package's code takes its CUDA branches on them:

  - The package's custom ops (calrft::*) run their IMPLEMENTATION on fake tensors, not their
    registered fake kernel, so a public op exercises the backend code it dispatches to; each
    output must match the fake kernel's declaration (shape, dtype, device), which is what
    torch.compile traces with.
  - Every Triton launch (`kernel[grid](...)`, autotuned or not) is replaced by a double that
    checks the launch against the kernel's contract (calrft_kernels/triton/launch_contract.py:
    dtypes, devices, shapes and strides of every pointer, scalars, constexprs, the grid; every
    configuration of an autotuned kernel) and records it in `launches`; nothing is compiled.
  - calrft_kernels._C becomes a CUDA build: `with_cuda` is true and each CUDA entry point of
    csrc/cuda/ is a double that checks its call against the C++ contract (the pybind11
    parameter list parsed from the source, plus the TORCH_CHECKs on shapes, dtypes and
    devices) and returns fake outputs of the declared shapes; CPU entry points stay the real ones.
  - Device probes give injected answers: the two GEMM-overload probes of calrft_kernels.chunked
    (`mm_out_dtype`, `addmm_out_dtype`), the device properties (an H100's 132 SMs), bf16
    support and autocast's CUDA check (so torch.autocast("cuda") is active), the CUDA RNG state.
  - Reads of a device value on the host (`.item()`, `bool(t)`, `float(t)`: a synchronisation on
    a GPU) get an injected answer (`host_answer`, default: True / 1 / 1.0, the healthy value of
    the package's finiteness and non-zero checks) and are recorded in `host_reads` with the
    package line that made them. Ops whose output shape depends on values (torch.unique,
    bincount) get `classes` distinct values.
  - Backward: the autograd engine refuses fake CUDA tensors ("hasPrimaryContext expects a valid
    device index"), so `Tensor.backward` and `torch.autograd.backward` run `backward()` below
    instead: the same graph, walked in dependency order in Python, each node's backward called
    with the gradients of its outputs, reduced to the input's shape and dtype as the engine does.
    It runs every backward formula (the package's registered ones included) on fake CUDA
    tensors. Not reproduced: tensor / node hooks (DDP's reducer, retain_grad), create_graph.

What it cannot check: values (fake tensors have none), Triton kernel bodies (they are checked
by the interpreter tests and on a GPU), native CUDA code (nvcc builds it; the GPU suite runs it).

`checked_launches()` is the other half: real launches (interpreted, on CPU tensors) checked
against the same contracts before they run (the test suite does this for every launch).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib
import os
import re
import sys
import traceback
import types
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from .. import _backend
from . import BindingStub

__all__ = ["FakeCuda", "LaunchRecord", "HostRead", "checked_launches", "backward",
           "KERNEL_MODULES", "launch_contract_of", "cuda_entry_points", "NativeCudaDouble"]

aten = torch.ops.aten
ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(__file__).resolve().parents[1]
# Every module of the package that defines Triton kernels (each has its LAUNCHES table).
KERNEL_MODULES = ("calrft_kernels.triton.contrastive", "calrft_kernels.triton.contrastive_chunked",
                  "calrft_kernels.triton.covariance", "calrft_kernels.triton.sigmoid_chunked")
CUDA_SOURCES = ("csrc/cuda/davidson.cu",)


# ---- Triton launches ------------------------------------------------------------------------

@dataclasses.dataclass
class LaunchRecord:
    """One checked launch: the kernel ("module.function"), its grid, its bound arguments
    (LaunchArgs: by parameter name) and the autotuning configuration it was checked with."""
    kernel: str
    grid: tuple
    args: Any
    config: Optional[dict] = None

    @property
    def name(self) -> str:
        return self.kernel.rsplit(".", 1)[1]


def launch_contract_of(kernel):
    """("module.function", Launch) of a Triton kernel (JIT, interpreted or autotuned); raises
    ContractError when its module declares no contract for it."""
    from ..triton.launch_contract import ContractError, python_function
    fn = python_function(kernel)
    module = sys.modules.get(fn.__module__)
    contract = getattr(module, "LAUNCHES", {}).get(fn.__name__)
    if contract is None:
        raise ContractError(f"launch of {fn.__module__}.{fn.__name__}: the module declares no "
                            f"launch contract for it (LAUNCHES)")
    return f"{fn.__module__}.{fn.__name__}", contract


class _LaunchChecker:
    """Replaces triton's KernelInterface.__getitem__ (every `kernel[grid](...)` goes through
    it): checks each launch against its contract, records it, and runs the real launch only when
    `run` (interpreted launches on CPU tensors)."""

    def __init__(self, run: bool, device_type: str, interpreted: bool):
        self.run, self.device_type, self.interpreted = run, device_type, interpreted
        # a launch that runs may be of a kernel outside the package (a test's own): unchecked
        self.package_only = run
        self.launches: list[LaunchRecord] = []

    @contextlib.contextmanager
    def installed(self):
        from triton.runtime.jit import KernelInterface
        original = KernelInterface.__getitem__
        checker = self

        def getitem(kernel, grid):
            def launch(*args, **kwargs):
                checker.check(kernel, grid, args, kwargs)
                if checker.run:
                    return original(kernel, grid)(*args, **kwargs)
                return None
            return launch

        KernelInterface.__getitem__ = getitem
        try:
            yield self
        finally:
            KernelInterface.__getitem__ = original

    def check(self, kernel, grid, args, kwargs):
        from triton.runtime.autotuner import Autotuner

        from ..triton.launch_contract import (ContractError, check_launch, kernel_parameters,
                                              python_function)
        if self.package_only and not python_function(kernel).__module__.startswith(
                "calrft_kernels."):
            return
        name, contract = launch_contract_of(kernel)
        params = kernel_parameters(kernel)
        configs = [None]
        if isinstance(kernel, Autotuner):
            pointers = set(contract.pointers)
            for what, names in (("key", kernel.keys), ("reset_to_zero", kernel.reset_to_zero),
                                ("restore_value", kernel.restore_value)):
                bad = [n for n in names if n not in (params if what == "key" else pointers)]
                if bad:
                    raise ContractError(f"autotuned {name}: {what} names {bad}, which are not "
                                        f"{'parameters' if what == 'key' else 'pointers'}")
            configs = list(kernel.configs)
        for config in configs:
            merged = dict(kwargs)
            if config is not None:
                clash = set(config.kwargs) & set(kwargs)
                if clash:
                    raise ContractError(f"launch of {name}: {sorted(clash)} given by the call "
                                        f"and by the autotuning configurations")
                merged.update(config.kwargs)
            bound = check_launch(name, contract, params, grid, args, merged,
                                 device_type=self.device_type, interpreted=self.interpreted)
            self.launches.append(LaunchRecord(name, bound.grid, bound,
                                              None if config is None else dict(config.kwargs)))


@contextlib.contextmanager
def checked_launches():
    """Within the block, every launch of a package kernel is checked against its contract before
    it runs (interpreted launches on CPU tensors, or real ones on a GPU). Yields the list of
    LaunchRecords."""
    interpreted = _backend.triton_interpreted()
    checker = _LaunchChecker(run=True, device_type="cpu" if interpreted else "cuda",
                             interpreted=interpreted)
    with checker.installed():
        yield checker.launches


# ---- native CUDA entry points ---------------------------------------------------------------

def cuda_entry_points() -> dict[str, str]:
    """{function: source file} of every function the CUDA sources bind (m.def("name_cuda"))."""
    out = {}
    for rel in CUDA_SOURCES:
        text = (ROOT / rel).read_text()
        for name in re.findall(r'm\.def\(\s*"([A-Za-z0-9_]+)"', text):
            out[name] = rel
    return out


class NativeCudaDouble(BindingStub):
    """A CUDA entry point of calrft_kernels._C: the call is checked against the pybind11
    parameter list (BindingStub) and then against `contract(*args)`, which raises on a call the
    C++ would refuse or mis-read and returns the fake outputs."""

    def __init__(self, function: str, contract: Callable):
        rel = cuda_entry_points()[function]
        super().__init__((ROOT / rel).read_text(), function, contract)


def _on_device(name: str, x, device) -> None:
    if x.device != device:
        raise TypeError(f"{name} is on {x.device}, the matrix on {device}: the CUDA solver "
                        f"reads it on the matrix's device")


def _smallest_eig_cuda(matrix, v0, factor, delta, nev, tol, max_iter):
    """csrc/cuda/davidson.cu smallest_eig_cuda: TORCH_CHECKs (a square CUDA matrix, v0 empty or
    d entries, factor empty or [d, d], 1 <= nev <= d, max_iter >= 0) and what its body assumes
    (eigen.py's policy: the whole symmetric matrix in fp64, v0 fp64 and the factor fp32 on its
    device). Returns the result dict of csrc/common/solve_result.h."""
    if matrix.device.type != "cuda" or matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise RuntimeError("matrix must be a square CUDA tensor")
    if matrix.dtype != torch.float64 or not matrix.is_contiguous():
        raise TypeError(f"matrix: the Python layer passes the contiguous fp64 matrix, got "
                        f"{matrix.dtype}")
    d = matrix.shape[0]
    if v0.numel() not in (0, d):
        raise RuntimeError(f"v0 must be empty or hold {d} entries")
    if factor.numel() and tuple(factor.shape) != (d, d):
        raise RuntimeError(f"factor must be empty or [{d}, {d}]")
    if not (1 <= nev <= d and max_iter >= 0):
        raise RuntimeError("bad nev / max_iter")
    blk = min(d, max(nev, 8))
    mmax = min(d, 48, max(6 * blk, min(d, 2 * blk) + blk))
    if not (2 * blk <= mmax or mmax == d):
        raise RuntimeError("nev too large for the CUDA solver")
    if v0.numel():
        _on_device("v0", v0, matrix.device)
        if v0.dtype != torch.float64:
            raise TypeError(f"v0 must be fp64, got {v0.dtype}")
    if factor.numel():
        _on_device("factor", factor, matrix.device)
        if factor.dtype != torch.float32:
            raise TypeError(f"factor must be the fp32 Cholesky factor, got {factor.dtype}")
    return {"values": matrix.new_zeros(nev), "vectors": matrix.new_zeros(d, nev),
            "factor": factor if factor.numel() else matrix.new_zeros(d, d, dtype=torch.float32),
            "delta": float(delta) if factor.numel() else 1e-6, "iterations": 1,
            "converged": True, "estimate": 0.0, "status": "ok"}


CUDA_CONTRACTS = {"smallest_eig_cuda": _smallest_eig_cuda}


class _NativeBuild:
    """calrft_kernels._C as built with CUDA (the real module's CPU functions, doubles for the
    CUDA entry points) or without it (no CUDA entry points, whatever this machine built)."""

    def __init__(self, real, doubles: Optional[dict]):
        self._real, self._doubles = real, doubles
        self.with_cuda = doubles is not None

    def __getattr__(self, name):
        if self._doubles is not None and name in self._doubles:
            return self._doubles[name]
        if self._real is None or (self._doubles is None and name in cuda_entry_points()):
            raise AttributeError(name)
        return getattr(self._real, name)


# ---- host reads -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class HostRead:
    """A device value read on the host (a synchronisation on a GPU): where, and of what."""
    site: str            # "calrft_kernels/pairs.py:123 in check_tensor_scalars_finite"
    device: str          # "cuda": a synchronisation on a GPU; "cpu": a host tensor's value
    dtype: torch.dtype
    answer: Any


def _default_answer(x: torch.Tensor):
    if x.dtype == torch.bool:
        return True
    if not x.is_floating_point() and not x.is_complex():
        return 1
    return 1.0


def _package_site() -> str:
    """The innermost frame of the package's own code (calrft_kernels, calrft) outside this
    harness, as "path:line in function"."""
    here = Path(__file__).resolve()
    roots = (PACKAGE, ROOT / "python" / "calrft")
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if path == here or path.parent == here.parent:
            continue
        if any(root in path.parents for root in roots):
            return f"{path.relative_to(ROOT)}:{frame.lineno} in {frame.name}"
    return "outside the package"


class _Mode(FakeTensorMode):
    """FakeTensorMode with injected answers for host reads and value-dependent shapes."""

    def __init__(self, harness: "FakeCuda"):
        super().__init__(allow_non_fake_inputs=True)
        self.harness = harness
        # no dispatch cache: a cached bool(t) / t.item() would skip the host read it makes
        # (and hide the ops a cached op decomposes into from `ops`)
        self.cache_enabled = False
        self._depth = 0

    def __deepcopy__(self, memo):
        return self      # fake tensors refer to their mode: a copied module shares it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        h = self.harness
        if self._depth == 0:          # an op called from Python, not one it decomposes into
            h.ops[str(func)] += 1
        if func is aten._local_scalar_dense.default:
            return h._read(args[0].device, args[0])
        if func in (aten.allclose.default, aten.equal.default):     # a Python bool
            return h._read(args[0].device, torch.empty((), dtype=torch.bool, device="meta"))
        if func is aten._unique2.default:
            x, k = args[0], h.classes
            opts = {**dict(zip(("sorted", "return_inverse", "return_counts"), args[1:])),
                    **kwargs}
            with self:
                return (x.new_empty(k),
                        x.new_empty(x.shape if opts.get("return_inverse") else 0,
                                    dtype=torch.int64),
                        x.new_empty(k if opts.get("return_counts") else 0, dtype=torch.int64))
        if func is aten.bincount.default:
            x, weights, minlength = (list(args) + [kwargs.get("weights"),
                                                   kwargs.get("minlength", 0)])[:3]
            if not minlength:
                raise RuntimeError("fake CUDA: bincount without minlength has a value-dependent "
                                   "size; the harness answers only bincount(..., minlength=k)")
            dtype = torch.int64 if weights is None else weights.dtype
            with self:
                return x.new_empty(minlength, dtype=dtype)
        self._depth += 1
        try:
            return super().__torch_dispatch__(func, types, args, kwargs)
        finally:
            self._depth -= 1


def _route_custom_ops(mode_type) -> None:
    """Make the package's custom ops run their implementation under `mode_type` (instead of
    their fake kernel), and check that what it returns matches what the registered fake kernel
    declares (what torch.compile traces with): idempotent."""
    import torch._library.custom_ops as custom_ops
    for name, op in list(custom_ops.OPDEFS.items()):
        if not name.startswith("calrft::") or mode_type in getattr(op, "_torch_dispatch_fns", {}):
            continue

        def through(mode, func, types, args, kwargs, op=op, name=name):
            with mode:
                out = op._init_fn(*args, **kwargs)
                declared = op._abstract_fn(*args, **kwargs)
            _check_like_fake_kernel(name, out, declared)
            return out
        op.register_torch_dispatch(mode_type, through)


def _check_like_fake_kernel(name: str, out, declared) -> None:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    want = declared if isinstance(declared, (tuple, list)) else (declared,)
    if len(outs) != len(want):
        raise TypeError(f"{name} returned {len(outs)} outputs, its fake kernel {len(want)}")
    for i, (o, w) in enumerate(zip(outs, want)):
        got, exp = (tuple(o.shape), o.dtype, o.device), (tuple(w.shape), w.dtype, w.device)
        if got != exp:
            raise TypeError(f"{name} output {i}: the implementation returned {got}, its "
                            f"registered fake kernel declares {exp}")


# ---- backward without the engine ------------------------------------------------------------

def backward(tensors, grad_tensors=None, inputs=None) -> None:
    """torch.autograd.backward's effect (gradients accumulated into the leaves' .grad), computed
    by calling each graph node's backward in Python, in dependency order; see the module doc.
    inputs: accumulate only into these leaves."""
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    if grad_tensors is None:
        grad_tensors = [None] * len(tensors)
    elif isinstance(grad_tensors, torch.Tensor):
        grad_tensors = [grad_tensors]
    if len(grad_tensors) != len(tensors):
        raise RuntimeError(f"{len(grad_tensors)} gradients for {len(tensors)} tensors")
    only = None if inputs is None else {id(t) for t in (
        [inputs] if isinstance(inputs, torch.Tensor) else inputs)}
    pending: dict = collections.defaultdict(dict)    # node -> {input slot: gradient}
    roots = []
    for t, g in zip(tensors, grad_tensors):
        if not t.requires_grad:
            raise RuntimeError("element of tensors does not require grad")
        if g is None:
            if t.numel() != 1:
                raise RuntimeError("grad can be implicitly created only for scalar outputs")
            g = torch.ones_like(t)
        if t.grad_fn is None:            # a leaf
            _accumulate(t, g, only)
            continue
        slot = pending[t.grad_fn]
        slot[t.output_nr] = g if t.output_nr not in slot else slot[t.output_nr] + g
        roots.append(t.grad_fn)
    # dependencies: how many edges of the reachable graph enter each node
    deps = collections.Counter()
    seen, stack = set(), list(roots)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is not None:
                deps[nxt] += 1
                stack.append(nxt)
    ready = [n for n in dict.fromkeys(roots) if deps[n] == 0]
    with torch.no_grad():
        while ready:
            node = ready.pop()
            grads = pending.pop(node, {})
            if hasattr(node, "variable"):        # AccumulateGrad
                if 0 in grads:
                    _accumulate(node.variable, grads[0], only)
                continue
            outs = _call_node(node, grads) if grads else (None,) * len(node.next_functions)
            for (nxt, slot), g in zip(node.next_functions, outs):
                if nxt is None:
                    continue
                if g is not None:
                    g = _like_input(g, nxt._input_metadata[slot], node)
                    bucket = pending[nxt]
                    bucket[slot] = g if slot not in bucket else bucket[slot] + g
                deps[nxt] -= 1
                if deps[nxt] == 0:
                    ready.append(nxt)


def _call_node(node, grads: dict) -> tuple:
    """A node's backward on the gradients of its outputs (None for the ones without). C++ nodes
    are callable; a Python Function's node runs its backward through `apply`, with absent
    gradients materialised as zeros, as the engine does for it."""
    metas = node._input_metadata
    if callable(node):
        outs = node(*[grads.get(i) for i in range(len(metas))])
    else:
        outs = node.apply(*[grads[i] if i in grads else torch.zeros(
            tuple(m.shape), dtype=m.dtype, device=m.device) for i, m in enumerate(metas)])
    return outs if isinstance(outs, tuple) else (outs,)


def _like_input(g, meta, node):
    """What the engine's validate_outputs does: sum a broadcast gradient down to the input's
    shape, cast it to the input's dtype; a device mismatch is an error."""
    shape = tuple(meta.shape)
    if tuple(g.shape) != shape:
        g = g.sum_to_size(shape)
    if g.dtype != meta.dtype:
        g = g.to(meta.dtype)
    if g.device != meta.device:
        raise RuntimeError(f"{node.name()}: a gradient on {g.device} for an input on "
                           f"{meta.device}")
    return g


def _accumulate(leaf, g, only) -> None:
    if only is not None and id(leaf) not in only:
        return
    if tuple(g.shape) != tuple(leaf.shape) or g.dtype != leaf.dtype or g.device != leaf.device:
        raise RuntimeError(f"a gradient {tuple(g.shape)} {g.dtype} {g.device} for a leaf "
                           f"{tuple(leaf.shape)} {leaf.dtype} {leaf.device}")
    leaf.grad = g.detach() if leaf.grad is None else leaf.grad + g.detach()


def _tensor_backward(self, gradient=None, retain_graph=None, create_graph=False, inputs=None):
    if create_graph:
        raise NotImplementedError("fake CUDA backward: create_graph is not supported")
    backward([self], [gradient], inputs)


def _autograd_backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False,
                       grad_variables=None, inputs=None):
    if create_graph:
        raise NotImplementedError("fake CUDA backward: create_graph is not supported")
    backward(tensors, grad_tensors, inputs)


# ---- the harness ----------------------------------------------------------------------------

class _FakeGroup:
    """torch.distributed as calrft_kernels.distributed uses it, for one rank of a fake group."""

    def __init__(self, rank: int, world: int, log: list):
        self.rank, self.world, self.log = rank, world, log

    def get_rank(self, group=None) -> int:
        self._group(group)
        return self.rank

    def get_world_size(self, group=None) -> int:
        self._group(group)
        return self.world

    def all_gather(self, parts, x, group=None) -> None:
        self._group(group)
        if len(parts) != self.world:
            raise RuntimeError(f"all_gather: {len(parts)} outputs for {self.world} ranks")
        for p in parts:
            if p.shape != x.shape or p.dtype != x.dtype or p.device != x.device:
                raise RuntimeError(f"all_gather: output {tuple(p.shape)} {p.dtype} {p.device} "
                                   f"for input {tuple(x.shape)} {x.dtype} {x.device}")
        if x.device.type != "cuda" or not x.is_contiguous():
            raise RuntimeError("all_gather: NCCL gathers contiguous CUDA tensors")
        self.log.append(("all_gather", tuple(x.shape), x.dtype, str(x.device)))

    def all_reduce(self, x, group=None, **kwargs) -> None:
        self._group(group)
        if x.device.type != "cuda" or not x.is_contiguous():
            raise RuntimeError("all_reduce: NCCL reduces contiguous CUDA tensors")
        self.log.append(("all_reduce", tuple(x.shape), x.dtype, str(x.device)))

    def _group(self, group) -> None:
        if group is not self:
            raise RuntimeError(f"a collective on {group!r}, not on the fake process group")


# What torch.cuda.get_device_properties answers inside the block (the fields the package reads).
H100 = types.SimpleNamespace(name="fake NVIDIA H100 (calrft_kernels.testing.fake_cuda)", major=9,
                             minor=0, multi_processor_count=132, total_memory=80 * 2 ** 30)


class FakeCuda:
    """The context manager of the module doc. Arguments: the injected probe answers
    (mm_out_dtype: torch.mm(half, half, out_dtype=fp32) exists; addmm_out_dtype: torch.addmm's
    fp32-self form exists and is right), host_answer(tensor) -> the value of a host read,
    classes: the number of distinct values torch.unique reports, native_cuda: whether
    calrft_kernels._C is a CUDA build (False: a build without CUDA, whatever this machine
    built). Inside the block:
    `launches` (LaunchRecord), `host_reads` (HostRead), `native_calls` ({entry point: calls})."""

    def __init__(self, *, mm_out_dtype: bool = True, addmm_out_dtype: bool = True,
                 host_answer: Optional[Callable] = None, classes: int = 4,
                 native_cuda: bool = True, properties=H100):
        self.mm_out_dtype, self.addmm_out_dtype = mm_out_dtype, addmm_out_dtype
        self.host_answer = host_answer or _default_answer
        self.classes, self.native_cuda, self.properties = classes, native_cuda, properties
        self.host_reads: list[HostRead] = []
        self.native_calls: dict[str, list] = {}
        # the aten ops the Python code called (not the ones they decompose into), by name
        self.ops: collections.Counter = collections.Counter()
        self.collectives: list[tuple] = []                      # (name, shape, dtype, device)
        self._checker = _LaunchChecker(run=False, device_type="cuda", interpreted=False)
        self._stack: Optional[contextlib.ExitStack] = None
        self.mode: Optional[_Mode] = None

    def _read(self, device, value: torch.Tensor):
        answer = self.host_answer(value)
        self.host_reads.append(HostRead(_package_site(), device.type, value.dtype, answer))
        return answer

    @property
    def launches(self) -> list[LaunchRecord]:
        return self._checker.launches

    def launched(self, name: str) -> list[LaunchRecord]:
        """The recorded launches of the kernel function `name` (e.g. "_chunk_ds_kernel")."""
        return [r for r in self.launches if r.name == name]

    def syncs(self, path_part: str = "") -> list[HostRead]:
        """The host reads of CUDA values (GPU synchronisations) made at a site containing
        `path_part`."""
        return [r for r in self.host_reads if r.device == "cuda" and path_part in r.site]

    def __enter__(self) -> "FakeCuda":
        # Imported before the mode: module-level code may read device values (triton's
        # contrastive kernels compute a constant with .item()).
        for name in KERNEL_MODULES + ("calrft_kernels.chunked", "calrft_kernels.eigen",
                                      "calrft_kernels.orthogonality"):
            importlib.import_module(name)
        from .. import chunked
        stack = contextlib.ExitStack()
        self._stack = stack
        try:
            # the launchers read TRITON_INTERPRET at call time: a fake CUDA launch is a GPU
            # launch (the GPU's configurations, autotuning and operand types)
            old = os.environ.get("TRITON_INTERPRET")
            os.environ["TRITON_INTERPRET"] = "0"
            stack.callback(_restore_env, "TRITON_INTERPRET", old)
            self.patch(chunked, "_OUT_DTYPE_OK", {"cuda:0": self.mm_out_dtype})
            self.patch(chunked, "_ADDMM_OUT_DTYPE_OK", {"cuda:0": self.addmm_out_dtype})
            doubles = None
            if self.native_cuda:
                doubles = {name: NativeCudaDouble(name, contract)
                           for name, contract in CUDA_CONTRACTS.items()}
                self.native_calls.update({name: d.calls for name, d in doubles.items()})
            self.patch(_backend, "_NATIVE", (_NativeBuild(_backend.native()[0], doubles), ""))
            cuda = torch.cuda
            self.patch(cuda, "get_device_properties", lambda device=None: self.properties)
            self.patch(cuda, "is_bf16_supported", lambda *a, **k: True)
            self.patch(cuda.amp.common, "amp_definitely_not_available", lambda: False)
            rng = {}      # the CUDA generator's state per device (the cached step replays it)
            self.patch(cuda, "get_rng_state", lambda device="cuda": rng.get(
                str(device), torch.zeros(16, dtype=torch.uint8)))
            self.patch(cuda, "set_rng_state", lambda state, device="cuda": rng.__setitem__(
                str(device), state.clone()))
            self.patch(torch.Tensor, "backward", _tensor_backward)
            self.patch(torch.autograd, "backward", _autograd_backward)
            stack.enter_context(self._checker.installed())
            _route_custom_ops(_Mode)
            self.mode = _Mode(self)
            stack.enter_context(self.mode)
        except BaseException:
            stack.close()
            raise
        return self

    def patch(self, owner, name: str, value) -> None:
        """Replace owner.name by value until the block ends (e.g. a torch without an overload)."""
        if self._stack is None:
            raise RuntimeError("patch() is used inside the FakeCuda block")
        old = getattr(owner, name)
        setattr(owner, name, value)
        self._stack.callback(setattr, owner, name, old)

    def __exit__(self, *exc):
        stack, self._stack = self._stack, None
        return stack.__exit__(*exc)

    @contextlib.contextmanager
    def paused(self):
        """Real tensors inside this block (e.g. a data loader's batches, which a GPU run also
        builds on the host); the doubles stay installed."""
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        with unset_fake_temporarily():
            yield

    def process_group(self, rank: int = 1, world: int = 2):
        """A process group of `world` ranks in which this process is `rank`, for the rest of the
        block: calrft_kernels.distributed's collectives become doubles that check their tensors
        (on the features' CUDA device, equal shapes and dtypes) and record them in
        `collectives`; the other ranks' rows are fake like everything else."""
        from .. import distributed
        group = _FakeGroup(rank, world, self.collectives)
        self.patch(distributed, "dist", group)
        return group

    def tensor(self, *shape, dtype=torch.float32, requires_grad=False):
        """A fake CUDA tensor (inside the block)."""
        return torch.empty(*shape, dtype=dtype, device="cuda").requires_grad_(requires_grad)


def _restore_env(key: str, old: Optional[str]) -> None:
    if old is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = old
