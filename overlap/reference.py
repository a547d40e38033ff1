"""Plain-torch references of the two overlap ops, in the stacked (LocalWorld) layout.

# W ranks, m rows per shard, M = W*m, K / k inner, n / N columns

    all_gather_matmul_ref(a_shard [W, m, K], b [W, K, n])  -> c [W, M, n],  c[r] = cat_p(a_shard[p]) @ b[r]
    matmul_reduce_scatter_ref(a [W, M, k], b [W, k, N])     -> c [W, m, N],  c[d] = sum_s (a[s] @ b[s])[d*m:(d+1)*m]

They are the oracle of the tests and what the serial schedules compute. The reduction sums the W
partial products in fp32 (or float64 for float64 inputs) and casts once.
"""

import torch


def all_gather_matmul_ref(a_shard: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    world_size, m, k = a_shard.shape
    gathered = a_shard.reshape(world_size * m, k)  # [M, K], identical on every rank
    return torch.matmul(gathered, b)  # [W, M, n]


def matmul_reduce_scatter_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    world_size, M, _ = a.shape
    acc_dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    partial = torch.matmul(a, b)  # [W, M, N], rank s's partial products
    total = partial.to(acc_dtype).sum(0)  # [M, N]
    return total.view(world_size, M // world_size, b.shape[-1]).to(a.dtype)  # [W, m, N]
