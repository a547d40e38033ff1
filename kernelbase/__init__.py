"""The base that `moeblaze` and `overlap` share.

backend.py    which implementation runs on a device (compiled Triton, the Triton
              interpreter, torch), decided in one place; `set_backend`, `info`
gemm.py       GEMM building blocks: tile config, tile order, the gathered-rows main loop
profiling.py  `profile_range`: one name for Nsight Systems (NVTX) and torch.profiler
alloc.py      output allocation, NaN-poisoned for tests
intmath.py    cdiv, next_power_of_2 for launch grids (plain ints: Triton's cost ~3 us a call)
"""

from kernelbase.backend import Backend, backend_for, info, set_backend, use_backend

__version__ = "0.1.0.dev0"

__all__ = ["Backend", "__version__", "backend_for", "info", "set_backend", "use_backend"]
