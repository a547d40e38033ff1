"""Fused GEMM + collective ops for tensor/sequence-parallel linears.

    all_gather_matmul(a_shard, b, world)      AllGather(a_shard) @ b
    matmul_reduce_scatter(a, b, world)        ReduceScatter_rows(a @ b)
    ColumnParallelLinear, RowParallelLinear, parallel_mlp   Megatron-style layers on top

A world is the group of ranks and the way bytes move between them: `LocalWorld(W, device)` (W
virtual ranks on one device, running the fused persistent Triton kernels and their per-chunk
flag protocol) or `DistWorld(group)` (a torch.distributed group: the same fused kernels over
peer memory on one node, a chunked pipeline of collectives, or serial).

    kernels/         Triton kernels, each file with its launchers (AG-GEMM, GEMM-RS, flag waits)
    reference.py     the ops in plain torch: the test oracle
    protocol.py      host side of the flag protocol: chunks, raising flags, status, timeouts
    world.py         the World interface, modes and the mode policy
    fused.py         FusedContext: the state and machinery of a world's fused calls
    local_world.py   LocalWorld (W virtual ranks on one device) and its fused context
    link.py          LocalWorld's emulated link: the time each schedule's transfers cost
    dist_world.py    DistWorld (torch.distributed) and its fused context over peer_memory.py
    ops.py           all_gather_matmul, matmul_reduce_scatter: torch.library ops with autograd
    layers.py        ColumnParallelLinear, RowParallelLinear, ParallelMLP (nn.Modules)
"""

from kernelbase import __version__, info, set_backend, use_backend
from kernelbase.gemm import GemmConfig
from overlap.dist_world import DistWorld
from overlap.layers import ColumnParallelLinear, ParallelMLP, RowParallelLinear, parallel_mlp
from overlap.local_world import LocalWorld
from overlap.ops import (
    all_gather_matmul,
    copy_to_tensor_parallel_region,
    matmul_reduce_scatter,
    reduce_from_tensor_parallel_region,
)
from overlap.protocol import OverlapMismatchError, OverlapTimeoutError
from overlap.world import OVERLAP_MIN_FLOPS, Mode, OverlapConfig, World

__all__ = [
    "OVERLAP_MIN_FLOPS",
    "ColumnParallelLinear",
    "DistWorld",
    "GemmConfig",
    "LocalWorld",
    "Mode",
    "OverlapConfig",
    "OverlapMismatchError",
    "OverlapTimeoutError",
    "ParallelMLP",
    "RowParallelLinear",
    "World",
    "__version__",
    "all_gather_matmul",
    "copy_to_tensor_parallel_region",
    "info",
    "matmul_reduce_scatter",
    "parallel_mlp",
    "reduce_from_tensor_parallel_region",
    "set_backend",
    "use_backend",
]
