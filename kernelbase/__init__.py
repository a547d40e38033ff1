"""The base that `moeblaze` and `overlap` share: backend choice, GEMM building blocks, profiling
ranges and output allocation (being filled by the restructuring)."""

__version__ = "0.1.0.dev0"
