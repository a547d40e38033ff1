"""Where `mode=None` overlaps, and how: thresholds measured by `bench.overlap`.

Two tables keyed (world, gpu, op): the kind of world (`LocalWorld` without an emulated link,
`DistWorld`), the GPU as `torch.cuda.get_device_name` names it, and the op (`all_gather_matmul`,
`matmul_reduce_scatter`). Each entry is the per-rank GEMM FLOPs (2 * rows * inner * columns)
from which that schedule ran within `bench.overlap.WINS` (3%) of the schedules it replaces at
every larger benchmark shape:

    FUSED_FROM_FLOPS      fused against the faster of serial and pipelined
    PIPELINED_FROM_FLOPS  pipelined against serial

`bench.overlap` prints the entries its run supports. `World.mode_for` reads them above
`OverlapConfig.min_overlap_flops`: FUSED from its entry (none: never by itself; it runs when asked
for, `mode="fused"` or `OverlapConfig.fused_min_flops`), else PIPELINED from its entry, SERIAL
below it; where the table has no PIPELINED entry, the world's `unmeasured_mode`.

Measured (one H100 80GB HBM3, torch 2.11, Triton 3.6, bf16, LocalWorld, commit a07b592,
bench/results/overlap-nvidia-h100-80gb-hbm3.json): fused lost somewhere above every size for
both ops, so it has no entry. Pipelined won from 1.2e11 FLOPs for the reduce-scatter (0.82-0.99x
serial; it sums the ranks' partial rows chunk by chunk where serial accumulates whole [M, N]
products in fp32) and only at the largest shape for the all-gather (1.006x at 1.9e12; 1.07x and
1.33x at 9.6e11 and 4.8e11). DistWorld's schedules have not run on two GPUs.
"""

import functools

import torch

_H100 = "NVIDIA H100 80GB HBM3"

FUSED_FROM_FLOPS: dict[tuple[str, str, str], float] = {}
PIPELINED_FROM_FLOPS: dict[tuple[str, str, str], float] = {
    ("LocalWorld", _H100, "all_gather_matmul"): 1_924_145_348_608,
    ("LocalWorld", _H100, "matmul_reduce_scatter"): 120_259_084_288,
}


@functools.cache
def device_name(device: torch.device) -> str:
    """The GPU's name as the tables key it ("cpu" for the CPU)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def from_flops(
    table: dict[tuple[str, str, str], float], world: str, device: torch.device, op: str
) -> float | None:
    """The measured threshold of (world, device, op) in `table`, None where none was measured."""
    return table.get((world, device_name(device), op))
