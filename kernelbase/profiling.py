"""One helper that names a region both for Nsight Systems and for torch.profiler.

`nsys profile` shows NVTX ranges; `torch.profiler` traces show `record_function` ranges. Opening
both from one place keeps the names identical, and lets tests check the ranges on any machine.

Ranges sit on every op's hot path, so one costs little when nothing records it: the
torch.profiler range is opened only while a torch profiler runs (`record_function` costs ~10 us
of host time per range even then: a dispatcher call in and one out), the NVTX range only where
CUDA is available (a push and a pop, ~1 us; nsys records them without any switch here).
"""

import torch


class profile_range:  # noqa: N801 (a context manager used like a function)
    """Open an NVTX range (when CUDA is available) and, while a torch profiler runs, a
    torch.profiler range, both named `name`.

    Under torch.compile tracing it opens nothing: the custom ops open their ranges when they run.
    """

    __slots__ = ("name", "nvtx", "recorded")

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.nvtx = self.recorded = None
        if torch.compiler.is_compiling():
            return
        self.nvtx = torch.cuda.is_available()
        if self.nvtx:
            torch.cuda.nvtx.range_push(self.name)
        if torch.autograd._profiler_enabled():
            self.recorded = torch.profiler.record_function(self.name)
            self.recorded.__enter__()

    def __exit__(self, *exc):
        if self.recorded is not None:
            self.recorded.__exit__(*exc)
        if self.nvtx:
            torch.cuda.nvtx.range_pop()
