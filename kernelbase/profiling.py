"""One helper that names a region both for Nsight Systems and for torch.profiler.

`nsys profile` shows NVTX ranges; `torch.profiler` traces show `record_function` ranges. Opening
both from one place keeps the names identical, and lets tests check the ranges on any machine.
"""

import contextlib

import torch


@contextlib.contextmanager
def profile_range(name: str):
    """Open an NVTX range (when CUDA is available) and a torch.profiler range named `name`.

    Under torch.compile tracing it opens nothing: the custom ops open their ranges when they run.
    """
    if torch.compiler.is_compiling():
        yield
        return
    use_nvtx = torch.cuda.is_available()
    if use_nvtx:
        torch.cuda.nvtx.range_push(name)
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if use_nvtx:
            torch.cuda.nvtx.range_pop()
