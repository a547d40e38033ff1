"""Checks of the plain arguments of public constructors and functions (sizes, flags,
coefficients, dtypes): each error names the argument and the value passed, before the value
reaches torch or Triton, whose own errors would name neither.

    check_int      an int (not a bool) >= minimum
    check_bool     a bool (not a truthy string or number)
    check_real     a real number (not a bool or a string)
    check_number   a finite real number >= minimum
    check_dtype    None or one of the floating dtypes the kernels compute in
"""

import math
import numbers

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def check_real(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")


def check_number(name: str, value, minimum: float = 0.0) -> None:
    check_real(name, value)
    if not (math.isfinite(value) and value >= minimum):
        raise ValueError(f"{name}={value} must be >= {minimum:g} and finite")


def check_dtype(name: str, dtype) -> None:
    if dtype is not None and dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name} must be None, torch.float16, bfloat16 or float32, got {dtype!r}")
