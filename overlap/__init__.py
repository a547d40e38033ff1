"""Fused GEMM + collective ops for tensor/sequence-parallel linears.

    all_gather_matmul(a_shard, b, world)      AllGather(a_shard) @ b
    matmul_reduce_scatter(a, b, world)        ReduceScatter_rows(a @ b)
    ColumnParallelLinear, RowParallelLinear, parallel_mlp   Megatron-style layers on top

A world is the group of ranks and the way bytes move between them: `LocalWorld(W, device)` (W
virtual ranks on one device, running the fused persistent Triton kernels and their per-chunk
flag protocol) or `DistWorld(group)` (a torch.distributed group: the same fused kernels over
peer memory on one node, a chunked pipeline of collectives, or serial). See overlap/worlds.py for
the schedules, overlap/local_world.py and overlap/dist_world.py for the two worlds, and
overlap/kernels/ for the kernels.
"""

from overlap.dist_world import DistWorld
from overlap.flags import OverlapTimeoutError
from overlap.kernels.common import TileConfig
from overlap.layers import ColumnParallelLinear, ParallelMLP, RowParallelLinear, parallel_mlp
from overlap.local_world import LocalWorld
from overlap.ops import (
    all_gather_matmul,
    copy_to_tensor_parallel_region,
    matmul_reduce_scatter,
    reduce_from_tensor_parallel_region,
)
from overlap.worlds import OVERLAP_MIN_FLOPS, Mode, OverlapConfig, World

__all__ = [
    "OVERLAP_MIN_FLOPS",
    "ColumnParallelLinear",
    "DistWorld",
    "LocalWorld",
    "Mode",
    "OverlapConfig",
    "OverlapTimeoutError",
    "ParallelMLP",
    "RowParallelLinear",
    "TileConfig",
    "World",
    "all_gather_matmul",
    "copy_to_tensor_parallel_region",
    "matmul_reduce_scatter",
    "parallel_mlp",
    "reduce_from_tensor_parallel_region",
]
