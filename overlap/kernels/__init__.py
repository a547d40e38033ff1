"""Triton kernels of the overlap ops: one file per communication pattern.

ag_gemm.py   persistent AllGather+GEMM consumer (tiles in chunk-arrival order, flag waits)
gemm_rs.py   GEMM+ReduceScatter producer (per-chunk tile counters raise flags) and the
             fp32 reduction of the W partial chunks (flag waits)
common.py    tile config, swizzle, the bounded flag wait, the tile matmul
"""
