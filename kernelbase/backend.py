"""Which implementation of the kernels runs on a device, decided in one place.

    Backend.TRITON       Triton kernels compiled for the GPU (CUDA tensors)
    Backend.INTERPRETER  the same Triton kernels under Triton's CPU interpreter
    Backend.TORCH        torch ops computing the same stages (any device, no Triton)

`backend_for(device)` is what every op of `moeblaze` and `overlap` asks. Automatic choice: CUDA
runs TRITON; the CPU runs INTERPRETER when the interpreter is on, else TORCH. `set_backend`
(or the `use_backend` context) forces one, for example `set_backend("torch")` to run the torch
stages on a GPU as a cross-check.

The interpreter is on when `TRITON_INTERPRET=1` was in the environment when this module was first
imported (importing `moeblaze` or `overlap` imports it). Triton reads that variable when it
defines a kernel, so it cannot be switched on or off later: set it before the first import. The
variable is read once, here; a later change of it only produces a warning that says so.
"""

import contextlib
import enum
import os
import warnings

import torch
from torch._subclasses.fake_tensor import is_fake

from kernelbase import compiled

INTERPRETER_ON = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Passed by every Triton launch of moeblaze and overlap: a * b + c contracted into one FMA, as the
# kernels were tuned and tested. Left to Triton, the choice follows its default, which Triton 3.9
# warns will turn to no contraction in 3.10 (other code, other numbers).
COMPILE_OPTIONS = {"enable_fp_fusion": True}


class Backend(enum.Enum):
    TRITON = "triton"
    INTERPRETER = "interpreter"
    TORCH = "torch"


_forced: Backend | None = None
_warned_late_interpreter = False


def parse_backend(backend: "str | Backend | None") -> Backend | None:
    if backend is None or isinstance(backend, Backend):
        return backend
    try:
        return Backend(backend)
    except ValueError:
        choices = ", ".join(repr(b.value) for b in Backend)
        raise ValueError(f"backend must be None or one of {choices}, got {backend!r}") from None


def set_backend(backend: "str | Backend | None") -> None:
    """Force `backend` ("triton", "interpreter", "torch") on every device; None: automatic.

    Raises ValueError for "interpreter" when the interpreter is off (it has to be on before the
    first import) and for "triton" when it is on (then every kernel is an interpreted one).
    """
    global _forced
    backend = parse_backend(backend)
    if backend is Backend.INTERPRETER and not INTERPRETER_ON:
        raise ValueError(
            "backend 'interpreter' needs TRITON_INTERPRET=1 in the environment before moeblaze "
            "or overlap is first imported (Triton reads it when it defines the kernels)"
        )
    if backend is Backend.TRITON and INTERPRETER_ON:
        raise ValueError(
            "backend 'triton' is unavailable: TRITON_INTERPRET=1 was set when the kernels were "
            "defined, so every Triton kernel runs under the interpreter"
        )
    _forced = backend


def get_backend() -> Backend | None:
    """The backend forced by `set_backend`, or None (automatic)."""
    return _forced


@contextlib.contextmanager
def use_backend(backend: "str | Backend | None"):
    """`set_backend(backend)` for the body of a `with` block, then the previous setting."""
    before = _forced
    set_backend(backend)
    try:
        yield
    finally:
        set_backend(before)


def backend_for(device: torch.device) -> Backend:
    """The backend that runs ops on `device` (see the module docstring)."""
    if _forced is not None:
        if _forced is Backend.TRITON and device.type != "cuda":
            raise ValueError(f"backend 'triton' runs on CUDA devices only, got {device}")
        return _forced
    if INTERPRETER_ON:
        return Backend.INTERPRETER
    if device.type == "cuda":
        return Backend.TRITON
    _warn_if_interpreter_was_set_late()
    return Backend.TORCH


def has_values(t: torch.Tensor) -> bool:
    """Whether `t` holds values: not a tensor on the meta device (shape inference) or a fake one
    (under FakeTensorMode, as when a model's memory is estimated)."""
    return not (t.is_meta or is_fake(t))


def autocast_off(device_type: str):
    """A context with autocast off on `device_type`; nothing to turn off on the meta device,
    which has no autocast (torch.autocast raises there). A string comparison rather than
    torch.amp.is_autocast_available, which torch 2.11's torch.compile cannot trace."""
    if device_type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for `device_type` (never on the meta device, which has none)."""
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


def interpreting() -> bool:
    """True when the Triton kernels were defined under the CPU interpreter."""
    return INTERPRETER_ON


def late_interpreter_hint() -> str:
    """A sentence for error messages when TRITON_INTERPRET=1 was set after the first import."""
    if not INTERPRETER_ON and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return (
            " TRITON_INTERPRET=1 is set now but was not when moeblaze/overlap were first "
            "imported; Triton reads it when it defines the kernels, so set it before importing."
        )
    return ""


def _warn_if_interpreter_was_set_late() -> None:
    global _warned_late_interpreter
    hint = late_interpreter_hint()
    if hint and not _warned_late_interpreter:
        _warned_late_interpreter = True
        warnings.warn(
            "the CPU runs the torch stages, not the Triton interpreter." + hint, stacklevel=3
        )


def info() -> dict[str, str]:
    """How each device runs the kernels now, and why: one line per device and one per compiled
    module of csrc/ (kernelbase.compiled.status), for logs and bug reports."""
    forced = f"forced by set_backend({_forced.value!r})" if _forced is not None else None
    if INTERPRETER_ON:
        cpu = "interpreter: TRITON_INTERPRET=1 was set before the first import"
    else:
        cpu = "torch: TRITON_INTERPRET was not set at the first import" + late_interpreter_hint()
    if torch.cuda.is_available():
        cuda = f"triton: {torch.cuda.get_device_name()}"
    elif torch.version.cuda is None:
        cuda = f"unavailable: this torch ({torch.__version__}) is a CPU build"
    else:
        cuda = f"unavailable: no CUDA device visible (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return {"cpu": forced or cpu, "cuda": forced or cuda, **compiled.status()}
