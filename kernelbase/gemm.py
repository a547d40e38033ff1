"""GEMM building blocks shared by the kernels of moeblaze and overlap.

    GemmConfig     tile sizes and launch options of one GEMM kernel
    launch_meta    launcher side: the constexprs and launch options of a config for a dtype
    swizzle_tile   grouped tile order: GROUP_M row tiles share each sweep over column tiles
    rows_matmul    fp32 product of BLOCK_M rows of A, picked by index, with a strided B tile
    tile_matmul    fp32 product of one output tile of plain row-major A and B, read through
                   tensor descriptors (TMA on Hopper) or by pointer loads (rows_matmul)
    tma_descriptor launcher side: a descriptor of a matrix, or None where TMA cannot read it
    matmul_descriptors  launcher side: the descriptors of A and B for `tile_matmul`

DOT_FP32 upcasts the operands of tl.dot: the Triton 3.9 CPU interpreter multiplies bfloat16
operands as their raw 16-bit storage, so launchers set it when interpreting.
"""

import dataclasses

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernelbase.backend import interpreting


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tile sizes and launch options of a GEMM kernel."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    # Persistent kernels: upper bound on the grid (None: one program per SM, or per tile).
    max_programs: int | None = None


def dot_options(dtype: torch.dtype) -> dict:
    """tl.dot constexprs: float32 operands use TF32 exactly when torch's matmul would."""
    full_fp32 = dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    return dict(DOT_FP32=interpreting(), INPUT_PRECISION="ieee" if full_fp32 else "tf32")


def launch_meta(config: GemmConfig, dtype: torch.dtype) -> dict:
    """Keyword arguments of a launch: BLOCK_M/N/K, GROUP_M, the dot options, warps and stages."""
    return dict(
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        **dot_options(dtype),
    )


@triton.jit
def swizzle_tile(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Map a linear tile index to (pid_m, pid_n) so that GROUP_M row tiles share column sweeps."""
    width = GROUP_M * num_pid_n
    first_m = (tile // width) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % width) % group_size
    pid_n = (tile % width) // group_size
    return pid_m, pid_n


@triton.jit
def rows_matmul(
    a_ptr,
    a_rows,  # [BLOCK_M] row indices into A
    row_mask,  # [BLOCK_M]
    stride_am,
    b_ptr,
    stride_bk,
    stride_bn,
    cols,  # [BLOCK_N] column indices into B
    col_mask,  # [BLOCK_N]
    second_b_offset,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DUAL: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """acc[i, j] = sum_kk A[a_rows[i], kk] * B[kk, cols[j]] in fp32; A rows have unit K stride.

    With DUAL, also the product with the B that starts `second_b_offset` elements later (the
    up-projection rows of w13), reusing each loaded A block for both; else the second is zeros.
    """
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_row_ptrs = a_ptr + a_rows.to(tl.int64)[:, None] * stride_am
    b_col_ptrs = b_ptr + cols.to(tl.int64)[None, :] * stride_bn
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_mask = kk < K
        a = tl.load(a_row_ptrs + kk[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b_ptrs = b_col_ptrs + kk.to(tl.int64)[:, None] * stride_bk
        b_mask = k_mask[:, None] & col_mask[None, :]
        b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if DUAL:
            b2 = tl.load(b_ptrs + second_b_offset, mask=b_mask, other=0.0)
            if DOT_FP32:
                b2 = b2.to(tl.float32)
            acc2 = tl.dot(a, b2, acc2, input_precision=INPUT_PRECISION)
    return acc, acc2


@triton.jit
def tile_matmul(
    a_desc,
    b_desc,
    a_row0,
    a_ptr,
    a_rows,  # [BLOCK_M]
    row_mask,  # [BLOCK_M]
    stride_am,
    b_ptr,
    stride_bk,
    stride_bn,
    col0,
    cols,  # [BLOCK_N] = col0 + arange
    col_mask,  # [BLOCK_N]
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    TMA: tl.constexpr,
    B_KN: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """The fp32 product of one BLOCK_M x BLOCK_N output tile of A @ B.

    TMA: both operands through tensor descriptors (`matmul_descriptors`), rows a_row0 .. of A
    and columns col0 .. of B; on Hopper the copy engine (TMA) fills the pipeline's shared-memory
    stages, and whatever lies outside a descriptor's shape reads as zero. B_KN: `b_desc`
    describes B [K, N] in [BLOCK_K, BLOCK_N] blocks; else B^T [N, K] in [BLOCK_N, BLOCK_K]
    blocks (a transposed weight). Otherwise pointer loads (`rows_matmul`) of rows `a_rows` of
    `a_ptr` and columns `cols` of `b_ptr`; the descriptors are then unused.
    """
    if TMA:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = a_desc.load([a_row0, k0])
            b = b_desc.load([k0, col0]) if B_KN else b_desc.load([col0, k0]).T
            if DOT_FP32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        acc, _ = rows_matmul(
            a_ptr,
            a_rows,
            row_mask,
            stride_am,
            b_ptr,
            stride_bk,
            stride_bn,
            cols,
            col_mask,
            0,
            K,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            False,
            DOT_FP32,
            INPUT_PRECISION,
        )
    return acc


def tma_descriptor(matrix: torch.Tensor, block: tuple[int, int]) -> TensorDescriptor | None:
    """A tensor descriptor of a 2-D `matrix` read in `block`s, or None where the copy engine
    cannot read it: unit stride along rows, 16-byte aligned start and row stride."""
    size = matrix.element_size()
    if (
        matrix.dim() != 2
        or matrix.numel() == 0
        or matrix.stride(1) != 1
        or (matrix.stride(0) * size) % 16
        or matrix.data_ptr() % 16
        or block[1] * size < 16
    ):
        return None
    return TensorDescriptor.from_tensor(matrix, list(block))


def matmul_descriptors(a: torch.Tensor, b: torch.Tensor, config: GemmConfig):
    """(a_desc, b_desc, B_KN) for `tile_matmul` with `config`'s tiles, or None unless both
    matrices can be read through descriptors. b [K, N] is described as is when its rows are
    contiguous, else as b^T [N, K] (B_KN False: a transposed weight)."""
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    b_kn = b.stride(1) == 1
    b_desc = tma_descriptor(b, (bk, bn)) if b_kn else tma_descriptor(b.mT, (bn, bk))
    a_desc = tma_descriptor(a, (bm, bk))
    if a_desc is None or b_desc is None:
        return None
    return a_desc, b_desc, b_kn
