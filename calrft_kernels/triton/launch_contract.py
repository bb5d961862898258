"""Launch contracts: what each Triton kernel of the package must receive, stated next to it.

A Triton kernel indexes raw pointers with the sizes it is given; a launch that passes a tensor of
the wrong dtype, shape or layout computes garbage or writes out of bounds, and on a GPU that
shows only as wrong numbers or a corrupted allocation. Each kernel module therefore declares a
`LAUNCHES` table, {kernel function name: Launch(...)}, and `check_launch` checks one launch
against it:

  - the call binds to the kernel's parameter list (every parameter once, launch options aside),
    and the contract names exactly the kernel's parameters (pointers, integer / float scalars,
    constexprs), so a new parameter cannot go unchecked;
  - the grid is the one the contract derives from the arguments;
  - every pointer the kernel reads (`when` holds) is a tensor on the launch's device with an
    allowed dtype, exactly the declared shape and row-major contiguous (or the strides passed
    next to it); a placeholder (`when` false) need only be a tensor on that device;
  - scalars are Python ints / floats (what the kernel is specialised on), constexprs pass their
    rule, and the cross-argument rules (`rules`) hold.

Who checks: calrft_kernels.testing.fake_cuda runs every launch site of the package on fake CUDA
tensors against these tables, and the test suite checks every interpreted launch
(TRITON_INTERPRET=1, CPU tensors) against them too, so a contract that disagrees with a launch
whose numbers the tests verify fails there. Pure Python: importing this module needs no GPU.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Optional

import torch

__all__ = ["Ptr", "Launch", "LaunchArgs", "ContractError", "check_launch", "kernel_parameters",
           "python_function", "F32", "HALF_OR_F32", "FLOAT", "LAUNCH_OPTIONS", "is_bool",
           "power_of_two"]

F32 = (torch.float32,)
HALF_OR_F32 = (torch.float32, torch.float16, torch.bfloat16)
FLOAT = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# Keyword arguments of a launch that are not kernel parameters.
LAUNCH_OPTIONS = frozenset({"num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion",
                            "launch_cooperative_grid", "launch_pdl"})
INT32_MAX = 2 ** 31 - 1


def is_bool(value, args) -> bool:
    """Constexpr rule: a Python bool (a flag the kernel branches on at compile time)."""
    return isinstance(value, bool)


def power_of_two(value, args) -> bool:
    """Constexpr rule: a positive power-of-two int (tl.arange extents)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1 \
        and value & (value - 1) == 0


class ContractError(TypeError):
    """A launch that breaks its kernel's contract (a TypeError: a wrong argument)."""


class LaunchArgs:
    """The bound arguments of one launch by parameter name, plus `grid` (the evaluated grid,
    when known) and `interpreted` (a TRITON_INTERPRET=1 launch on CPU tensors)."""

    def __init__(self, values: dict, grid: Optional[tuple], interpreted: bool):
        self.__dict__.update(values)
        self.values, self.grid, self.interpreted = values, grid, interpreted

    def __repr__(self):
        return f"LaunchArgs({', '.join(self.values)})"


@dataclasses.dataclass(frozen=True)
class Ptr:
    """A pointer parameter. shape(args): the extent the kernel indexes; dtypes: the allowed
    dtypes, or a function of the args returning them; strides(args): the (element) strides the
    kernel is given for it, None for row-major contiguous; when(args): whether the kernel reads
    it at all (else a placeholder: any tensor on the launch device); at_least: the tensor may be
    longer than shape (a 1-D table indexed below shape[0])."""
    shape: Callable[[LaunchArgs], tuple]
    dtypes: Any = F32
    strides: Optional[Callable[[LaunchArgs], tuple]] = None
    when: Optional[Callable[[LaunchArgs], bool]] = None
    at_least: bool = False


@dataclasses.dataclass(frozen=True)
class Launch:
    """A kernel's contract. grid(args): the grid it must be launched with; pointers: Ptr per
    pointer parameter; ints / floats: the names of its integer / float scalar parameters (ints
    must be >= 0); constexprs: {name: rule(value, args) -> bool}; rules: [(message,
    rule(args) -> bool)] across arguments; int32_offsets: pointers whose element offsets the
    kernel computes in int32 (each must hold fewer than 2^31 elements)."""
    grid: Callable[[LaunchArgs], tuple]
    pointers: dict
    ints: tuple = ()
    floats: tuple = ()
    constexprs: dict = dataclasses.field(default_factory=dict)
    rules: tuple = ()
    int32_offsets: tuple = ()

    def names(self) -> set:
        return set(self.pointers) | set(self.ints) | set(self.floats) | set(self.constexprs)


def python_function(kernel):
    """The Python function under a Triton kernel (JIT, interpreted or autotuned)."""
    fn = kernel
    while hasattr(fn, "fn"):
        fn = fn.fn
    return fn


def kernel_parameters(kernel) -> list[str]:
    """The parameter names of a @triton.jit function (compiled or interpreted)."""
    return list(inspect.signature(python_function(kernel)).parameters)


def _fail(kernel_name: str, message: str):
    raise ContractError(f"launch of {kernel_name}: {message}")


def check_launch(kernel_name: str, contract: Launch, params: list[str], grid, args: tuple,
                 kwargs: dict, *, device_type: str = "cuda",
                 interpreted: bool = False) -> LaunchArgs:
    """Check one launch (`kernel[grid](*args, **kwargs)`) against `contract`; return its bound
    arguments. grid: a tuple, or a function of the bound arguments (an autotuned launch's).
    device_type: the device every tensor must be on ("cuda"; "cpu" for interpreted launches).
    Raises ContractError naming the kernel and the argument."""
    extra = set(contract.names()) ^ set(params)
    if extra:
        _fail(kernel_name, f"the contract and the kernel disagree on the parameters "
                           f"{sorted(extra)}")
    if len(args) > len(params):
        _fail(kernel_name, f"{len(args)} positional arguments for {len(params)} parameters")
    values = dict(zip(params, args))
    for name, value in kwargs.items():
        if name in LAUNCH_OPTIONS:
            continue
        if name not in params:
            _fail(kernel_name, f"unknown argument {name!r}")
        if name in values:
            _fail(kernel_name, f"argument {name!r} given twice")
        values[name] = value
    missing = [p for p in params if p not in values]
    if missing:
        _fail(kernel_name, f"missing arguments {missing}")
    evaluated = grid(dict(values)) if callable(grid) else grid
    if not (isinstance(evaluated, tuple) and 1 <= len(evaluated) <= 3 and
            all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in evaluated)):
        _fail(kernel_name, f"the grid must be a tuple of 1 to 3 positive ints, got {evaluated!r}")
    a = LaunchArgs(values, evaluated, interpreted)
    for name in contract.ints:
        v = values[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            _fail(kernel_name, f"{name} must be a Python int >= 0, got {type(v).__name__} {v!r}")
    for name in contract.floats:
        v = values[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            _fail(kernel_name, f"{name} must be a Python float, got {type(v).__name__} {v!r}")
    for name, rule in contract.constexprs.items():
        if not rule(values[name], a):
            _fail(kernel_name, f"constexpr {name}={values[name]!r} breaks its rule")
    want = tuple(contract.grid(a))
    if evaluated != want:
        _fail(kernel_name, f"grid {evaluated} but the arguments need {want}")
    for name, ptr in contract.pointers.items():
        _check_pointer(kernel_name, name, ptr, values[name], a, device_type)
    for name in contract.int32_offsets:
        if values[name].numel() > INT32_MAX:
            _fail(kernel_name, f"{name} holds {values[name].numel()} elements: beyond the "
                               f"kernel's int32 offsets")
    for message, rule in contract.rules:
        if not rule(a):
            _fail(kernel_name, message)
    return a


def _check_pointer(kernel_name, name, ptr: Ptr, x, a: LaunchArgs, device_type: str) -> None:
    if not isinstance(x, torch.Tensor):
        _fail(kernel_name, f"{name} must be a tensor, got {type(x).__name__}")
    if x.device.type != device_type:
        _fail(kernel_name, f"{name} is on {x.device}, the launch on {device_type}")
    if ptr.when is not None and not ptr.when(a):
        return  # a placeholder the kernel does not read
    dtypes = ptr.dtypes(a) if callable(ptr.dtypes) else ptr.dtypes
    if x.dtype not in dtypes:
        _fail(kernel_name, f"{name} has dtype {x.dtype}, the kernel reads "
                           f"{' / '.join(str(d) for d in dtypes)}")
    shape = tuple(int(s) for s in ptr.shape(a))
    got = tuple(x.shape)
    if ptr.at_least:
        if len(got) != len(shape) or any(g < s for g, s in zip(got, shape)):
            _fail(kernel_name, f"{name} has shape {got}, the kernel indexes up to {shape}")
    elif got != shape:
        _fail(kernel_name, f"{name} has shape {got}, the kernel indexes {shape}")
    if ptr.strides is not None:
        strides = tuple(int(s) for s in ptr.strides(a))
        if tuple(x.stride()) != strides and x.numel() > 1:
            _fail(kernel_name, f"{name} has strides {tuple(x.stride())}, the kernel is told "
                               f"{strides}")
    elif not x.is_contiguous():
        _fail(kernel_name, f"{name} must be row-major contiguous, got strides "
                           f"{tuple(x.stride())} for shape {got}")
