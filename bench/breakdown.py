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
    """The ranges whose names start with `prefix`, in order of first appearance.

    On CUDA a range is recorded twice: as a CPU event and as a GPU annotation spanning the
    kernels launched inside it. The GPU annotation's time is the range's; the CPU event's
    device time counts only some of those kernels (seen on an H100 with torch 2.11: 0.2 ms for
    a down projection whose kernel took 5.7 ms), so it is used only where no annotation exists.
    """
    events = [e for e in prof.key_averages() if e.key.startswith(prefix)]
    annotated = {e.key for e in events if e.device_type == DeviceType.CUDA}
    rows = []
    for event in events:
        if device.type == "cuda":
            if event.device_type != DeviceType.CUDA and event.key in annotated:
                continue
            us = event.device_time_total
        else:
            us = event.cpu_time_total
        rows.append(Timed(event.key, event.count / iters, us / iters / 1e3))
    return rows


def kernel_times(prof, iters: int, top: int | None = None) -> list[Timed]:
    """The GPU kernels by total time per step, the largest first (the `top` of them); the GPU
    annotations of named ranges (a CPU event of the same name exists) are not kernels."""
    averages = prof.key_averages()
    cpu_names = {e.key for e in averages if e.device_type != DeviceType.CUDA}
    kernels = [e for e in averages if e.device_type == DeviceType.CUDA and e.key not in cpu_names]
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return [
        Timed(e.key, e.count / iters, e.self_device_time_total / iters / 1e3) for e in kernels[:top]
    ]
