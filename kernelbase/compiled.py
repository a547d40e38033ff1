"""The optional compiled modules (`moeblaze._C`, `overlap._C`, built from csrc/): loading them,
why one is not active, and the checks their Python launchers share.

    load("moeblaze")  -> the imported moeblaze._C, or None (the reason is remembered)
    status()          -> {"moeblaze._C": "active" | why not, "overlap._C": ...}

A module is missing when the install did not build it (no nvcc or cmake, or
MOEBLAZE_SKIP_CUDA_BUILD=1: setup.py records which in `_csrc_build.json` beside this file), fails
to import (the import error is kept), or cannot run here (no driver, no CUDA device, a driver
older than the module's CUDA runtime, no kernel image for the GPU). The packages then use their
Triton / torch paths.

`load` and `status` initialise the CUDA driver, as `torch.cuda.is_available()` does; where the
device is usable they also load a kernel image (creating the primary context PyTorch uses if none
exists yet). Call them when a CUDA op runs, not at import time. Results are cached per process.
"""

import importlib
import json
from pathlib import Path
from types import ModuleType

import torch

PACKAGES = ("moeblaze", "overlap")
BUILD_RECORD = Path(__file__).with_name("_csrc_build.json")

_modules: dict[str, ModuleType | None] = {}
_reasons: dict[str, str] = {}


def load(package: str) -> ModuleType | None:
    """The compiled module `<package>._C` if it is built and can run here, else None."""
    if package not in PACKAGES:
        raise ValueError(f"package must be one of {PACKAGES}, got {package!r}")
    if package not in _modules:
        _modules[package], _reasons[package] = _load(package)
    return _modules[package]


def reason(package: str) -> str:
    """Why `load(package)` returned None ("" when the module is active)."""
    load(package)
    return _reasons[package]


def require(package: str) -> ModuleType:
    """`load(package)`, or RuntimeError saying why the compiled module is not available."""
    module = load(package)
    if module is None:
        raise RuntimeError(f"{package}._C is not available: {_reasons[package]}")
    return module


def status() -> dict[str, str]:
    """One line per compiled module: "active", or the reason it is not."""
    return {f"{p}._C": "active" if load(p) is not None else _reasons[p] for p in PACKAGES}


def _load(package: str) -> tuple[ModuleType | None, str]:
    name = f"{package}._C"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            return None, f"import failed: {exc}"
        return None, f"not built: {_build_record().get(name, _NO_RECORD)}"
    except ImportError as exc:  # built, but the shared library does not load
        return None, f"import failed: {exc}"
    info = module.kernel_info()
    if not info["usable"]:
        return None, f"built for CUDA {info['cuda_runtime']}, but cannot run here: {info['reason']}"
    return module, ""


_NO_RECORD = (
    "no compiled module found and no build record; install with nvcc and cmake on PATH "
    "(pip install -e .) to build csrc/"
)


def _build_record() -> dict[str, str]:
    try:
        return json.loads(BUILD_RECORD.read_text())
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------------
# Checks shared by the launchers: they name the argument, the value and what was expected.


def check_cuda_tensor(
    name: str,
    tensor: object,
    dtypes: tuple[torch.dtype, ...],
    *,
    dim: int | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """`tensor` must be a contiguous CUDA tensor of one of `dtypes` (and `dim` dims, on `device`)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in dtypes:
        expected = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {expected}, got {tensor.dtype}")
    if dim is not None and tensor.dim() != dim:
        raise ValueError(f"{name} must have {dim} dims, got shape {tuple(tensor.shape)}")
    if not tensor.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous, got shape {tuple(tensor.shape)} stride {tensor.stride()}"
        )
    if tensor.device.type != "cuda":
        raise ValueError(f"{name} must be a CUDA tensor, got a tensor on {tensor.device}")
    if device is not None and tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, expected {device} (the other inputs')")
    return tensor


def stream_handle(device: torch.device) -> int:
    """The handle of the current stream of `device`: `torch.cuda.current_stream(device).cuda_stream`
    read without building a Stream object (the getter Triton's launcher uses), as an int."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw(device.index)
    return torch.cuda.current_stream(device).cuda_stream
