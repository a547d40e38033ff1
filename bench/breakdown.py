"""Where a step's time goes, from torch.profiler: the named ranges of kernelbase.profiling and
the GPU kernels.

    profile_step  profile `iters` calls of a step, after two warm-up calls
    range_times   per range with a name prefix: calls and ms per step (GPU time of the kernels
                  launched inside it on CUDA, CPU time on the CPU)
    kernel_times  per GPU kernel, the largest first: calls and ms per step (CUDA only)
"""

import dataclasses
from collections.abc import Callable

import torch
from torch.autograd import DeviceType


@dataclasses.dataclass(frozen=True)
class Timed:
    name: str
    calls: float  # per step
    ms: float  # per step, all calls


def profile_step(step: Callable[[], object], *, iters: int, device: torch.device):
    """A finished torch.profiler.profile of `iters` calls of `step` (two warm-up calls first)."""
    for _ in range(2):
        step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(iters):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return prof


def range_times(prof, prefix: str, iters: int, device: torch.device) -> list[Timed]:
    """The ranges whose names start with `prefix`, in order of first appearance."""
    rows = []
    for event in prof.key_averages():
        if not event.key.startswith(prefix):
            continue
        us = event.device_time_total if device.type == "cuda" else event.cpu_time_total
        rows.append(Timed(event.key, event.count / iters, us / iters / 1e3))
    return rows


def kernel_times(prof, iters: int, top: int | None = None) -> list[Timed]:
    """The GPU kernels by total time per step, the largest first (the `top` of them)."""
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return [
        Timed(e.key, e.count / iters, e.self_device_time_total / iters / 1e3) for e in kernels[:top]
    ]
