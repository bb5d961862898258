"""Argument checks and dtype rules shared by the op families (contrastive, chunked, covariance,
eigen, orthogonality). Every check raises ValueError or TypeError naming the argument, at the
Python boundary; the kernels below assume checked input."""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x, ndim: int = 2) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")


def check_finite(name: str, x: Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinity")


def check_result_finite(name: str, source: Tensor, result: Tensor, what: str) -> None:
    """`result` (computed from the input `source`) must be finite. A NaN/inf in `source` is
    reported as such; a finite `source` whose `what` leaves the range of result's dtype is
    reported as an overflow (never as "contains NaN or infinity", which it does not)."""
    if bool(torch.isfinite(result).all()):
        return
    if not bool(torch.isfinite(source).all()):
        raise ValueError(f"{name} contains NaN or infinity")
    biggest = float(source.detach().abs().max().double())
    raise ValueError(f"{name} is finite (max |{name}| = {biggest:.3g}) but its {what} overflows "
                     f"{result.dtype} (max {torch.finfo(result.dtype).max:.3g}): rescale {name} "
                     f"or pass it in float64")


def check_square(name: str, x: Tensor) -> None:
    check_tensor(name, x)
    if x.shape[0] != x.shape[1] or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square matrix, got shape {tuple(x.shape)}")


def check_real(name: str, value, *, low: float | None = None, low_open: bool = False,
               high: float | None = None, high_open: bool = False) -> float:
    """A finite real number (int or float, not bool) inside the given bounds -> float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    bad = not math.isfinite(value)
    if low is not None:
        bad = bad or (value <= low if low_open else value < low)
    if high is not None:
        bad = bad or (value >= high if high_open else value > high)
    if bad:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        bounds = " and ".join(b for b in (lo, hi) if b)
        raise ValueError(f"{name} must be a finite number{' ' + bounds if bounds else ''}, "
                         f"got {value!r}")
    return value


def check_tol(tol, max_iter) -> None:
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not (0 < tol < 1):
        raise ValueError(f"tol must be a float in (0, 1), got {tol!r}")
    if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, int)
                                 or max_iter < 1):
        raise ValueError(f"max_iter must be a positive int or None, got {max_iter!r}")


def check_correction(correction, rows: int, name: str = "z") -> float:
    """A covariance's correction (finite, >= 0, below the number of rows of `name`). Too few rows
    for the usual corrections (0 or 1, Bessel's) is the rows' fault, and the error says so."""
    if isinstance(correction, bool) or not isinstance(correction, numbers.Real):
        raise TypeError(f"correction must be a number, got {type(correction).__name__}")
    correction = float(correction)
    if not math.isfinite(correction) or correction < 0:
        raise ValueError(f"correction must be a finite number >= 0, got {correction}")
    if rows - correction <= 0:
        if correction <= 1:
            raise ValueError(f"{name} has {rows} row{'' if rows == 1 else 's'}: a covariance needs "
                             f"at least {'one row' if correction == 0 else 'two rows'}")
        raise ValueError(f"correction must be below the number of rows of {name} ({rows}), "
                         f"got {correction}")
    return correction


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What every op accumulates in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def power_of_two_scale(x: Tensor) -> float:
    """2^k closest to max |x| (1.0 for a zero x): dividing by it is exact, and brings the entries
    to O(1) so that products of them neither underflow nor overflow."""
    biggest = float(x.detach().abs().max().double()) if x.numel() else 0.0
    if biggest == 0.0 or not math.isfinite(biggest):
        return 1.0
    return math.ldexp(1.0, math.frexp(biggest)[1] - 1)
