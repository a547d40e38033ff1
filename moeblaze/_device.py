"""Where the Triton kernels can run, decided in one place."""

import os

import torch


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA devices, and on the CPU under the interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and interpreting())
