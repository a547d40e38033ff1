"""Fused GEMM + collective kernels (all_gather_matmul, matmul_reduce_scatter): under construction."""
