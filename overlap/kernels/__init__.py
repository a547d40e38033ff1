"""Triton kernels of the overlap ops, one file per communication pattern, each with its launchers.

ag_gemm.py   persistent AllGather+GEMM consumer (tiles in chunk-arrival order, flag waits)
gemm_rs.py   GEMM+ReduceScatter producer (per-chunk tile counters raise flags) and the
             fp32 reduction of the W partial chunks (flag waits)
flags.py     the device side of the flag protocol: bounded waits, the peers' ready wait, the
             fallback flag-raising kernel
link.py      the emulated link of a LocalWorld: waits on the GPU clock
The GEMM main loop and tile order come from kernelbase.gemm.
"""
