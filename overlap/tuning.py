"""Where `mode=None` runs the FUSED schedule: thresholds measured by `bench.overlap`.

FUSED_FROM_FLOPS[(world, gpu, op)] holds the per-rank GEMM FLOPs (2 * rows * inner * columns)
from which the fused schedule was measured within 3% of the faster of serial and pipelined at
every larger benchmark shape, on that kind of world (`LocalWorld`, `DistWorld`), GPU (as
`torch.cuda.get_device_name` names it) and op (`all_gather_matmul`, `matmul_reduce_scatter`).
`bench.overlap` prints the entries its run supports. Where no entry exists, `mode=None` never
picks FUSED by itself: it runs PIPELINED above `OverlapConfig.min_overlap_flops` (SERIAL below),
and fused runs only when asked for (`mode="fused"`, or `OverlapConfig.fused_min_flops`).

Measured so far (one H100 80GB HBM3, torch 2.11, Triton 3.6, bf16, commit 425345e, LocalWorld):
fused lost to serial at every shape (all_gather_matmul W=2, M=8192, K=8192, n=14336: 9.71 vs
2.72 ms; matmul_reduce_scatter W=2, M=8192, k=7168, N=8192: 4.65 vs 3.25 ms), so there is no
entry. DistWorld's fused path has not run on two GPUs yet.
"""

import functools

import torch

FUSED_FROM_FLOPS: dict[tuple[str, str, str], float] = {}


@functools.cache
def device_name(device: torch.device) -> str:
    """The GPU's name as the table keys it ("cpu" for the CPU)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def fused_from_flops(world: str, device: torch.device, op: str) -> float | None:
    """The measured threshold of (world, device, op), or None where none was measured."""
    return FUSED_FROM_FLOPS.get((world, device_name(device), op))
